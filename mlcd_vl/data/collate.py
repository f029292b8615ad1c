"""Padding collator: samples -> one right-padded batch (training) or left-padded batch (generation).

A batch is a dict:

* `input_ids`, `labels` (IGNORE_INDEX on padding), `attention_mask` (1 = real token): [B, L];
* `images`: the `multimodal.ImageInput`s of the whole batch in prompt order (sample by sample), which is the order
  `multimodal.embed_inputs` fills the image tokens in;
* `record_ids` and `skipped` (the records skipped in this batch, to be counted by the main process's `ProblemLog`).

A batch without images needs no stand-in crop from here: the training forward runs a zero crop through the tower
itself (`train.step.forward_loss`), so every ZeRO-3 rank joins the same parameter gathers.

Samples arrive already truncated by the label builder, so the collator never cuts anything (upstream's collator
truncation could drop image tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlcd_vl.data.problems import SkippedRecord
from mlcd_vl.data.samples import Sample
from mlcd_vl.vocab import IGNORE_INDEX


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def split_skipped(items: list) -> tuple[list[Sample], list[SkippedRecord]]:
    samples = [item for item in items if isinstance(item, Sample)]
    return samples, [item for item in items if isinstance(item, SkippedRecord)]


@dataclass
class PaddingCollator:
    """Pads a list of `Sample`s (and drops `SkippedRecord`s) into a batch dict (module docstring)."""

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    @classmethod
    def for_model(cls, tokenizer, **kwargs) -> "PaddingCollator":
        return cls(pad_id(tokenizer), **kwargs)

    def __call__(self, items: list) -> dict:
        samples, skipped = split_skipped(items)
        width = max((s.length for s in samples), default=0)
        if self.pad_to_multiple_of and width % self.pad_to_multiple_of:
            width += self.pad_to_multiple_of - width % self.pad_to_multiple_of
        input_ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
        for row, sample in enumerate(samples):
            cols = slice(0, sample.length) if self.padding_side == "right" else slice(width - sample.length, width)
            input_ids[row, cols], labels[row, cols], attention_mask[row, cols] = sample.input_ids, sample.labels, 1
        images = [image for sample in samples for image in sample.images]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "images": images,
            "record_ids": [s.record_id for s in samples],
            "skipped": skipped,
        }
