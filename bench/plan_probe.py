"""A `mlcd_vl.train` launch that records, on every rank, the bytes it holds in parameters, gradients, optimizer
states and buffers at its first DeepSpeed optimizer step (for `bench/plan_validation.py`).

    torchrun --nproc_per_node 2 bench/plan_probe.py RECIPE KEY=VALUE ...   (PLAN_PROBE_OUT=<folder> in the env)

`DeepSpeedEngine.step` is wrapped: just before the first step the gradients are complete (ZeRO-2's partition,
ZeRO-3's flat partition buffer), just after it the optimizer states exist (torch AdamW creates them lazily). Bytes
are counted per storage (a view into a flat buffer counts its buffer once), each storage in the first category
that claims it, in the order parameters, fp32 master, Adam states, gradients, buffers; so ZeRO-3's fp32 master,
which shares the fp32 weights' storage, counts as parameters, as the plan counts it. Every live tensor storage
(`gc`) is summed as well, to show what the categories leave out. Each rank writes `<PLAN_PROBE_OUT>/rank<r>.json`.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path


def _tensors(value):
    """Every tensor in nested lists / tuples / dicts (DeepSpeed keeps its buffers in all three)."""
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


class StorageLedger:
    """Bytes per category, each storage counted once (in the first category that adds it)."""

    def __init__(self):
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = {}

    def add(self, category: str, tensors) -> None:
        total = self.bytes.setdefault(category, 0)
        for tensor in tensors:
            if tensor is None or tensor.numel() == 0:
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in self.seen or storage.nbytes() == 0:
                continue
            self.seen.add(key)
            total += storage.nbytes()
        self.bytes[category] = total


def _ipg_buffers(optimizer):
    for bucket in getattr(optimizer, "ipg_buckets", {}).values():
        yield from _tensors(getattr(bucket, "buffer", None))
    yield from _tensors(getattr(optimizer, "ipg_buffer", None))


def holdings(engine) -> dict:
    """What this rank holds, by category (bytes)."""
    import torch

    optimizer = engine.optimizer
    ledger = StorageLedger()
    params = list(engine.module.parameters())
    ledger.add("parameters", (getattr(p, "ds_tensor", None) for p in params))
    ledger.add("parameters", (p.data for p in params))
    ledger.add("master", _tensors(getattr(optimizer, "single_partition_of_fp32_groups", None)))
    ledger.add("master", _tensors(getattr(optimizer, "fp32_partitioned_groups_flat", None)))
    ledger.add("optimizer states", _tensors(list(getattr(optimizer, "optimizer", optimizer).state.values())))
    ledger.add("gradients", _tensors(getattr(optimizer, "grad_partitions_flat_buffer", None)))
    ledger.add("gradients", _tensors(getattr(optimizer, "grads_in_partition", None)))
    ledger.add("gradients", _tensors(getattr(optimizer, "averaged_gradients", None)))
    ledger.add("gradients", (p.grad for p in params))
    ledger.add("gradients", (getattr(g, "grad", None) for g in _tensors(
        getattr(optimizer, "single_partition_of_fp32_groups", None))))
    ledger.add("buffers", _ipg_buffers(optimizer))
    everything = StorageLedger()
    everything.add("all", (obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)))
    return {**ledger.bytes, "all live tensors": everything.bytes["all"]}


def install_probe(out: Path) -> None:
    """Wrap DeepSpeedEngine.step: measure before and after the first optimizer step, write this rank's file."""
    import torch.distributed as dist
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine.step
    state = {"done": False}

    def probed_step(self, *args, **kwargs):
        boundary = self.is_gradient_accumulation_boundary()
        if state["done"] or not boundary:
            return original(self, *args, **kwargs)
        before = holdings(self)
        result = original(self, *args, **kwargs)
        after = holdings(self)
        state["done"] = True
        rank, world = dist.get_rank(), dist.get_world_size()
        record = {"rank": rank, "world": world, "stage": self.zero_optimization_stage(),
                  "dtype": str(next(self.module.parameters()).dtype),
                  "parameters": after["parameters"], "gradients": before["gradients"],
                  "optimizer states": after["master"] + after["optimizer states"],
                  "master": after["master"], "adam": after["optimizer states"],
                  "buffers": max(before["buffers"], after["buffers"]),
                  "all live tensors": {"before step": before["all live tensors"],
                                       "after step": after["all live tensors"]}}
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{rank}.json").write_text(json.dumps(record, indent=2))
        return result

    DeepSpeedEngine.step = probed_step


def main(argv: list[str]) -> int:
    import logging

    from mlcd_vl.train.config import load_config
    from mlcd_vl.train.run import train

    logging.basicConfig(level=logging.WARNING)
    install_probe(Path(os.environ["PLAN_PROBE_OUT"]))
    train(load_config(argv[0], argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
