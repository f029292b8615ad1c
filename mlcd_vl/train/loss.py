"""The training loss and how it is normalised over an optimizer step.

Token cross-entropy is shifted by one (position t predicts token t+1), ignores label -100, and is computed in
float32 on the supervised positions only (logits for the rest of a 32k-token row are never materialised).

Normalisation (`StepTokens.mode`):

* `"global"` (default): every micro-batch returns its summed token loss divided by the number of supervised tokens
  of the WHOLE optimizer step (all its micro-batches on all ranks, counted up front and all-reduced). Gradient
  accumulation, padding, packing and uneven ranks then never re-weight samples: the step's gradient is the
  gradient of the token mean over the step, as if it were one big batch.
* `"upstream"`: per-micro-batch token mean, each micro-batch weighted equally (transformers 4.44 before the
  `num_items_in_batch` fix), so micro-batches with few supervised tokens weigh more.

Contract with the caller: the returned loss is meant for a plain `loss.backward()` per micro-batch, with gradients
SUMMED over the step's micro-batches and AVERAGED over data-parallel ranks (what DDP and DeepSpeed do). The
`world_size` factor in "global" mode undoes that average; the 1/micro_batches factor in "upstream" mode replaces
the trainer's own division. So the caller must not divide by the accumulation steps again (DeepSpeed:
`engine.backward(loss, scale_wrt_gas=False)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import distributed as dist

from mlcd_vl.vocab import IGNORE_INDEX

NORMALISATIONS = ("global", "upstream")


def shifted_targets(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Targets aligned with the logits of positions 0..L-2: labels[:, 1:], with every target that starts a new
    packed sample (its position id is 0) ignored, so no sample is trained to predict its neighbour's first token."""
    targets = labels[:, 1:].clone()
    if position_ids is not None:
        targets[position_ids[:, 1:] == 0] = IGNORE_INDEX
    return targets


def count_supervised(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> int:
    """Targets a shifted causal-LM loss trains on (the project's one supervised-token count)."""
    return int((shifted_targets(labels, position_ids) != IGNORE_INDEX).sum())


def _reduce_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class StepTokens:
    """What normalises the loss of one optimizer step; made once per step by `plan_step`."""

    supervised: int  # supervised tokens of the whole step: all micro-batches, all ranks
    micro_batches: int  # micro-batches of the step on this rank
    world_size: int = 1
    mode: str = "global"

    def __post_init__(self) -> None:
        if self.mode not in NORMALISATIONS:
            raise ValueError(f"loss normalisation {self.mode!r} is not one of {', '.join(NORMALISATIONS)}")
        if self.micro_batches <= 0 or self.world_size <= 0:
            raise ValueError("a step needs at least one micro-batch and one rank")


def plan_step(local_counts: Sequence[int], mode: str = "global") -> StepTokens:
    """StepTokens from this rank's per-micro-batch supervised counts; all-reduced when torch.distributed runs.

    Every rank must call it (it is a collective when the process group is initialised).
    """
    total, world_size = sum(int(c) for c in local_counts), 1
    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
        tensor = torch.tensor([total], dtype=torch.long, device=_reduce_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        total = int(tensor.item())
    return StepTokens(supervised=total, micro_batches=len(local_counts), world_size=world_size, mode=mode)


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy in float32 of logits [N, V] against targets [N] (IGNORE_INDEX skipped)."""
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def normalise(loss_sum: torch.Tensor, supervised: int, step: StepTokens) -> torch.Tensor:
    """The micro-batch loss to back-propagate, from its summed token loss and its own supervised count."""
    if step.mode == "global":
        return loss_sum * (step.world_size / max(step.supervised, 1))
    return loss_sum / (max(supervised, 1) * step.micro_batches)
