"""Parameters that DeepSpeed ZeRO-3 partitions, seen whole for a moment.

Under ZeRO-3 (`deepspeed.zero.Init` or a ZeRO-3 engine) every parameter holds only this rank's slice: an empty
tensor with `ds_id`, `ds_shape` and `ds_numel` attached. Code that reads or writes whole values wraps them in
`gathered` (DeepSpeed's `GatheredParameters`: every rank must enter it, in the same order); on ordinary tensors it
does nothing, so the same code serves plain models.
"""

from __future__ import annotations

import contextlib

import torch


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The parameter's whole shape, partitioned or not."""
    return tuple(getattr(param, "ds_shape", param.shape))


def gathered(params: list[torch.Tensor], modifier_rank: int | None = None):
    """Whole parameters for the block (a no-op for ordinary tensors). With `modifier_rank` r, what rank r writes
    into them is kept on every rank when the block ends; with None, changes are dropped."""
    if any(is_partitioned(p) for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def is_main_rank() -> bool:
    """Rank 0 of the process group, or the only process."""
    import torch.distributed as dist

    return not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0
