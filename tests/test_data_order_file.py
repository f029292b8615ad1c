"""`data.order_file`: a listed micro-batch order replayed by the trainer (formats, errors, ranks, epochs, resume).

The end-to-end tests run the tiny stage-1 recipe in this process (one thread) and record the record ids of every
micro-batch the trainer steps on through a wrapper around `step.optimizer_step` that changes nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import train_helpers as H
from mlcd_vl import cli
from mlcd_vl.data.order_file import (FixedOrderBatchSampler, OrderFileError, order_digest, read_order_file,
                                     resolve_order)
from mlcd_vl.data.samplers import LengthGroupedBatchSampler
from mlcd_vl.train import step as train_step
from mlcd_vl.train.config import ConfigError, load_config
from mlcd_vl.train.run import train

IDS = ["a", "b", "c", "d", "e"]


def test_json_and_text_formats_read_the_same(tmp_path):
    batches = [["a", "b"], ["c"], ["d", "e"]]
    (tmp_path / "list.json").write_text(json.dumps(batches))
    (tmp_path / "object.json").write_text(json.dumps({"micro_batches": batches, "note": "ignored"}))
    (tmp_path / "order.txt").write_text("# replay\na b\n\n  c\nd\te\n")
    for name in ("list.json", "object.json", "order.txt"):
        assert read_order_file(tmp_path / name) == batches, name


@pytest.mark.parametrize("content, message", [
    ("[[\"a\"], []]", "micro-batch 1 is empty"),
    ("{\"order\": []}", "expected a list of micro-batches"),
    ("[[\"a\"", "not valid JSON"),
    ("[]", "lists no micro-batch"),
])
def test_malformed_order_files_are_named(tmp_path, content, message):
    path = tmp_path / "order.json"
    path.write_text(content)
    with pytest.raises(OrderFileError, match=message) as error:
        read_order_file(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_unknown_and_shared_ids_are_one_line_errors_naming_file_and_id():
    with pytest.raises(OrderFileError) as error:
        resolve_order([["a", "b"], ["zz"]], IDS, "runs/order.json")
    assert str(error.value) == ("runs/order.json: micro-batch 1 names record id 'zz', which the training data does "
                                "not have")
    with pytest.raises(OrderFileError, match="'b', which several records"):
        resolve_order([["b"]], ["a", "b", "b"], "order.json")
    assert resolve_order([["e", "a"], ["c"]], IDS, "order.json") == [[4, 0], [2]]


def test_micro_batches_go_round_robin_to_ranks_every_epoch():
    batches = [[0, 1], [2], [3, 4], [1], [2, 3]]
    digest = order_digest([["x"]])
    shares = [list(FixedOrderBatchSampler(batches, digest, world_size=2, rank=rank)) for rank in (0, 1)]
    assert shares == [[[0, 1], [3, 4], [2, 3]], [[2], [1], [0, 1]]]  # padded with the first entry
    dropped = [list(FixedOrderBatchSampler(batches, digest, world_size=2, rank=rank, drop_last=True))
               for rank in (0, 1)]
    assert dropped == [[[0, 1], [3, 4]], [[2], [1]]]
    sampler = FixedOrderBatchSampler(batches, digest)
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) == first == batches
    with pytest.raises(OrderFileError, match="cannot feed 8 processes"):
        FixedOrderBatchSampler(batches, digest, world_size=8)


def test_resume_needs_the_same_order():
    batches = [[0], [1], [2], [3]]
    sampler = FixedOrderBatchSampler(batches, order_digest([["a"], ["b"], ["c"], ["d"]]))
    iterator = iter(sampler)
    head = [next(iterator), next(iterator)]
    state = json.loads(json.dumps(sampler.state_dict()))
    resumed = FixedOrderBatchSampler(batches, order_digest([["a"], ["b"], ["c"], ["d"]]))
    resumed.load_state_dict(state)
    assert head + list(resumed) == batches
    other = FixedOrderBatchSampler(batches, order_digest([["d"], ["c"], ["b"], ["a"]]))
    with pytest.raises(ValueError, match="another data.order_file"):
        other.load_state_dict(state)
    grouped = LengthGroupedBatchSampler([5, 6, 7, 8], [True] * 4, 1)
    with pytest.raises(ValueError, match="another data.order_file"):
        grouped.load_state_dict(state)
    with pytest.raises(ValueError, match="another data.order_file"):
        resumed.load_state_dict(grouped.state_dict())


def test_order_file_and_packing_are_exclusive():
    with pytest.raises(ConfigError, match="data.order_file"):
        load_config(None, ["data.order_file=order.json", "data.packing=true", "data.token_budget=512"])


# ----------------------------------------------------------------------------------------------------------------
# Through the trainer
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    paths = H.write_dataset(tmp_path_factory.mktemp("order_file"))
    with H.in_process_training(paths["tiny"]):
        yield paths


ORDER = [["cap-blue"], ["cap-red", "cap-green"], ["cap-yellow"], ["cap-green", "cap-blue"], ["cap-red"],
         ["cap-yellow", "cap-red"]]


def stage1_config(ws, out: Path, order_file: Path, *extra: str):
    return load_config(H.RECIPES / "tiny_stage1.yaml", [
        f"data.train={ws['captions']}", f"data.image_folder={ws['images']}", f"output_dir={out}",
        f"data.order_file={order_file}", "batch.grad_accum=2", "optim.lr=1e-2", "optim.max_steps=4", *extra])


def record_order(monkeypatch) -> list[list[list[str]]]:
    """Per optimizer step, the record ids of its micro-batches."""
    steps, original = [], train_step.optimizer_step

    def optimizer_step(accelerator, model, optimizer, scheduler, micro_batches, *args, **kwargs):
        steps.append([batch["record_ids"] for batch in micro_batches])
        return original(accelerator, model, optimizer, scheduler, micro_batches, *args, **kwargs)

    monkeypatch.setattr(train_step, "optimizer_step", optimizer_step)
    return steps


def test_trainer_replays_the_order_across_epochs_and_resumes_in_it(workspace, monkeypatch):
    """grad_accum 2 over 6 listed micro-batches: 3 steps per epoch, the 4th step starts the list again; a run
    resumed from step 2 replays the rest of the order and ends where the uninterrupted run ends."""
    order_file = workspace["root"] / "order.json"
    order_file.write_text(json.dumps(ORDER))
    steps = record_order(monkeypatch)
    full_dir, part_dir = workspace["root"] / "full", workspace["root"] / "part"
    full = train(stage1_config(workspace, full_dir, order_file, "save_steps=2"))
    assert steps == [ORDER[0:2], ORDER[2:4], ORDER[4:6], ORDER[0:2]]
    assert full.steps == 4

    shutil.copytree(full_dir / "checkpoint-2", part_dir / "checkpoint-2")  # as if the run died after step 2
    steps.clear()
    resumed = train(stage1_config(workspace, part_dir, order_file))
    assert steps == [ORDER[4:6], ORDER[0:2]]
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in full.history[2:]], rel=1e-6)

    order_file_2 = workspace["root"] / "order2.json"
    order_file_2.write_text(json.dumps(ORDER[::-1]))
    with pytest.raises(ValueError, match="another data.order_file"):
        train(stage1_config(workspace, part_dir, order_file_2))


def test_unknown_id_stops_the_command_with_one_line(workspace, capsys):
    order_file = workspace["root"] / "bad_order.txt"
    order_file.write_text("cap-red cap-blue\ncap-purple\n")
    argv = ["train", str(H.RECIPES / "tiny_stage1.yaml"), f"data.train={workspace['captions']}",
            f"data.image_folder={workspace['images']}", f"data.order_file={order_file}",
            f"output_dir={workspace['root'] / 'bad'}"]
    assert cli.main(argv) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[-1] == (f"mlcd-vl train: error: {order_file}: micro-batch 1 names record id 'cap-purple', which "
                          "the training data does not have")
