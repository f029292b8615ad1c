"""Packing: several samples in one row, with no attention (and no loss) across sample boundaries.

`first_fit_decreasing` plans which samples share a row under a token budget; `PackingCollator` builds the row:

* `input_ids`, `labels` [1, T]: samples one after another; the first label of every sample is IGNORE_INDEX, so the
  shifted loss never asks the last token of one sample to predict the next sample's first token;
* `position_ids` [1, T]: restarting at 0 for every sample;
* `cu_seqlens` (int32, [n + 1]), `seq_lengths`, `max_seqlen`: the boundaries flash-attention's varlen path (GPU)
  and `sdpa_varlen` (`model.varlen`, any device) use; `model_kwargs` turns them into transformers'
  `cu_seq_lens_q/k`, `max_length_q/k`;
* `attention_mask`: for plain SDPA / eager, a 4D block-diagonal causal *additive float* mask [1, 1, T, T] (0 = attend,
  dtype-min = blocked). Restarting position ids alone does not isolate samples with SDPA or eager, and a bool 4D
  mask gives wrong results with eager (transformers 5). It is O(T^2) memory, so it is built only when asked for;
* `images` in prompt order, `record_ids` and `skipped` as in `collate.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mlcd_vl.data.collate import pad_id, split_skipped
from mlcd_vl.model.varlen import MASK_FREE_IMPLEMENTATIONS
from mlcd_vl.vocab import IGNORE_INDEX


def first_fit_decreasing(lengths: list[int] | np.ndarray, budget: int) -> list[list[int]]:
    """Bins of positions into `lengths`, each summing to <= budget (a longer item gets a bin of its own, last).

    Items are placed longest first (ties in input order) into the first bin with room. A max segment tree over
    the free space of n potential bins, all starting empty, finds that bin in O(log n): unopened bins are full-size
    and lie right of the opened ones, so the leftmost bin with room is the first fit or the next new bin.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable").tolist()
    size = 1
    while size < len(lengths):
        size *= 2
    tree = [int(budget)] * (2 * size)
    bins: list[list[int]] = []
    oversize: list[list[int]] = []
    for item in order:
        need = int(lengths[item])
        if need > budget:
            oversize.append([item])
            continue
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        slot = node - size
        if slot == len(bins):
            bins.append([])
        bins[slot].append(item)
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins + oversize


def block_causal_mask(segments, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, 1, L, L] additive mask (0 = may attend, dtype-min = blocked), causal inside each sample.

    `segments` is either a list of sample lengths (one packed row with no padding: [1, 1, T, T]) or a [B, L] tensor
    of sample numbers (1, 2, ... per packed sample, 0 = padding). A token attends to earlier tokens of its own
    sample only; padding attends to itself only, so no row of the mask is empty. The one mask builder of the
    project.
    """
    if torch.is_tensor(segments):
        segment_ids = segments
    else:
        lengths = torch.tensor([int(n) for n in segments], dtype=torch.long)
        segment_ids = torch.repeat_interleave(torch.arange(1, len(lengths) + 1), lengths)[None]
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    padding = segment_ids == 0
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal & ~padding[:, :, None]
    allowed |= torch.eye(length, dtype=torch.bool, device=segment_ids.device) & padding[:, :, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


@dataclass
class PackingCollator:
    """A micro-batch plan (list of samples) -> one packed row (module docstring)."""

    pad_token_id: int
    build_4d_mask: bool = True  # False with flash-attention or sdpa_varlen (model.varlen.MASK_FREE_IMPLEMENTATIONS)
    mask_dtype: torch.dtype = torch.float32  # the model's compute dtype

    @classmethod
    def for_model(cls, tokenizer, **kwargs) -> "PackingCollator":
        return cls(pad_id(tokenizer), **kwargs)

    def __call__(self, items: list) -> dict:
        samples, skipped = split_skipped(items)
        seq_lengths = [s.length for s in samples]
        labels = [s.labels.clone() for s in samples]
        for label in labels:
            label[0] = IGNORE_INDEX
        cat = (lambda parts: torch.cat(parts)[None]) if samples else (lambda parts: torch.zeros(1, 0, dtype=torch.long))
        images = [image for sample in samples for image in sample.images]
        cu_seqlens = torch.zeros(len(samples) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.cumsum(torch.tensor(seq_lengths, dtype=torch.int32), 0)
        return {
            "input_ids": cat([s.input_ids for s in samples]),
            "labels": cat(labels),
            "position_ids": cat([torch.arange(n) for n in seq_lengths]),
            "cu_seqlens": cu_seqlens,
            "seq_lengths": seq_lengths,
            "max_seqlen": max(seq_lengths, default=0),
            "attention_mask": block_causal_mask(seq_lengths, self.mask_dtype) if self.build_4d_mask else None,
            "images": images,
            "record_ids": [s.record_id for s in samples],
            "skipped": skipped,
        }


def model_kwargs(batch: dict, attn_implementation: str) -> dict:
    """Attention arguments for a packed batch: varlen boundaries for flash-attention / sdpa_varlen, else the mask."""
    kwargs = {"position_ids": batch["position_ids"]}
    if attn_implementation in MASK_FREE_IMPLEMENTATIONS:
        cu = batch["cu_seqlens"]
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch["max_seqlen"],
                      max_length_k=batch["max_seqlen"])
    else:
        if batch["attention_mask"] is None:
            raise ValueError(f"packed rows need the 4D mask with {attn_implementation!r} attention "
                             "(PackingCollator(build_4d_mask=True))")
        kwargs["attention_mask"] = batch["attention_mask"]
    return kwargs
