"""`load_vlm` on a folder whose weights do not fit its config: the error lists the offending keys (tiny model, CPU)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mlcd_vl.model.checkpoint import MAX_LISTED_KEYS, CheckpointError, describe_weight_mismatch, load_vlm

RESHAPED = "multi_modal_projector.linear_2.weight"  # names as stored in the file (transformers' legacy layout)
REMOVED = "image_newline"
ADDED = "vision_tower.extra_scale.weight"


@pytest.fixture(scope="module")
def folder(tiny_vlm_dir):
    return tiny_vlm_dir


def test_clean_folder_loads(folder):
    model, _, _ = load_vlm(folder)
    assert model.model.image_newline is not None


def test_corrupted_weights_name_every_offending_key(folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / "model.safetensors"
    state = load_file(weights)
    rows, cols = state[RESHAPED].shape
    state[RESHAPED] = torch.zeros(rows + 3, cols)
    del state[REMOVED]
    state[ADDED] = torch.ones(2)
    save_file(state, weights, metadata={"format": "pt"})

    with pytest.raises(CheckpointError) as error:
        load_vlm(broken)
    message = str(error.value)
    assert str(broken) in message and "mismatch" in message
    shape_line = next(line for line in message.splitlines() if RESHAPED in line)
    assert f"model expects {[rows, cols]}" in shape_line and f"file has {[rows + 3, cols]}" in shape_line
    assert "1 tensor(s) missing from the file:\n    model.image_newline" in message


def test_unused_tensors_load_with_a_warning(folder, tmp_path, caplog):
    extra = tmp_path / "extra"
    shutil.copytree(folder, extra)
    weights = extra / "model.safetensors"
    state = load_file(weights)
    state[ADDED] = torch.ones(2)
    save_file(state, weights, metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="mlcd_vl.checkpoint"):
        load_vlm(extra)
    assert "1 tensor(s) not in the model:" in caplog.text and "extra_scale.weight" in caplog.text


def test_long_key_lists_are_truncated_with_a_count():
    info = {"mismatched_keys": {(f"layers.{i}.weight", torch.Size([4, 2]), torch.Size([2, 2])) for i in range(25)},
            "missing_keys": {"lm_head.weight"}, "unexpected_keys": {"extra.weight"}, "error_msgs": []}
    text = describe_weight_mismatch(info)
    assert text.startswith("  25 tensor(s) with the wrong shape:")
    assert text.count("model expects [2, 2], file has [4, 2]") == MAX_LISTED_KEYS
    assert f"... and {25 - MAX_LISTED_KEYS} more" in text
    assert "1 tensor(s) missing from the file:\n    lm_head.weight" in text
    assert "extra.weight" in text and "extra.weight" not in describe_weight_mismatch(info, kinds=())
    assert describe_weight_mismatch({"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set()}) == ""
