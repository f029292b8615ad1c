"""The running batch of continuous (iteration-level) batching: sequences that decode together one token per step,
joining and leaving between steps.

State: one `DynamicCache` whose batch rows are the running sequences, a 2D attention mask over all of its columns,
and each row's next position id. Every row is LEFT-aligned padding then real tokens, so

- `join` prefills the new prompts together (left-padded, images merged by `Engine._batch`), chooses their first
  tokens, and pastes their cache rows under the running ones after left-padding the shorter side with masked zero
  columns;
- `step` feeds every row's last chosen token: the mask gains one column of ones, position ids are per row (the count
  of its real tokens, what `cumsum(mask) - 1` gives), so Qwen2's rotary positions ignore the padding;
- a finished or `leave`-ing row is dropped from the cache at once, and columns that became padding in every remaining
  row are cut off the left.

Each sequence keeps its own decoding: stop ids and strings, `max_new_tokens`, temperature / top-k / top-p and
repetition penalty (over its own generated tokens, as `Engine.generate` does), and, when it has a `seed`, a private
`torch.Generator`, so its draws do not depend on its neighbours. Results come from `Engine._finish`, the same cut as
`Engine.generate`; greedy rows give the tokens the request gets alone (float32; tested), up to float rounding of a
different batch shape, which the engine's static batching shares.

Only caches made of plain `DynamicLayer`s are supported (`supported(engine)`); sliding-window or quantized caches
are served by the batcher's static path instead. Single-threaded: the batcher's worker thread owns it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.generation import LogitsProcessorList

from mlcd_vl.serve import decoding
from mlcd_vl.serve.engine import Engine
from mlcd_vl.serve.pieces import TextPieces
from mlcd_vl.serve.requests import GenerationSettings, Prompt, Result


def new_cache(engine: Engine) -> DynamicCache:
    return DynamicCache(config=engine.model.config.get_text_config())


def supported(engine: Engine) -> bool:
    """Whether this model's KV cache is one the running batch knows how to cut and paste."""
    layers = new_cache(engine).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


@dataclass
class Sequence:
    """One running request: its prompt, its own decoding rules, and the tokens it has produced."""

    key: Any  # the caller's handle (the batcher's Job)
    prompt: Prompt
    config: GenerationConfig
    stop_strings: list[str]
    processors: LogitsProcessorList
    pieces: TextPieces
    generator: torch.Generator | None = None
    pending: int = -1  # the last chosen token: fed to the model at the next step

    @property
    def generated(self) -> list[int]:
        return self.pieces.ids


@dataclass
class Update:
    """What one sequence produced in a step: newly settled text, and its `Result` if it finished (and left)."""

    sequence: Sequence
    piece: str = ""
    result: Result | None = None


@dataclass
class RunningBatch:
    """The running sequences and their shared KV cache (rows in `sequences` order); see the module docstring."""

    engine: Engine
    sequences: list[Sequence] = field(default_factory=list)
    cache: DynamicCache | None = None
    mask: torch.Tensor | None = None  # [rows, cache columns]; 1 = a real token
    positions: torch.Tensor | None = None  # [rows]: the position id of each row's pending token

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def width(self) -> int:
        """Cache columns (padding included)."""
        return 0 if self.mask is None else self.mask.shape[1]

    def sequence(self, key: Any, prompt: Prompt, settings: GenerationSettings, show: bool) -> Sequence:
        """A sequence ready to `join`, with the rules `Engine.generate` would use for `settings`; `show`: stream."""
        engine = self.engine
        config = engine.generation_config(settings)
        stop_ids, stop_strings = engine.stop_rules(settings)
        generator = decoding.generator_for(settings.seed, engine.device) if settings.seed is not None else None
        return Sequence(key, prompt, config, stop_strings, engine.logits_processors(config),
                        TextPieces(engine._text, stop_ids, stop_strings, show), generator)

    # ---------------------------------------------------------------- joining, stepping, leaving

    @torch.inference_mode()
    def join(self, sequences: list[Sequence]) -> list[Update]:
        """Prefill new sequences in one left-padded forward, merge them into the batch; their first tokens."""
        if not sequences:
            return []
        engine = self.engine
        _, mask, embeds = engine._batch([s.prompt for s in sequences])
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = new_cache(engine)
        output = engine.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
                              use_cache=True, logits_to_keep=1)
        tokens = self._choose(sequences, output.logits[:, -1, :])
        # everything that may fail is done: only now does the running batch change
        self._merge(sequences, cache, mask, mask.sum(-1))
        first = len(self.sequences) - len(sequences)
        return self._advance(range(first, len(self.sequences)), tokens)

    @torch.inference_mode()
    def step(self) -> list[Update]:
        """One decode step of every running sequence."""
        if not self.sequences:
            return []
        engine = self.engine
        fed = torch.tensor([[s.pending] for s in self.sequences], device=engine.device)
        mask = torch.cat([self.mask, self.mask.new_ones((len(self), 1))], dim=1)
        embeds = engine.model.get_input_embeddings()(fed)
        output = engine.model(inputs_embeds=embeds, attention_mask=mask, position_ids=self.positions[:, None],
                              cache=self.cache, use_cache=True, logits_to_keep=1)
        tokens = self._choose(self.sequences, output.logits[:, -1, :])
        self.mask, self.positions = mask, self.positions + 1
        return self._advance(range(len(self.sequences)), tokens)

    @torch.inference_mode()
    def leave(self, keys: list[Any]) -> None:
        """Drop these sequences now (a cancelled request); the others go on."""
        gone = {id(key) for key in keys}
        self._keep([i for i, s in enumerate(self.sequences) if id(s.key) not in gone])

    # ---------------------------------------------------------------- internals

    def _choose(self, sequences: list[Sequence], logits: torch.Tensor) -> list[int]:
        """Each row's next token under its own rules (plain greedy rows share one argmax)."""
        scores = logits.to(dtype=torch.float32)
        tokens = scores.argmax(dim=-1)
        for row, sequence in enumerate(sequences):
            if sequence.processors or sequence.config.do_sample:
                generated = torch.tensor([sequence.generated], dtype=torch.long, device=scores.device)
                processed = sequence.processors(generated, scores[row:row + 1])
                tokens[row] = decoding.pick(processed, sequence.config.do_sample, sequence.generator)[0]
        return tokens.tolist()

    def _advance(self, rows: range, tokens: list[int]) -> list[Update]:
        """Record each row's new token; finished rows get their `Result` and leave the batch."""
        updates, finished = [], []
        for row, token in zip(rows, tokens):
            sequence = self.sequences[row]
            update = Update(sequence, sequence.pieces.add(token))
            sequence.pending = token
            if sequence.pieces.ended or len(sequence.generated) >= sequence.config.max_new_tokens:
                update.result = self.engine._finish(sequence.prompt, sequence.generated, sequence.config,
                                                    sequence.stop_strings)
                update.piece += sequence.pieces.rest(update.result.text)
                finished.append(row)
            updates.append(update)
        if finished:
            self._keep([i for i in range(len(self.sequences)) if i not in finished])
        return updates

    def _merge(self, sequences: list[Sequence], cache: DynamicCache, mask: torch.Tensor,
               positions: torch.Tensor) -> None:
        if not self.sequences:
            self.sequences, self.cache, self.mask, self.positions = list(sequences), cache, mask, positions
            return
        width = max(self.width, mask.shape[1])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, width, 2), _pad_left(new.keys, width, 2)])
            old.values = torch.cat([_pad_left(old.values, width, 2), _pad_left(new.values, width, 2)])
        self.positions = torch.cat([self.positions, positions])
        self.sequences += sequences

    def _keep(self, rows: list[int]) -> None:
        """Keep only these rows, then cut the columns that are padding in every remaining row."""
        if len(rows) == len(self.sequences):
            return
        self.sequences = [self.sequences[i] for i in rows]
        if not rows:
            self.cache = self.mask = self.positions = None
            return
        index = torch.tensor(rows, device=self.mask.device)
        self.mask, self.positions = self.mask[index], self.positions[index]
        # padding is always a prefix of a row, so the all-padding columns are a prefix of the batch
        start = int(self.mask.any(dim=0).int().argmax())
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros in front of `dim` up to `width` (masked columns: their keys and values are never attended)."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0]
    return F.pad(tensor, pad)
