"""Experiment trackers (`report_to`): TensorBoard event files and an offline wandb run, on two tiny stage-1 steps."""

from __future__ import annotations


import pytest
import train_helpers as H

from mlcd_vl.train.config import load_config
from mlcd_vl.train.run import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    paths = H.write_dataset(tmp_path_factory.mktemp("logging"))
    with H.in_process_training(paths["tiny"]):
        yield paths


def run_with(data, report_to: str):
    out = data["root"] / report_to
    config = load_config(H.RECIPES / "tiny_stage1.yaml", [
        f"data.train={data['captions']}", f"data.image_folder={data['images']}", f"output_dir={out}",
        "optim.max_steps=2", "batch.per_device_batch_size=2", "batch.grad_accum=1", f"report_to={report_to}"])
    return train(config)


def test_tensorboard_event_files(data):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_with(data, "tensorboard")
    events = sorted(result.output_dir.rglob("events.out.tfevents.*"))
    assert events, list(result.output_dir.rglob("*"))
    scalars = set()
    for path in events:
        accumulator = EventAccumulator(str(path.parent))
        accumulator.Reload()
        scalars |= set(accumulator.Tags()["scalars"])
    assert {"loss", "grad_norm", "tokens_per_s", "lr/projector"} <= scalars, scalars


def test_wandb_offline_run(data, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = run_with(data, "wandb")
    runs = list((result.output_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), list(result.output_dir.rglob("*"))
    assert [r["step"] for r in result.history] == [1, 2]
