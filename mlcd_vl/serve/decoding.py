"""How a next token is chosen from logits, shared by the engine's decode loop and the continuous batcher.

The same arithmetic as transformers' `model.generate` (sampling path): float32 scores, the logits processors in
its order, then argmax, or softmax and one multinomial draw. Keeping it in one place is what lets our own loops
promise the tokens `model.generate` would give.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from transformers import GenerationConfig
from transformers.generation import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                     TopKLogitsWarper, TopPLogitsWarper)


def logits_processors(config: GenerationConfig) -> LogitsProcessorList:
    """The processors `model.generate` applies for this config, in its order."""
    processors = LogitsProcessorList()
    if config.repetition_penalty not in (None, 1.0):
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.do_sample:
        if config.temperature not in (None, 1.0):
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            processors.append(TopKLogitsWarper(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(config.top_p))
    return processors


def pick(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of every row of `scores` ([rows, vocab], processed): argmax or one draw per row."""
    if not do_sample:
        return scores.argmax(dim=-1)
    return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=generator).squeeze(1)


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the global sampler for this call only, leaving the global RNG state as it was."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def generator_for(seed: int, device: torch.device) -> torch.Generator:
    """A private sampler for one request: draws `seeded(seed)` would make, whatever else runs beside it."""
    return torch.Generator(device=device).manual_seed(seed)
