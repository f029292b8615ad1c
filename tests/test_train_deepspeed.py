"""DeepSpeed ZeRO-2 and ZeRO-3 through accelerate, two CPU processes (gloo), against a single-process run.

One recipe (tiny stage 2: tower, projector and LLM all train; step-global loss; clipping at 1.0), three optimizer
steps of global batch 4, launched three ways: one process (2 per device x 2 accumulation), and ZeRO-2 / ZeRO-3
with torchrun on 2 processes (1 per device x 2 accumulation). The data order gives the same four samples to every
step in all three, and its one step holds a micro-step where rank 0 has an image and rank 1 a text-only record
(the dummy crop keeps ZeRO-3's parameter gathers in step; a hang would fail at the launch timeout). The ZeRO-3 runs
use the chunked LM-head loss (chunks of 4 supervised tokens, the head weight gathered for the loss block only), the
others the full-logits one, so both paths meet the one-process reference.

Losses and gradient norms must agree within 1e-4 relative, the ZeRO-3 final weights (streamed save, `train.zero`)
must load with plain transformers and match the single-process weights, and a ZeRO-3 run resumed from its step-2
checkpoint must end where the uninterrupted one ends. The ZeRO-3 run builds its model partitioned (`model.sharded`);
one more run with `model.sharded_init=false` (the whole model built on every rank first) must give the same steps
and weights.

Multi-node launches (`scripts/finetune.sh`, two "nodes" of one process on this machine over the loopback: NNODES=2,
NODE_RANK 0 and 1, MASTER_ADDR=127.0.0.1, a free port) must give the ZeRO-3 run's steps and weights: with torchrun,
and with the DeepSpeed launcher over a HOSTFILE of two hosts (NO_SSH=1: DeepSpeed's --no_ssh, each node started on
its own). The launcher's default multi-host path starts the other hosts over passwordless ssh with pdsh, which this
machine does not have (no pdsh, no ssh server); a one-host HOSTFILE also needs `ssh localhost` unless NO_SSH=1.

The first DeepSpeed launch on a fresh machine JIT-compiles DeepSpeed's shm comm op (about 2 minutes, cached in
~/.cache/torch_extensions); the launch timeout allows for it.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import train_helpers as H
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # the runs fixture: 8 launches


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return H.write_dataset(tmp_path_factory.mktemp("deepspeed"))


def overrides(data, out, *extra):
    return H.comparison_overrides(data, out, "optim.lr=1e-3", "optim.vision_tower_lr=2e-4", *extra)


def assert_same_weights(expected_folder, actual_folder, rtol=1e-4, atol=1e-4):
    """Two runs' final model.safetensors: the same keys, the same tensors within the tolerance."""
    expected = load_file(str(expected_folder / "model.safetensors"))
    actual = load_file(str(actual_folder / "model.safetensors"))
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, rtol=rtol, atol=atol, msg=key)


@pytest.fixture(scope="module")
def runs(data):
    root = data["root"]
    H.run_single(data, overrides(data, root / "single"))
    H.run_zero(data, "zero2.json", overrides(data, root / "zero2"), timeout=H.FIRST_LAUNCH_TIMEOUT)
    chunked = ("optim.loss_impl=chunked", "optim.loss_chunk_tokens=4")
    H.run_zero(data, "zero3.json", overrides(data, root / "zero3", "save_steps=2", *chunked))
    shutil.copytree(root / "zero3" / "checkpoint-2", root / "zero3-resumed" / "checkpoint-2")
    H.run_zero(data, "zero3.json", overrides(data, root / "zero3-resumed", "save_steps=2", *chunked))
    H.run_zero(data, "zero3.json", overrides(data, root / "zero3-whole-init", "model.sharded_init=false", *chunked))
    H.run_two_nodes(data, "zero3.json", overrides(data, root / "zero3-two-nodes", *chunked),
                    timeout=H.FIRST_LAUNCH_TIMEOUT)
    hostfile = root / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two "hosts", one process each
    H.run_two_nodes(data, "zero3.json", overrides(data, root / "zero3-hostfile", *chunked),
                    timeout=H.FIRST_LAUNCH_TIMEOUT, HOSTFILE=str(hostfile), NO_SSH="1")
    return {name: root / name for name in ("single", "zero2", "zero3", "zero3-resumed", "zero3-whole-init",
                                           "zero3-two-nodes", "zero3-hostfile")}


def test_the_data_mixes_modalities_within_a_micro_step():
    from mlcd_vl.data.samplers import LengthGroupedBatchSampler

    has_image = np.array([True, True, True, False])
    ranks = [LengthGroupedBatchSampler(np.array([40, 41, 42, 30]), has_image, 1, world_size=2, rank=rank,
                                       grad_accum=2, group_by_modality=True, seed=42).rank_batches()
             for rank in (0, 1)]
    assert any(has_image[a[0]] != has_image[b[0]] for a, b in zip(*ranks))


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3-whole-init"])
def test_losses_match_one_process(runs, name):
    H.assert_same_steps(runs["single"], runs[name])


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3-whole-init"])
def test_consolidated_weights_load_and_match(runs, name):
    from transformers import AutoModelForImageTextToText

    assert_same_weights(runs["single"], runs[name])
    model = AutoModelForImageTextToText.from_pretrained(runs[name])
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    assert not list(runs[name].glob("*.tmp"))  # the sharded scratch checkpoint is gone


def test_zero3_checkpoint_is_deepspeeds_and_resumes(runs):
    checkpoint = runs["zero3"] / "checkpoint-2"
    assert (checkpoint / "pytorch_model").is_dir()  # DeepSpeed's sharded state, not a DDP fallback
    resumed = H.metrics(runs["zero3-resumed"])
    assert [r["step"] for r in resumed] == [3]
    assert resumed[0]["loss"] == pytest.approx(H.metrics(runs["zero3"])[-1]["loss"], rel=1e-6)
    expected = load_file(str(runs["zero3"] / "model.safetensors"))
    actual = load_file(str(runs["zero3-resumed"] / "model.safetensors"))
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, rtol=0, atol=1e-6, msg=key)


def test_sharded_init_trains_as_the_whole_model_build(runs):
    H.assert_same_steps(runs["zero3-whole-init"], runs["zero3"])
    assert_same_weights(runs["zero3-whole-init"], runs["zero3"])


@pytest.mark.parametrize("name", ["zero3-two-nodes", "zero3-hostfile"])
def test_two_nodes_train_as_one_node_with_two_processes(runs, name):
    H.assert_same_steps(runs["zero3"], runs[name])
    assert_same_weights(runs["zero3"], runs[name])
