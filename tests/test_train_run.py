"""The training recipe end to end on the tiny preset (CPU, one process): stage 1, then stage 2 from its projector.

A tiny LLaVA-JSON dataset is written here: four one-colour images of different sizes with captions (stage 1, plain
template) and colour questions (stage 2, plus one text-only record). Each run overfits it for a few optimizer steps.
Torch runs on one thread here: tiny ops on two contended threads are several times slower.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import train_helpers as H
from mlcd_vl.train import checkpointing, models, optim, zero
from mlcd_vl.train.config import RESOLVED_CONFIG_FILE, config_to_dict, load_config
from mlcd_vl.train.run import LOSS_CURVE_FILE, METRICS_FILE, PROBLEMS_FILE, configure_parser, run, train

REPO, RECIPES = H.REPO, H.RECIPES


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The shared tiny dataset (train_helpers) plus `bad.json` (a truncated and a missing image), a shared
    tiny-preset folder and one torch thread for the module."""
    paths = H.write_dataset(tmp_path_factory.mktemp("train_run"))
    root, images = paths["root"], Path(paths["images"])
    captions = json.loads(Path(paths["captions"]).read_text())
    full = (images / "red.png").read_bytes()
    (images / "truncated.png").write_bytes(full[: len(full) // 2])  # header fine (passes the scan), pixels not
    bad = captions[:3] + [
        {"id": "cap-truncated", "image": "truncated.png", "conversations": captions[0]["conversations"]},
        {"id": "cap-missing", "image": "missing.png", "conversations": captions[0]["conversations"]}]
    (root / "bad.json").write_text(json.dumps(bad))
    paths["bad"] = str(root / "bad.json")
    with H.in_process_training(paths["tiny"]):
        yield paths


def stage1_overrides(ws, out: Path, *extra: str) -> list[str]:
    return [f"data.train={ws['captions']}", f"data.image_folder={ws['images']}", f"output_dir={out}",
            "batch.per_device_batch_size=2", "batch.grad_accum=2", "optim.lr=1e-2", "optim.max_steps=20", *extra]


def stage2_overrides(ws, out: Path, init_from: Path, *extra: str) -> list[str]:
    return [f"data.train={ws['chat']}", f"data.image_folder={ws['images']}", f"output_dir={out}",
            f"model.init_from={init_from}", "optim.lr=1e-3", "optim.vision_tower_lr=2e-4", "optim.max_steps=20",
            *extra]


@pytest.fixture(scope="module")
def stage1(workspace):
    out = workspace["root"] / "stage1"
    config = load_config(RECIPES / "tiny_stage1.yaml", stage1_overrides(workspace, out,
                                                                         "save_upstream_projector=true"))
    return config, train(config)


@pytest.fixture(scope="module")
def stage2(workspace, stage1):
    out = workspace["root"] / "stage2"
    config = load_config(RECIPES / "tiny_stage2.yaml", stage2_overrides(workspace, out, stage1[1].output_dir))
    return config, train(config)


def load_saved(folder: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder)


def losses(result) -> list[float]:
    return [record["loss"] for record in result.history]


def assert_decreases(values: list[float], factor: float) -> None:
    head, tail = sum(values[:3]) / 3, sum(values[-3:]) / 3
    assert tail < factor * head, f"loss did not decrease enough: {values}"


def test_stage1_trains_only_the_projector(stage1):
    config, result = stage1
    assert result.steps == 20 and len(result.history) == 20
    assert_decreases(losses(result), 0.97)
    before, _, _, _ = models.build_model(config)  # the same deterministic start the run had
    initial, after = before.state_dict(), load_saved(result.output_dir).state_dict()
    assert initial.keys() == after.keys()
    changed = {k for k, v in after.items() if not torch.equal(v, initial[k])}
    assert changed == {optim.PROJECTOR_PREFIX + k for k in optim.PROJECTOR_KEYS}
    projector = load_file(str(result.output_dir / optim.PROJECTOR_FILE))
    assert all(torch.equal(projector[k], after[k]) for k in projector)
    assert (result.output_dir / optim.UPSTREAM_PROJECTOR_FILE).is_file()
    record = result.history[-1]
    assert record["lr"].keys() == {"projector"} and record["grad_norm"] > 0 and record["mfu"] is None
    assert record["padding_fraction"] == 0.0 and record["samples"] == 4  # equal-length captions


def test_stage2_starts_from_the_stage1_projector(stage1, stage2, workspace):
    config, result = stage2
    stage1_projector = load_file(str(stage1[1].output_dir / optim.PROJECTOR_FILE))
    assert result.projector_origin == str(stage1[1].output_dir / optim.PROJECTOR_FILE)
    model, _, _, origin = models.build_model(config)  # what the run started from
    assert origin == result.projector_origin
    for key, tensor in optim.projector_state_dict(model).items():
        assert torch.equal(tensor, stage1_projector[key]), key
    assert_decreases(losses(result), 0.9)
    assert set(result.history[0]["lr"]) == {"vision_tower", "projector", "language_model"}
    assert result.history[0]["padding_fraction"] > 0  # the text-only record is shorter


@pytest.mark.parametrize("stage", [1, 2])
def test_output_loads_with_transformers(stage, stage1, stage2):
    config, result = stage1 if stage == 1 else stage2
    model = load_saved(result.output_dir)
    expected = "LlavaForConditionalGeneration" if stage == 1 else "LlavaNextForConditionalGeneration"
    assert type(model).__name__ == expected
    assert model.config.mlcd_vl["image_mode"] == config.model.image_mode
    assert optim.read_projector(result.output_dir / "model.safetensors")[0]["linear_1.weight"].shape \
        == model.model.multi_modal_projector.linear_1.weight.shape


@pytest.mark.parametrize("stage", [1, 2])
def test_run_files(stage, stage1, stage2):
    config, result = stage1 if stage == 1 else stage2
    out = result.output_dir
    resolved = load_config(out / RESOLVED_CONFIG_FILE)
    assert config_to_dict(resolved) == config_to_dict(config)
    lines = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 21))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "supervised_tokens_per_s", "samples_per_s",
                "padding_fraction", "mfu"):
        assert key in lines[-1]
    assert (out / LOSS_CURVE_FILE).stat().st_size > 1000
    problems = json.loads((out / PROBLEMS_FILE).read_text())
    assert problems["scan"]["total"] == 0 and problems["training"]["total"] == 0


def test_data_check_writes_the_length_table_training_writes(workspace, stage2, tmp_path):
    """`mlcd-vl data check` with the recipe's settings writes the same lengths.npz as the run (for `plan --lengths`
    before any training)."""
    import numpy as np

    from mlcd_vl.data import check
    from mlcd_vl.data.dataset import LENGTHS_FILE, LengthTable

    config, result = stage2
    parser = argparse.ArgumentParser()
    check.configure_parser(parser)
    table_path = tmp_path / "table"  # any name: written as given, no ".npz" appended
    assert check.run(parser.parse_args([
        "check", config.data.train, "--image-folder", config.data.image_folder, "--tiny", "--tiny-dir",
        workspace["tiny"], "--template", config.model.template, "--max-length", str(config.data.max_length),
        "--out", str(tmp_path / "report"), "--lengths-out", str(table_path)])) == 0
    checked, trained = LengthTable.load(str(table_path)), LengthTable.load(str(result.output_dir / LENGTHS_FILE))
    for column in ("lengths", "has_image", "supervised"):
        assert np.array_equal(getattr(checked, column), getattr(trained, column)), column
    assert len(checked.valid) == len(json.loads(Path(config.data.train).read_text()))


def test_stage2_packed(workspace, stage1):
    out = workspace["root"] / "stage2-packed"
    config = load_config(RECIPES / "tiny_stage2.yaml", stage2_overrides(
        workspace, out, stage1[1].output_dir, "optim.max_steps=3", "data.packing=true", "data.token_budget=256"))
    result = train(config)
    assert result.steps == 3
    assert all(record["padding_fraction"] == 0.0 for record in result.history)
    assert sum(record["samples"] for record in result.history) >= 5  # several samples per packed row
    assert all(record["loss"] == record["loss"] for record in result.history)  # finite, not NaN


def test_bad_records_are_skipped_and_counted(workspace, capsys):
    """A truncated image passes the length scan and is skipped in its batch (an all-skipped micro-batch that must
    not break the step); a missing image is left out by the scan. Runs through the command-line entry point."""
    out = workspace["root"] / "bad"
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args([str(RECIPES / "tiny_stage1.yaml"), f"data.train={workspace['bad']}",
                              f"data.image_folder={workspace['images']}", f"output_dir={out}",
                              "batch.per_device_batch_size=1", "batch.grad_accum=2", "optim.num_epochs=1"])
    assert run(args) == 0
    problems = json.loads((out / PROBLEMS_FILE).read_text())
    assert problems["scan"]["counts"] == {"image_missing": 1}
    assert problems["training"]["counts"] == {"image_unreadable": 1}
    assert problems["training"]["examples"] == {"image_unreadable": ["cap-truncated"]}
    lines = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert len(lines) == 2  # 4 scanned-valid records, one per micro-batch, 2 per step
    assert sum(line["empty_micro_batches"] for line in lines) == 1
    assert sum(line["samples"] for line in lines) == 3
    assert all(line["loss"] == line["loss"] for line in lines)
    assert "image_unreadable: 1" in capsys.readouterr().out


def test_one_block_mask_builder():
    from mlcd_vl.data import packing
    from mlcd_vl.train import step

    assert "block_causal_mask" not in vars(step)  # the one builder is imported from where it is defined
    from_lengths = packing.block_causal_mask([2, 3])
    from_segments = packing.block_causal_mask(torch.tensor([[1, 1, 2, 2, 2]]))
    assert torch.equal(from_lengths, from_segments)
    padded = packing.block_causal_mask(torch.tensor([[1, 1, 0]]))[0, 0] == 0
    assert padded.tolist() == [[True, False, False], [True, True, False], [False, False, True]]


def test_recipes_name_real_sections():
    """The tiny recipes the tests build on still load (no stale keys)."""
    for name in ("tiny_stage1.yaml", "tiny_stage2.yaml"):
        assert isinstance(yaml.safe_load((RECIPES / name).read_text()), dict)
        load_config(RECIPES / name)


def test_checkpoints_and_resume_match_an_uninterrupted_run(workspace):
    """Checkpoints every step (two kept); a run resumed mid-epoch from step 3 ends exactly where the
    uninterrupted run ends (same data order, optimizer, schedule and RNG state)."""
    def config_for(out: Path):
        return load_config(RECIPES / "tiny_stage1.yaml", stage1_overrides(
            workspace, out, "batch.per_device_batch_size=1", "optim.max_steps=4", "save_steps=1",
            "save_total_limit=2"))

    full_dir, part_dir = workspace["root"] / "resume-full", workspace["root"] / "resume-part"
    full = train(config_for(full_dir))
    assert [p.name for p in checkpointing.checkpoints(full_dir)] == ["checkpoint-2", "checkpoint-3"]
    assert not list(full_dir.glob("*.tmp"))
    state = json.loads((full_dir / "checkpoint-3" / checkpointing.STATE_FILE).read_text())
    assert (state["step"], state["epoch"], state["sampler"]["position"]) == (3, 1, 2)  # mid-epoch

    shutil.copytree(full_dir / "checkpoint-3", part_dir / "checkpoint-3")  # as if the run died after step 3
    resumed = train(config_for(part_dir))
    assert resumed.steps == 4 and [r["step"] for r in resumed.history] == [4]
    assert resumed.history[0]["loss"] == pytest.approx(full.history[-1]["loss"], rel=1e-6)
    assert resumed.history[0]["lr"] == pytest.approx(full.history[-1]["lr"])
    expected = load_file(str(full_dir / optim.PROJECTOR_FILE))
    actual = load_file(str(part_dir / optim.PROJECTOR_FILE))
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, rtol=0, atol=1e-7)


def test_mfu_estimate(monkeypatch):
    from mlcd_vl.train import metrics

    counts = metrics.StepCounts(loss_sum=10.0, supervised=5, tokens=100, positions=125, samples=4, tower_tokens=50)
    flops = metrics.FlopsModel(llm_params=1000, tower_params=200)
    assert flops.step_flops(counts) == 6.0 * (1000 * 100 + 200 * 50)
    monkeypatch.setenv(metrics.PEAK_FLOPS_ENV, "1e6")
    peak = metrics.peak_flops(torch.device("cpu"))
    record = metrics.step_record(3, 1.5, counts, 2.0, {"projector": 1e-3}, 0.5, flops, peak, world_size=2)
    assert record["mfu"] == pytest.approx(6.0 * 110_000 / 2.0 / 2e6)
    assert record["loss"] == 2.0 and record["padding_fraction"] == pytest.approx(0.2)
    assert record["tokens_per_s"] == 50 and record["samples_per_s"] == 2
    monkeypatch.delenv(metrics.PEAK_FLOPS_ENV)
    assert metrics.peak_flops(torch.device("cpu")) is None
    assert "MFU n/a" in metrics.format_record(metrics.step_record(1, 1, counts, 1, {}, None, flops, None, 1))


def test_flops_without_the_tower_and_with_the_head_on_supervised_tokens_only():
    from mlcd_vl.train import metrics

    counts = metrics.StepCounts(supervised=5, tokens=100, tower_tokens=50)
    flops = metrics.FlopsModel(llm_params=1000, tower_params=200, head_params=30)
    assert flops.step_flops(counts) == 6.0 * (1000 * 100 + 30 * 5 + 200 * 50)
    assert flops.step_flops(counts, with_tower=False) == 6.0 * (1000 * 100 + 30 * 5)
    plain = metrics.FlopsModel(llm_params=1000, tower_params=200)  # the training log's convention is unchanged
    assert plain.step_flops(counts, with_tower=False) == 6.0 * 1000 * 100


def test_step_line_fits_100_columns_at_extreme_values():
    from mlcd_vl.train import metrics

    counts = metrics.StepCounts(loss_sum=12.3456e6, supervised=10**6, tokens=10**7, positions=10**7 + 1,
                                samples=99_999, tower_tokens=10**7)
    lrs = {"vision_tower": 2e-6, "projector": 1.234e-3, "language_model": 1e-5, "lora": 3.3e-4}
    flops = metrics.FlopsModel(llm_params=7 * 10**9, tower_params=2 * 10**9)
    record = metrics.step_record(1_234_567, 99.5, counts, 0.5, lrs, 12345.678, flops, 1e12, world_size=64)
    line = metrics.format_record(record)
    assert len(line) <= 100, (len(line), line)
    assert line.startswith("step 1234567  loss 12.3456  lr 1.2e-03  grad 1.23e+04  20000000 tok/s"), line
    assert "MFU" in line and "pad 0%" in line


def test_unreached_tower_layers_are_frozen(stage2):
    config, _ = stage2
    model, _, _, _ = models.build_model(config)
    names = optim.unreached_tower_parameters(model)
    assert len(names) == 18 and all(".layers.2." in n or "post_layernorm" in n for n in names)  # 3 layers, reads -2
    optim.apply_tunable_parts(model, config.tunable_parts)
    assert sorted(optim.freeze_unreached(model)) == sorted(names)


@pytest.mark.slow
def test_two_process_ddp_run_with_checkpoint(workspace, stage1):
    """torchrun with 2 CPU processes (gloo): sharded data, step-global token count across ranks, DDP (no parameter
    without a gradient), metrics reduced over ranks, a checkpoint with both ranks' RNG states, the final save.
    (Resume is checked in one process above; a 2-process resume costs another launch of about 25 s.)"""
    import subprocess
    import sys

    out = workspace["root"] / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mlcd_vl.train", str(RECIPES / "tiny_stage2.yaml"),
               *stage2_overrides(workspace, out, stage1[1].output_dir, "optim.max_steps=4", "save_steps=2",
                                 "batch.per_device_batch_size=1")]
    env = dict(os.environ, OMP_NUM_THREADS="1", **{models.TINY_DIR_ENV: os.environ[models.TINY_DIR_ENV]})

    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    first = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    assert sum(r["samples"] for r in first[:2]) == 6  # 5 records on 2 ranks: 3 micro-batches each, one repeated
    assert [p.name for p in checkpointing.checkpoints(out)] == ["checkpoint-2"]
    assert {p.name for p in (out / "checkpoint-2").glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
    assert type(load_saved(out)).__name__ == "LlavaNextForConditionalGeneration"
    problems = json.loads((out / PROBLEMS_FILE).read_text())
    assert problems["training"]["total"] == 0


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_deepspeed_config_has_no_auto_left(name):
    """The recipe fills every "auto" as the HF Trainer would (runs under DeepSpeed: test_train_deepspeed.py)."""
    config = load_config(RECIPES / "mlcd_bigG448_stage2.yaml", [f"deepspeed={REPO / 'configs' / 'deepspeed' / name}"])
    ds = zero.deepspeed_config(config, hidden_size=3584, world_size=8, precision="bf16")
    assert "auto" not in json.dumps(ds)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) \
        == (2, 8, 128)
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is True
