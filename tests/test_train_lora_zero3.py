"""LoRA under DeepSpeed ZeRO-3 (two CPU processes, gloo) against the same LoRA run on one process without DeepSpeed.

The recipe: tiny stage 2 with LoRA on the LLM (r 4, alpha 8, no dropout), the projector trained fully, the tower
frozen; three optimizer steps of global batch 4 (one process: 2 per device x 2 accumulation; ZeRO-3: 1 per device x
2 processes x 2 accumulation), on the `mixed` data of the ZeRO tests (one micro-step puts an image on one rank and a
text-only record on the other). Three launches serve every test: the reference, the ZeRO-3 run (checkpoint at step
2), and that run resumed from its step-2 checkpoint.

Under ZeRO-3 the adapters are merged layer by layer as the final save streams the weights (`zero.save_streamed` with
`lora.merged_layout`; the model is built partitioned): the final folder must be the plain model (no adapter or
base_layer keys), load with `load_vlm` and plain transformers, and hold the one-process merged weights
(`merge_and_unload`) within the tolerances of `test_train_deepspeed`.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import train_helpers as H
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
LORA = ["tunable_parts=mm_mlp_adapter,mm_language_model", "lora.enabled=true", "lora.r=4", "lora.alpha=8",
        "lora.dropout=0"]  # dropout draws differ between one and two processes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return H.write_dataset(tmp_path_factory.mktemp("lora-zero3"))


def overrides(data, out, *extra):
    # projector_lr below lr: Adam turns the projector's near-zero gradients into lr-sized steps whose sign can flip
    # with summation order; the adapters learn at 1e-2 so that the merge visibly moves the LLM's weights.
    return H.comparison_overrides(data, out, "optim.lr=1e-2", "optim.projector_lr=1e-3", *LORA, *extra)


@pytest.fixture(scope="module")
def runs(data):
    root = data["root"]
    H.run_single(data, overrides(data, root / "single"))
    H.run_zero(data, "zero3.json", overrides(data, root / "zero3", "save_steps=2"), timeout=H.FIRST_LAUNCH_TIMEOUT)
    shutil.copytree(root / "zero3" / "checkpoint-2", root / "zero3-resumed" / "checkpoint-2")
    H.run_zero(data, "zero3.json", overrides(data, root / "zero3-resumed", "save_steps=2"))
    return {name: root / name for name in ("single", "zero3", "zero3-resumed")}


def test_losses_match_one_process(runs):
    H.assert_same_steps(runs["single"], runs["zero3"])


def test_merged_folder_is_the_plain_one_process_model(data, runs):
    from transformers import AutoModelForImageTextToText

    from mlcd_vl.model.checkpoint import load_vlm
    from mlcd_vl.train import models
    from mlcd_vl.train.config import load_config

    expected = load_file(str(runs["single"] / "model.safetensors"))
    actual = load_file(str(runs["zero3"] / "model.safetensors"))
    assert actual.keys() == expected.keys()
    assert not any(".lora_" in key or ".base_layer." in key for key in actual)
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, rtol=1e-4, atol=1e-4, msg=key)
    assert not list(runs["zero3"].glob("*.tmp"))  # the sharded scratch checkpoint is gone

    model, _, _ = load_vlm(runs["zero3"])
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    plain = AutoModelForImageTextToText.from_pretrained(runs["zero3"]).state_dict()
    merged = model.state_dict()
    assert plain.keys() == merged.keys()
    with H.in_process_training(data["tiny"]):
        initial = models.build_model(load_config(H.RECIPES / "tiny_stage2.yaml", overrides(data, runs["zero3"])))[0]
    initial = initial.state_dict()
    assert merged.keys() == initial.keys()
    moved = 0
    for key, tensor in merged.items():
        torch.testing.assert_close(plain[key], tensor, rtol=0, atol=0, msg=key)
        if ".self_attn.q_proj.weight" in key:  # the adapters were merged: far beyond the tolerance above
            moved += bool((tensor - initial[key]).abs().max() > 1e-3)
        if "vision_tower" in key or "embed_tokens" in key:
            torch.testing.assert_close(tensor, initial[key], rtol=0, atol=0, msg=key)  # frozen
    assert moved == model.config.text_config.num_hidden_layers


def test_checkpoint_is_deepspeeds_and_resumes(runs):
    checkpoint = runs["zero3"] / "checkpoint-2"
    assert (checkpoint / "pytorch_model").is_dir()  # the engine's sharded state, adapters included
    resumed = H.metrics(runs["zero3-resumed"])
    assert [r["step"] for r in resumed] == [3]
    assert resumed[0]["loss"] == pytest.approx(H.metrics(runs["zero3"])[-1]["loss"], rel=1e-6)
    expected = load_file(str(runs["zero3"] / "model.safetensors"))
    actual = load_file(str(runs["zero3-resumed"] / "model.safetensors"))
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, rtol=0, atol=1e-6, msg=key)
