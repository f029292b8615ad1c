"""Parameters that DeepSpeed ZeRO-3 partitions, seen whole for a moment.

Under ZeRO-3 (`deepspeed.zero.Init` or a ZeRO-3 engine) every parameter holds only this rank's slice: an empty
tensor with `ds_id`, `ds_shape` and `ds_numel` attached. Code that reads or writes whole values wraps them in
`gathered` (DeepSpeed's `GatheredParameters`: every rank must enter it, in the same order); on ordinary tensors it
does nothing, so the same code serves plain models.

Gathering one parameter after another allocates and frees whole-parameter buffers of many sizes on the host; glibc
keeps such freed blocks for reuse (its mmap threshold grows with the largest block freed), so without
`release_freed_memory` a rank's resident memory would climb by a large part of the model while it loads or saves
one tensor at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools

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


@functools.cache
def _libc():
    """glibc, when this process runs on it (else None: nothing to release)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> None:
    """Hand the host memory freed so far back to the system (glibc's `malloc_trim`; a no-op elsewhere)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
