"""The one generation engine that chat, web demo, OpenAI-style API and evaluation share.

A request is a conversation (LLaVA `from/value` or OpenAI `role/content` turns; user content is a string with
`<image>` placeholders, or a list of OpenAI-style parts). The engine

1. renders it with the checkpoint's own template (the one stored in its settings, so inference prompts equal
   training prompts; upstream's inference script built its prompt by hand and drifted),
2. tokenizes once and expands each `<image>` to exactly `multimodal.expected_tokens` image tokens, every image in
   the checkpoint's image mode (upstream's `process_images` with the config, for one image or several),
3. builds `inputs_embeds` with `multimodal.embed_inputs` (the same merge as training),
4. decodes a whole batch at once with LEFT padding (upstream padded on the right, which made batched
   generation wrong), in the one decode loop (`decode.RunningBatch`): `generate` joins its
   requests once and runs them to the end, `stream` is a batch of one, the API's continuous batcher lets rows join
   and leave between steps.

Generation settings never leak from the checkpoint's `generation_config.json` (Qwen's ships
`repetition_penalty 1.05`, `do_sample`, `temperature 0.7`...): only its stop token ids are used,
unless a setting asks for the checkpoint's value explicitly.

The loop chooses tokens with `model.generate`'s arithmetic (tested against it, greedy and seeded sampling). What
it asks of the engine is public: `inputs`, `generation_config`, `stop_rules`, `detokenize`, `finish`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from mlcd_vl.errors import UsageError
from mlcd_vl.model import multimodal, pixels
from mlcd_vl.model.build import VLMSettings
from mlcd_vl.model.templates import get_template, normalize_messages
from mlcd_vl.serve.decode import RunningBatch
from mlcd_vl.serve.requests import (EngineError, GenerationSettings, ImageSource, Prompt, Request, Result,
                                    flatten_messages, load_image_source)
from mlcd_vl.serve.stops import find_stop, first_prefix_with_stop
from mlcd_vl.vocab import expand_image_tokens


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device` checked against this machine (a CUDA device needs a visible GPU); None: cuda when there, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {device}: not a device (cpu, cuda, cuda:1, ...)") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: torch sees no CUDA GPU on this machine (use --device cpu, or "
                             "leave --device out)")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    elif chosen.type != "cpu":  # mps, xpu, ...: this torch build may lack the backend, or the machine the device
        try:
            torch.empty(0, device=chosen)
        except (RuntimeError, AssertionError):  # torch's message lists every dispatch key: not for the user
            raise UsageError(f"--device {device}: this torch build or this machine has no {chosen.type} device "
                             "(use --device cpu, or leave --device out)") from None
    return chosen


class Engine:
    """Model + tokenizer + settings, and the ways to run them: `prepare`, `generate`, `stream`, `chat`.

    The model is put in eval mode. One call at a time per engine: servers serialize calls (the API's batcher owns the
    engine in one worker thread).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: VLMSettings):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.settings = settings
        self.template = get_template(settings.template)
        self.image_token_id = model.config.image_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.checkpoint_generation_config = model.generation_config or GenerationConfig()
        self.max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, attn_implementation: str | None = None) -> "Engine":
        """Load an HF-native folder (or hub id); bf16 on CUDA and float32 on CPU unless `dtype` says otherwise."""
        from mlcd_vl.model.checkpoint import load_vlm

        device = resolve_device(device)
        model, tokenizer, settings = load_vlm(folder, dtype=dtype, device=device,
                                              attn_implementation=attn_implementation)
        return cls(model, tokenizer, settings)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---------------------------------------------------------------- prompts

    def image_input(self, source: ImageSource) -> multimodal.ImageInput:
        """One image processed in the checkpoint's image mode."""
        try:
            image = load_image_source(source)
        except pixels.ImageError as error:
            raise EngineError(str(error)) from error
        values = pixels.process_image(image, self.settings.processor, self.settings.mode)
        return multimodal.ImageInput(values, image.size, self.settings.image_mode)

    def prepare(self, request: Request | list[dict]) -> Prompt:
        """Render, tokenize once, expand every `<image>` to its visual-token count."""
        if not isinstance(request, Request):
            request = Request(list(request))
        turns, sources = flatten_messages(request)
        try:
            messages = normalize_messages(turns)
            text = self.template.render(messages, add_generation_prompt=True)
        except (ValueError, KeyError) as error:
            raise EngineError(f"cannot render the conversation with template {self.template.name!r}: {error}") \
                from error
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids.count(self.image_token_id) != len(sources):  # checked before any image is decoded
            raise EngineError(f"the rendered prompt has {ids.count(self.image_token_id)} <image> token(s) for "
                              f"{len(sources)} image(s)")
        images = [self.image_input(source) for source in sources]
        counts = [multimodal.expected_tokens(image, self.settings) for image in images]
        expanded = expand_image_tokens(ids, self.image_token_id, counts)[0].tolist()
        if self.max_positions and len(expanded) >= self.max_positions:
            raise EngineError(f"the prompt has {len(expanded)} tokens; the model holds {self.max_positions}")
        return Prompt(text, expanded, images)

    def inputs(self, prompts: list[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """The left-padded attention mask and the merged `inputs_embeds` of a batch of prompts."""
        length = max(len(p.input_ids) for p in prompts)
        ids = torch.full((len(prompts), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, length - len(prompt.input_ids):] = torch.tensor(prompt.input_ids)
            mask[row, length - len(prompt.input_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        images = [replace(image, pixels=image.pixels.to(self.device)) for p in prompts for image in p.images]
        with torch.inference_mode():
            embeds = multimodal.embed_inputs(self.model, self.settings, ids, images)
        return mask, embeds

    # ---------------------------------------------------------------- settings

    def stop_rules(self, settings: GenerationSettings) -> tuple[list[int], list[str]]:
        """(stop token ids, stop strings): the checkpoint's EOS ids, the template's and the user's stop strings;
        a stop string that is one special token becomes a stop id (special tokens never reach the text)."""
        eos = self.checkpoint_generation_config.eos_token_id
        ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        strings = []
        special = set(self.tokenizer.all_special_tokens) | {
            t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
        for stop in (*self.template.stop_strings, *settings.stop):
            if not stop:
                continue
            if stop in special:
                ids.append(self.tokenizer.convert_tokens_to_ids(stop))
            elif stop not in strings:
                strings.append(stop)
        return list(dict.fromkeys(ids)), strings

    def generation_config(self, settings: GenerationSettings) -> GenerationConfig:
        """A fresh GenerationConfig: only the checkpoint's token ids are inherited, every decoding value is ours."""
        penalty = settings.repetition_penalty
        if penalty is None:
            penalty = self.checkpoint_generation_config.repetition_penalty or 1.0
        stop_ids, stop_strings = self.stop_rules(settings)
        sampling = dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p,
                        top_k=settings.top_k) if not settings.greedy else dict(do_sample=False)
        return GenerationConfig(
            max_new_tokens=settings.max_new_tokens, num_beams=1, repetition_penalty=penalty,
            eos_token_id=stop_ids, stop_strings=stop_strings or None, pad_token_id=self.pad_token_id,
            bos_token_id=self.checkpoint_generation_config.bos_token_id, use_cache=True, **sampling)

    # ---------------------------------------------------------------- generation

    def generate(self, requests: list[Request | Prompt | list[dict]] | Request,
                 settings: GenerationSettings | None = None) -> list[Result]:
        """Answer a batch of requests together, left-padded (greedy results equal batch-1 results). Items may be
        prompts that `prepare` already made (servers prepare first to reject bad requests alone)."""
        if isinstance(requests, Request):
            requests = [requests]
        settings = settings or GenerationSettings()
        prompts = [request if isinstance(request, Prompt) else self.prepare(request) for request in requests]
        batch = RunningBatch(self, use_cache=settings.use_cache, splice=False)  # joined once: static scheduling
        sequences = [batch.sequence(index, prompt, settings, show=False) for index, prompt in enumerate(prompts)]
        results = {update.sequence.key: update.result for update in batch.run(sequences) if update.result}
        return [results[index] for index in range(len(prompts))]

    def chat(self, messages: list[dict], images: list[ImageSource] | None = None,
             settings: GenerationSettings | None = None) -> Result:
        """One conversation, one answer."""
        return self.generate([Request(messages, list(images or []))], settings)[0]

    def stream(self, request: Request | Prompt | list[dict],
               settings: GenerationSettings | None = None) -> "TextStream":
        """Iterate over the answer's text pieces as they are decoded; `.result` holds the final `Result`."""
        if not isinstance(request, (Request, Prompt)):
            request = Request(list(request))
        return TextStream(self, request, settings or GenerationSettings())

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def finish(self, prompt: Prompt, row: list[int], config: GenerationConfig, stop_strings: list[str]) -> Result:
        """Cut a generated row at its first stop token or stop string; count the tokens actually generated."""
        stop_ids = set(config.eos_token_id)
        end = next((i for i, token in enumerate(row) if token in stop_ids), None)
        ids = row[:end] if end is not None else list(row)
        reason, count = ("stop", end + 1) if end is not None else ("length", len(ids))
        text = self.detokenize(ids)
        cut = find_stop(text, stop_strings)
        if cut is not None:
            text, reason = text[:cut], "stop"
            count = first_prefix_with_stop(ids, lambda part: find_stop(self.detokenize(part), stop_strings) is not None)
            ids = ids[:count]
        return Result(text=text, prompt_tokens=len(prompt.input_ids), completion_tokens=count,
                      finish_reason=reason, token_ids=ids)


class TextStream:
    """Text pieces of one answer as they are decoded (a running batch of one); `.result` after iteration."""

    def __init__(self, engine: Engine, request: Request | Prompt, settings: GenerationSettings):
        self.engine, self.request, self.settings = engine, request, settings
        self.result: Result | None = None

    def __iter__(self) -> Iterator[str]:
        engine, settings = self.engine, self.settings
        prompt = self.request if isinstance(self.request, Prompt) else engine.prepare(self.request)
        batch = RunningBatch(engine, use_cache=settings.use_cache, splice=False)
        for update in batch.run([batch.sequence(None, prompt, settings, show=True)]):
            self.result = update.result or self.result
            if update.piece:
                yield update.piece

    def text(self) -> str:
        """Run to the end and return the whole answer."""
        return "".join(self)


def as_settings(**overrides: Any) -> GenerationSettings:
    """GenerationSettings from keyword arguments, ignoring the ones left as None (handy for CLIs and APIs)."""
    return GenerationSettings(**{k: v for k, v in overrides.items() if v is not None})
