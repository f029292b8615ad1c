"""The one decode loop: sequences that decode together one token per step, joining and leaving between steps.

`Engine.generate` (a batch joined once, run to the end), `Engine.stream` (a batch of one) and the API server's
continuous batcher (rows that join and leave between steps) all run a `RunningBatch`. Token choice is
transformers' `model.generate` arithmetic (sampling path): float32 scores of the last position, the logits
processors in its order, then argmax, or softmax and one multinomial draw; the tests compare with `model.generate`.

State: one KV cache whose batch rows are the running sequences, a 2D attention mask over all of its columns, and
each row's next position id. Every row is LEFT-aligned padding then real tokens, so

- `join` prefills the new prompts together (left-padded, images merged by `Engine.inputs`), chooses their first
  tokens, and (with `splice`) pastes their cache rows under the running ones after left-padding the shorter side
  with masked zero columns;
- `step` feeds every row's last chosen token: the mask gains one column of ones, position ids are per row (the count
  of its real tokens, what `cumsum(mask) - 1` gives), so Qwen2's rotary positions ignore the padding;
- with `splice`, a finished or `leave`-ing row is dropped from the cache at once, and columns that became padding in
  every remaining row are cut off the left. Without it (a batch joined once, or a cache that cannot be cut row by
  row: `supported`), finished rows stay until the last one finishes, as in `model.generate`.

`use_cache=False` keeps the embeddings instead of a cache and runs the whole sequence at every step (a check of the
cached path). Each sequence keeps its own decoding: stop ids and strings, `max_new_tokens`, temperature / top-k /
top-p and repetition penalty (over its own generated tokens), and, when it has a `seed`, a private
`torch.Generator`, so its draws do not depend on its neighbours. Results come from `Engine.finish`.

What the loop needs of an engine is narrow and public: `model`, `device`, `inputs`, `generation_config`,
`stop_rules`, `detokenize` and `finish` (`serve.engine.Engine`). Single-threaded: one caller owns a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.generation import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                     TopKLogitsWarper, TopPLogitsWarper)

from mlcd_vl.serve.requests import GenerationSettings, Prompt, Result
from mlcd_vl.serve.stops import TextPieces


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


def new_cache(engine) -> DynamicCache:
    return DynamicCache(config=engine.model.config.get_text_config())


def supported(engine) -> bool:
    """Whether this model's KV cache is one the running batch knows how to cut and paste row by row."""
    layers = new_cache(engine).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


@dataclass
class Sequence:
    """One running request: its prompt, its own decoding rules, and the tokens it has produced."""

    key: Any  # the caller's handle (the batcher's Job, a request's index)
    prompt: Prompt
    config: GenerationConfig
    stop_strings: list[str]
    processors: LogitsProcessorList
    pieces: TextPieces
    generator: torch.Generator | None = None
    pending: int = -1  # the last chosen token: fed to the model at the next step
    done: bool = False

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
    """The running sequences and their shared state (rows in `sequences` order); see the module docstring."""

    engine: Any
    use_cache: bool = True
    splice: bool = True  # rows join a running batch and leave it at once (needs a `supported` cache)
    sequences: list[Sequence] = field(default_factory=list)
    cache: DynamicCache | None = None
    embeds: torch.Tensor | None = None  # [rows, columns, hidden]: what is fed again at every step without a cache
    mask: torch.Tensor | None = None  # [rows, columns]; 1 = a real token
    positions: torch.Tensor | None = None  # [rows]: the position id of each row's pending token

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def width(self) -> int:
        """Columns (padding included)."""
        return 0 if self.mask is None else self.mask.shape[1]

    def sequence(self, key: Any, prompt: Prompt, settings: GenerationSettings, show: bool) -> Sequence:
        """A sequence ready to `join`, with the engine's rules for `settings`; `show`: stream its text."""
        engine = self.engine
        config = engine.generation_config(settings)
        stop_ids, stop_strings = engine.stop_rules(settings)
        generator = None
        if settings.seed is not None:  # the draws `torch.manual_seed(seed)` would give, whatever runs beside it
            generator = torch.Generator(device=engine.device).manual_seed(settings.seed)
        return Sequence(key, prompt, config, stop_strings, logits_processors(config),
                        TextPieces(engine.detokenize, stop_ids, stop_strings, show), generator)

    def run(self, sequences: list[Sequence]) -> Iterator[Update]:
        """Join `sequences` and step until every row has finished, yielding each step's updates."""
        updates = self.join(sequences)
        while True:
            yield from updates
            if not self.sequences:
                return
            updates = self.step()

    # ---------------------------------------------------------------- joining, stepping, leaving

    @torch.inference_mode()
    def join(self, sequences: list[Sequence]) -> list[Update]:
        """Prefill new sequences in one left-padded forward, merge them into the batch; their first tokens."""
        if not sequences:
            return []
        if self.sequences and not self.splice:
            raise RuntimeError("rows can only join this batch when it is empty (splice=False)")
        engine = self.engine
        mask, embeds = engine.inputs([s.prompt for s in sequences])
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = new_cache(engine) if self.use_cache else None
        output = engine.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
                              use_cache=self.use_cache, logits_to_keep=1)
        tokens = self._choose(sequences, output.logits[:, -1, :])
        # everything that may fail is done: only now does the running batch change
        self._merge(sequences, cache, None if self.use_cache else embeds, mask, mask.sum(-1))
        first = len(self.sequences) - len(sequences)
        return self._advance(range(first, len(self.sequences)), tokens)

    @torch.inference_mode()
    def step(self) -> list[Update]:
        """One decode step of every running sequence."""
        if not self.sequences:
            return []
        model = self.engine.model
        fed = model.get_input_embeddings()(torch.tensor([[s.pending] for s in self.sequences], device=self.mask.device))
        mask = torch.cat([self.mask, self.mask.new_ones((len(self), 1))], dim=1)
        if self.use_cache:
            output = model(inputs_embeds=fed, attention_mask=mask, position_ids=self.positions[:, None],
                           cache=self.cache, use_cache=True, logits_to_keep=1)
        else:
            self.embeds = torch.cat([self.embeds, fed.to(self.embeds.dtype)], dim=1)
            output = model(inputs_embeds=self.embeds, attention_mask=mask,
                           position_ids=(mask.cumsum(-1) - 1).masked_fill(mask == 0, 0), use_cache=False,
                           logits_to_keep=1)
        self.mask, self.positions = mask, self.positions + 1
        live = [row for row, sequence in enumerate(self.sequences) if not sequence.done]
        tokens = self._choose([self.sequences[row] for row in live], output.logits[live, -1, :])
        return self._advance(live, tokens)

    @torch.inference_mode()
    def leave(self, keys: list[Any]) -> None:
        """Drop these sequences now (a cancelled request); the others go on."""
        gone = {id(key) for key in keys}
        for sequence in self.sequences:
            sequence.done = sequence.done or id(sequence.key) in gone
        self._drop_done()

    # ---------------------------------------------------------------- internals

    def _choose(self, sequences: list[Sequence], logits: torch.Tensor) -> list[int]:
        """Each row's next token under its own rules (plain greedy rows share one argmax)."""
        scores = logits.to(dtype=torch.float32)
        tokens = scores.argmax(dim=-1)
        for row, sequence in enumerate(sequences):
            if sequence.processors or sequence.config.do_sample:
                generated = torch.tensor([sequence.generated], dtype=torch.long, device=scores.device)
                processed = sequence.processors(generated, scores[row:row + 1])
                tokens[row] = pick(processed, sequence.config.do_sample, sequence.generator)[0]
        return tokens.tolist()

    def _advance(self, rows, tokens: list[int]) -> list[Update]:
        """Record each row's new token; finished rows get their `Result` (and leave the batch, when it splices)."""
        updates, finished = [], False
        for row, token in zip(rows, tokens):
            sequence = self.sequences[row]
            update = Update(sequence, sequence.pieces.add(token))
            sequence.pending = token
            if sequence.pieces.ended or len(sequence.generated) >= sequence.config.max_new_tokens:
                update.result = self.engine.finish(sequence.prompt, sequence.generated, sequence.config,
                                                   sequence.stop_strings)
                update.piece += sequence.pieces.rest(update.result.text)
                sequence.done = finished = True
            updates.append(update)
        if finished:
            self._drop_done()
        return updates

    def _drop_done(self) -> None:
        if self.splice or all(sequence.done for sequence in self.sequences):
            self._keep([row for row, sequence in enumerate(self.sequences) if not sequence.done])

    def _rows(self) -> list[tuple[Any, str, int]]:
        """(holder, attribute, column dim) of every per-row tensor with columns: mask, embeddings, cache layers."""
        rows = [(self, "mask", 1)] + ([(self, "embeds", 1)] if self.embeds is not None else [])
        layers = self.cache.layers if self.cache is not None else []
        return rows + [(layer, name, 2) for layer in layers for name in ("keys", "values")]

    def _merge(self, sequences: list[Sequence], cache: DynamicCache | None, embeds: torch.Tensor | None,
               mask: torch.Tensor, positions: torch.Tensor) -> None:
        if not self.sequences:
            self.sequences, self.cache, self.embeds = list(sequences), cache, embeds
            self.mask, self.positions = mask, positions
            return
        width = max(self.width, mask.shape[1])
        new = RunningBatch(self.engine, cache=cache, embeds=embeds, mask=mask)
        for (holder, name, dim), (other, _, _) in zip(self._rows(), new._rows(), strict=True):
            setattr(holder, name, torch.cat([_pad_left(getattr(holder, name), width, dim),
                                             _pad_left(getattr(other, name), width, dim)]))
        self.positions = torch.cat([self.positions, positions])
        self.sequences += sequences

    def _keep(self, rows: list[int]) -> None:
        """Keep only these rows, then cut the columns that are padding in every remaining row."""
        if len(rows) == len(self.sequences):
            return
        self.sequences = [self.sequences[i] for i in rows]
        if not rows:
            self.cache = self.embeds = self.mask = self.positions = None
            return
        index = torch.tensor(rows, device=self.mask.device)
        self.positions = self.positions[index]
        # padding is always a prefix of a row, so the all-padding columns are a prefix of the batch
        start, width = int(self.mask[index].any(dim=0).int().argmax()), self.width
        for holder, name, dim in self._rows():
            setattr(holder, name, getattr(holder, name)[index].narrow(dim, start, width - start))


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros in front of `dim` up to `width` (masked columns: their keys and values are never attended)."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0]
    return F.pad(tensor, pad)
