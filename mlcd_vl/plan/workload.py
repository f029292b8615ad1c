"""What a run processes: its largest micro-batch, crops and visual tokens, steps, FLOPs and wall time.

With a length table (`lengths.npz`, written by `mlcd-vl data check` or by training into its output folder) the
micro-batches are those training will make: the recipe's own sampler (`LengthGroupedBatchSampler` for padded
batches, `PackedBatchSampler` for packing) plans epoch 0 for the given world size, so the largest micro-batch and
the number of steps are exact, and a table with supervised counts gives the most supervised tokens of any
micro-batch (the loss). Without one, a micro-batch is assumed to hold rows of `data.max_length` tokens (an upper
bound) and the run's length is estimated from the dataset preset's size and a typical sample (stated).

Visual tokens and crops come from `model.anyres.image_layout` for the recipe's image mode. FLOPs are training's own
MFU definition (`train.metrics.FlopsModel`: 6 x parameters x tokens, tower parameters x tower tokens), so a run
that logs the stated MFU takes the estimated time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mlcd_vl.plan import architectures

TYPICAL_IMAGE = (640, 480)  # (width, height): COCO-like photos, the bulk of LLaVA-NeXT-Data
PACKING_FILL = 0.97  # tokens / budget of packed rows (bench/results/train_throughput_*: padding < 3%)
_SWEEP = [int(32 * 1.25**k) for k in range(24)]  # 32 .. ~5k px: every grid choice and unpad case in between


@dataclass(frozen=True)
class ImageGeometry:
    """Crops and visual tokens of the recipe's image mode."""

    max_crops: int  # crops of one image, at most
    crops_per_token: float  # crops per visual token, at most (the tower's worst case per LLM position)
    typical_crops: int  # for TYPICAL_IMAGE
    typical_tokens: int
    tokens_per_crop: int  # through the tower: patches + CLS

    @classmethod
    def of(cls, settings, tokens_per_crop: int) -> ImageGeometry:
        from mlcd_vl.model import anyres

        def layout(size):
            return anyres.image_layout(size, image_mode=settings.image_mode, merge_type=settings.merge_type,
                                       crop_size=settings.crop_size, patch_size=settings.patch_size,
                                       pinpoints=settings.pinpoints)

        layouts = [layout((w, h)) for w in _SWEEP for h in _SWEEP]
        typical = layout(TYPICAL_IMAGE)
        return cls(max(x.num_crops for x in layouts), max(x.num_crops / x.tokens for x in layouts),
                   typical.num_crops, typical.tokens, tokens_per_crop)


@dataclass(frozen=True)
class Lengths:
    """Token lengths of the usable records (a length table), or None for a plan without one."""

    source: str
    lengths: np.ndarray
    has_image: np.ndarray
    supervised: np.ndarray | None = None  # supervised tokens per record (None: an older table without them)

    @classmethod
    def load(cls, path: str) -> Lengths:
        from mlcd_vl.data.dataset import LengthTable

        try:
            table = LengthTable.load(path)
        except (OSError, KeyError, ValueError) as error:
            raise ValueError(f"{path}: not a length table (lengths.npz of `mlcd-vl data check` or training; "
                             f"{error})") from None
        if not len(table.valid):
            raise ValueError(f"{path}: the length table has no usable record")
        return cls(path, table.lengths, table.has_image, table.supervised)

    @property
    def usable(self) -> np.ndarray:
        return self.lengths[self.lengths > 0]


@dataclass(frozen=True)
class MicroBatch:
    """The largest micro-batch of a rank: rows x row length positions, crops through the tower, and (from a length
    table that has them) the most supervised tokens of any micro-batch."""

    rows: int
    row_length: int
    positions: int
    crops: int
    how: str
    supervised: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _sampler(config, lengths: Lengths, world: int):
    from mlcd_vl.train.loader import make_sampler

    return make_sampler(config, lengths.lengths, lengths.has_image, world_size=world, rank=0)


def micro_batch_for(config, positions: int, rows: int, geometry: ImageGeometry, how: str,
                    supervised: int | None = None) -> MicroBatch:
    """Crops bound for a micro-batch: one image of the most crops per padded row, or images of the worst
    crops-per-token ratio filling a packed row."""
    if config.data.packing:
        crops = math.floor(positions * geometry.crops_per_token)
    else:
        crops = rows * geometry.max_crops
    return MicroBatch(rows, positions // max(rows, 1), positions, crops, how, supervised)


def _most_supervised(lengths: Lengths, batches: list[list[int]]) -> int | None:
    if lengths.supervised is None:
        return None
    return max(int(lengths.supervised[b].sum()) for b in batches)


def largest_micro_batch(config, lengths: Lengths | None, geometry: ImageGeometry, world: int) -> MicroBatch:
    """The largest micro-batch of epoch 0 (from the recipe's sampler), or the data.max_length bound."""
    if config.data.packing:
        budget = config.data.token_budget
        if lengths is None:
            return micro_batch_for(config, budget, 1, geometry, f"a packed row of data.token_budget = {budget}")
        batches = _sampler(config, lengths, world).epoch_batches()
        longest = max(int(lengths.lengths[b].sum()) for b in batches)
        return micro_batch_for(config, longest, 1, geometry, f"the fullest packed row of epoch 0 ({lengths.source})",
                               _most_supervised(lengths, batches))
    rows = config.batch.per_device_batch_size
    if lengths is None:
        width = config.data.max_length
        return micro_batch_for(config, rows * width, rows, geometry,
                               f"{rows} row(s) x data.max_length {width} (no length table: an upper bound)")
    batches = _sampler(config, lengths, world).epoch_batches()
    widest = max(batches, key=lambda b: len(b) * int(lengths.lengths[b].max()))
    width = int(lengths.lengths[widest].max())
    return micro_batch_for(config, len(widest) * width, len(widest), geometry,
                           f"{len(widest)} row(s) x {width} tokens, the widest padded batch of epoch 0 "
                           f"({lengths.source})", _most_supervised(lengths, batches))


@dataclass(frozen=True)
class RunLength:
    samples: int
    steps: int
    micro_batches_per_rank: int  # per epoch
    tokens: float  # LLM tokens of the whole run (no padding)
    tower_tokens: float
    flops: float
    how: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def run_length(config, lengths: Lengths | None, geometry: ImageGeometry, world: int, flops_model, *,
               samples: int | None = None, text_tokens: int = 256) -> RunLength | None:
    """Steps, tokens and FLOPs of the whole run; None when the number of samples is unknown."""
    from mlcd_vl.train.metrics import StepCounts

    epochs = config.optim.num_epochs
    tower_per_image = geometry.typical_crops * geometry.tokens_per_crop
    if lengths is not None:
        usable = lengths.usable
        samples = len(usable)
        micro = len(_sampler(config, lengths, world))
        per_sample_tokens = float(usable.mean())
        image_share = float(lengths.has_image[lengths.lengths > 0].mean())
        how = f"length table {lengths.source}: exact steps; tower tokens assume {TYPICAL_IMAGE[0]}x" \
              f"{TYPICAL_IMAGE[1]} images"
    else:
        samples = samples or architectures.DATASET_SAMPLES.get(config.data.train)
        if not samples:
            return None
        per_sample_tokens = geometry.typical_tokens + text_tokens
        image_share = 1.0
        if config.data.packing:
            rows = math.ceil(samples * per_sample_tokens / (config.data.token_budget * PACKING_FILL))
            micro = math.ceil(rows / world)
        else:
            micro = math.ceil(samples / (config.batch.per_device_batch_size * world))
        how = (f"no length table: {samples:,} samples of one {TYPICAL_IMAGE[0]}x{TYPICAL_IMAGE[1]} image "
               f"({geometry.typical_tokens} visual tokens) + {text_tokens} text tokens (assumed)")
    steps_per_epoch = math.ceil(micro / config.batch.grad_accum)
    steps = config.optim.max_steps or max(1, math.ceil(epochs * steps_per_epoch))
    fraction = steps / (epochs * steps_per_epoch)  # max_steps may cut (or extend) the epochs
    tokens = samples * epochs * fraction * per_sample_tokens
    tower_tokens = samples * epochs * fraction * image_share * tower_per_image
    flops = flops_model.step_flops(StepCounts(tokens=round(tokens), tower_tokens=round(tower_tokens)))
    return RunLength(samples, steps, micro, tokens, tower_tokens, flops, how)
