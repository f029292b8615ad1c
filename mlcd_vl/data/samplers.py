"""Batch samplers: length/modality grouping (upstream's algorithm) and packing, sharded, seeded, resumable.

Both yield this rank's micro-batches as lists of dataset indices (`DataLoader(batch_sampler=...)`), computed from a
`dataset.LengthTable` of exact token counts (records skipped by the scan never appear):

* `LengthGroupedBatchSampler`: upstream's `LengthGroupedSampler` (`llava_trainer.py`): random permutation ->
  megabatches of world*accum*batch -> sorted by length -> split into world*accum chunks of balanced total length;
  with `group_by_modality`, image and text-only records are grouped separately and megabatches shuffled, the mixed
  remainder last. Upstream's key bug is gone: modality comes from the processed samples (has images), not from an
  `images` key, and every random draw uses this sampler's generator (upstream drew the per-modality shuffles from
  the global RNG). Consecutive batches go round-robin to ranks, as accelerate deals them.
* `PackedBatchSampler`: shuffled windows of records, each packed first-fit-decreasing into rows of at most
  `token_budget` tokens; rows are shuffled and dealt round-robin to ranks.
* `order_file.FixedOrderBatchSampler`: a listed order of micro-batches (`data.order_file`), replayed as is.

Order depends only on (seed, epoch), so every rank computes the same global plan and takes its share. Every rank
gets the same number of batches (the plan is padded by repeating its first batches, or cut with `drop_last`).
`state_dict()` / `load_state_dict()` save and restore the epoch and position; pass `consumed` when a DataLoader
prefetches ahead of what the trainer has actually used.
"""

from __future__ import annotations

import numpy as np
import torch

from mlcd_vl.data.packing import first_fit_decreasing


def split_to_even_chunks(indices: list[int], lengths, num_chunks: int) -> list[list[int]]:
    """Upstream: greedy balance of summed length over chunks of equal count (strided if not divisible)."""
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def length_grouped_indices(lengths, batch_size: int, world_size: int, generator: torch.Generator) -> list[int]:
    """Upstream `get_length_grouped_indices` (positions into `lengths`, all positive)."""
    indices = torch.randperm(len(lengths), generator=generator).tolist()
    size = world_size * batch_size
    megabatches = [sorted(indices[i:i + size], key=lambda j: lengths[j], reverse=True)
                   for i in range(0, len(indices), size)]
    return [i for mb in megabatches for chunk in split_to_even_chunks(mb, lengths, world_size) for i in chunk]


def modality_length_grouped_indices(lengths, has_image, batch_size: int, world_size: int,
                                    generator: torch.Generator) -> list[int]:
    """Upstream `get_modality_length_grouped_indices`, driven by `has_image` instead of the length's sign."""
    image = [i for i in range(len(lengths)) if has_image[i]]
    text = [i for i in range(len(lengths)) if not has_image[i]]
    if not image or not text:
        return length_grouped_indices(lengths, batch_size, world_size, generator)
    size = world_size * batch_size
    groups = []
    for members in (image, text):
        order = length_grouped_indices([lengths[i] for i in members], batch_size, world_size, generator)
        shuffled = [members[i] for i in order]
        groups.append([shuffled[i:i + size] for i in range(0, len(shuffled), size)])
    remainder = groups[0][-1] + groups[1][-1]
    megabatches = groups[0][:-1] + groups[1][:-1]
    megabatches = [megabatches[i] for i in torch.randperm(len(megabatches), generator=generator).tolist()]
    if remainder:
        megabatches.append(sorted(remainder))
    return [i for mb in megabatches for i in mb]


class ShardedBatchSampler:
    """Shared machinery: a global plan per epoch, this rank's round-robin share, resumable position."""

    order_sha256: str | None = None  # set by a sampler replaying a fixed order (`order_file`); checked on resume

    def __init__(self, world_size: int = 1, rank: int = 0, seed: int = 0, drop_last: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.world_size, self.rank, self.seed, self.drop_last = world_size, rank, seed, drop_last
        self.epoch, self.position = 0, 0
        self._plan: tuple[int, list[list[int]]] | None = None

    def global_batches(self, generator: torch.Generator) -> list[list[int]]:
        raise NotImplementedError

    def epoch_batches(self) -> list[list[int]]:
        """The global plan of the current epoch: every rank's batches, before the round-robin share."""
        return self.global_batches(torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))

    def rank_batches(self) -> list[list[int]]:
        if self._plan is not None and self._plan[0] == self.epoch:
            return self._plan[1]
        batches = self.epoch_batches()
        extra = len(batches) % self.world_size
        if extra and self.drop_last:
            batches = batches[:len(batches) - extra]
        elif extra:
            batches = batches + batches[:self.world_size - extra]
        self._plan = (self.epoch, batches[self.rank::self.world_size])
        return self._plan[1]

    def __len__(self) -> int:
        return len(self.rank_batches())

    def __iter__(self):
        batches = self.rank_batches()
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self, consumed: int | None = None) -> dict:
        """Epoch and batches done on this rank (`consumed` overrides what the sampler has yielded so far)."""
        state = {"epoch": self.epoch, "position": self.position if consumed is None else consumed,
                 "seed": self.seed, "world_size": self.world_size}
        return state | ({"order_sha256": self.order_sha256} if self.order_sha256 else {})

    def load_state_dict(self, state: dict) -> None:
        if state.get("world_size", self.world_size) != self.world_size or state.get("seed", self.seed) != self.seed:
            raise ValueError("sampler state was saved with another world size or seed; the order would differ")
        if state.get("order_sha256") != self.order_sha256:
            raise ValueError("sampler state was saved with another data.order_file (or with none, or without one "
                             "where this run has one); the order would differ")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class LengthGroupedBatchSampler(ShardedBatchSampler):
    """Upstream's length (and modality) grouping over exact token counts; `batch_size` is per device."""

    def __init__(self, lengths: np.ndarray, has_image: np.ndarray, batch_size: int, *, world_size: int = 1,
                 rank: int = 0, grad_accum: int = 1, group_by_modality: bool = True, seed: int = 0,
                 drop_last: bool = False):
        super().__init__(world_size, rank, seed, drop_last)
        self.valid = np.flatnonzero(np.asarray(lengths) > 0)
        self.lengths = np.asarray(lengths)[self.valid].tolist()
        self.has_image = np.asarray(has_image, dtype=bool)[self.valid].tolist()
        self.batch_size, self.grad_accum, self.group_by_modality = batch_size, grad_accum, group_by_modality

    def global_batches(self, generator: torch.Generator) -> list[list[int]]:
        groups = self.world_size * self.grad_accum  # upstream passes world_size * grad_accum
        if self.group_by_modality:
            order = modality_length_grouped_indices(self.lengths, self.has_image, self.batch_size, groups, generator)
        else:
            order = length_grouped_indices(self.lengths, self.batch_size, groups, generator)
        order = [int(self.valid[i]) for i in order]
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]


class PackedBatchSampler(ShardedBatchSampler):
    """Rows of at most `token_budget` tokens, packed first-fit-decreasing inside shuffled windows of records."""

    def __init__(self, lengths: np.ndarray, token_budget: int, *, window: int = 4096, world_size: int = 1,
                 rank: int = 0, seed: int = 0, drop_last: bool = False):
        super().__init__(world_size, rank, seed, drop_last)
        self.valid = np.flatnonzero(np.asarray(lengths) > 0)
        self.lengths = np.asarray(lengths)[self.valid]
        self.token_budget, self.window = token_budget, window

    def global_batches(self, generator: torch.Generator) -> list[list[int]]:
        order = torch.randperm(len(self.valid), generator=generator).numpy()
        rows = []
        for start in range(0, len(order), self.window):
            members = order[start:start + self.window]
            for row in first_fit_decreasing(self.lengths[members], self.token_budget):
                rows.append([int(self.valid[members[i]]) for i in row])
        return [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
