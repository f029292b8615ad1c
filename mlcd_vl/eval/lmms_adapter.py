"""`mlcd_llava`: an lmms-eval 0.7.3 "simple" model that answers through our generation engine.

    python -m lmms_eval --model mlcd_llava --model_args pretrained=/path/to/checkpoint --tasks chartqa ...
    accelerate launch --num_processes 8 -m lmms_eval --model mlcd_llava ...   # data parallel

What it does with each `generate_until` request `(context, gen_kwargs, doc_to_visual, doc_id, task, split)`:

* images: `doc_to_visual(doc)`, all of them in order (MMMU: one per referenced `<image k>`);
* prompt as lmms-eval's llava wrapper builds it: `" ".join(["<image>"] * n) + "\\n" + context` unless the context
  already holds `<image>`, rendered with the checkpoint's own template (or `conv_template=`) by `serve.Engine`,
  every image in the checkpoint's own image mode (anyres grid, pinpoints, merge) from its config;
* decoding from `gen_kwargs` (`mlcd_vl.eval.effective_generation`): max_new_tokens, temperature / do_sample,
  top_p, top_k, num_beams=1 only, `until` as stop strings; no repetition penalty unless asked for (the
  checkpoint's generation_config never leaks in; `repetition_penalty=checkpoint` restores upstream's 1.05);
  answers are stripped of surrounding white space, as lmms-eval's llava wrappers do;
* batches of `batch_size` requests with equal settings, sorted by context length, one left-padded generate per
  batch, answers returned in request order (greedy answers equal batch-1 answers); bf16 on GPU, float32 on CPU.

Data parallel: under `accelerate launch` or `torchrun` each process loads a full copy on
`cuda:<local rank>` and exposes `rank` / `world_size` / `device`; lmms-eval shards the documents.

Upstream-format checkpoints (LlavaQwenForCausalLM, stage-1 artifacts, local or hub ids) are converted once with
`mlcd_vl.model.convert` into `<checkpoint>.mlcd-hf/` beside them, or into `~/.cache/mlcd-vl/converted/` when that
folder is not writable (`convert_cache=DIR` chooses), guarded by a file lock so parallel ranks convert once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm import tqdm

from mlcd_vl.eval import MODEL_ID
from mlcd_vl.eval.generation import effective_generation
from mlcd_vl.serve.engine import Engine
from mlcd_vl.serve.requests import EngineError, GenerationSettings, Request

IMAGE_TOKEN = "<image>"
STAMP_FILE = "mlcd_vl_converted_from.json"


# ------------------------------------------------------------------------------------------------- pure helpers


def build_question(context: str, n_images: int) -> str:
    """lmms-eval llava style: the image placeholders before the question, unless the context places them."""
    if n_images and IMAGE_TOKEN not in context:
        return " ".join([IMAGE_TOKEN] * n_images) + "\n" + context
    return context


def plan_batches(keys: list, lengths: list[int], batch_size: int) -> list[list[int]]:
    """Request indices in batches: equal `keys` together (first-seen order), longest first, `batch_size` at most."""
    groups: dict = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    batches = []
    for indices in groups.values():
        indices.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep request order
        batches.extend(indices[start:start + batch_size] for start in range(0, len(indices), batch_size))
    return batches


def _source_stamp(folder: Path) -> dict:
    """What identifies a source checkpoint: its config.json and the names, sizes and times of its files."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    return {"source": str(folder.resolve()), "config": (folder / "config.json").read_text(), "files": files}


def converted_folder(source: Path, cache_dir: str | Path | None = None) -> Path:
    """Where the HF-native copy of an upstream checkpoint lives."""
    digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:10]
    if cache_dir is not None:
        return Path(cache_dir).expanduser() / f"{source.name}-{digest}"
    parent = source.resolve().parent
    in_hub_cache = any(part.startswith(("models--", "datasets--")) for part in parent.parts)
    if os.access(parent, os.W_OK) and not in_hub_cache:
        return parent / f"{source.name}.mlcd-hf"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "mlcd-vl" / "converted" / f"{source.name}-{digest}"


def resolve_checkpoint(pretrained: str | Path, *, cache_dir: str | Path | None = None,
                       vision_tower: str | None = None, allow_pickle: bool = False) -> Path:
    """An HF-native folder for `pretrained` (a folder or hub id): itself, or its converted copy (made once)."""
    from filelock import FileLock

    from mlcd_vl.model.sources import local_folder
    from mlcd_vl.model.upstream_format import detect_format

    source = local_folder(pretrained, f"{MODEL_ID} pretrained")  # a hub id is downloaded (or read from the cache)
    if detect_format(source) == "hf":
        return source
    target = converted_folder(source, cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    stamp = _source_stamp(source)
    with FileLock(str(target) + ".lock"):
        stamp_path = target / STAMP_FILE
        if stamp_path.is_file() and json.loads(stamp_path.read_text()) == json.loads(json.dumps(stamp)):
            return target
        from mlcd_vl.model.convert import convert

        logger.info(f"{MODEL_ID}: converting upstream checkpoint {source} -> {target} (once)")
        scratch = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(scratch, ignore_errors=True)
        convert(source, scratch, vision_tower=vision_tower, allow_pickle=allow_pickle,
                log=lambda message: logger.info(message))
        stamp_path = scratch / STAMP_FILE
        stamp_path.write_text(json.dumps(stamp))
        shutil.rmtree(target, ignore_errors=True)
        scratch.rename(target)
    return target


# ------------------------------------------------------------------------------------------------- the model


class MLCDLlava(lmms):
    """lmms-eval model `mlcd_llava` (model_args: see `__init__`)."""

    is_simple = True

    def __init__(self, pretrained: str, device: str | None = None, batch_size: int | str = 1,
                 max_batch_size: int | None = None, dtype: str = "auto", attn_implementation: str | None = None,
                 conv_template: str | None = None, max_new_tokens: int = 1024,
                 repetition_penalty: float | str = 1.0, stop_at_until: bool = True,
                 convert_cache: str | None = None, vision_tower: str | None = None, allow_pickle: bool = False,
                 **unknown) -> None:
        super().__init__()
        if unknown:
            raise TypeError(f"{MODEL_ID}: unknown model_args {sorted(unknown)}; known: pretrained, dtype, "
                            "attn_implementation, conv_template, max_new_tokens, repetition_penalty (a number or "
                            "'checkpoint'), stop_at_until, convert_cache, vision_tower, allow_pickle")
        from accelerate import Accelerator

        accelerator = Accelerator()
        world, rank, local = accelerator.num_processes, accelerator.process_index, accelerator.local_process_index
        if world == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun without a CUDA process group
            world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", rank))
        if world > 1:
            if torch.cuda.is_available() and local >= torch.cuda.device_count():
                raise RuntimeError(f"{MODEL_ID}: local rank {local} has no GPU ({torch.cuda.device_count()} "
                                   "visible); start at most one process per GPU")
            self._device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
            self._rank, self._world_size = rank, world
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self._device.type == "cuda" and self._device.index is not None:
            torch.cuda.set_device(self._device)
        self.accelerator = accelerator
        self.batch_size_per_gpu = max(1, int(batch_size))
        self.max_new_tokens = int(max_new_tokens)
        self.repetition_penalty = repetition_penalty
        self.stop_at_until = stop_at_until if isinstance(stop_at_until, bool) else \
            str(stop_at_until).lower() in ("1", "true", "yes")
        self.pretrained = str(pretrained)

        # under data parallel one rank converts an upstream checkpoint, the others wait on its lock and reuse it
        folder = resolve_checkpoint(pretrained, cache_dir=convert_cache, vision_tower=vision_tower,
                                    allow_pickle=bool(allow_pickle))
        self.checkpoint = folder
        torch_dtype = None if dtype in (None, "auto") else getattr(torch, str(dtype))
        from mlcd_vl.model.checkpoint import load_vlm

        model, tokenizer, settings = load_vlm(folder, dtype=torch_dtype, device=self._device,
                                              attn_implementation=attn_implementation)
        if conv_template and conv_template != settings.template:
            from dataclasses import replace

            logger.warning(f"{MODEL_ID}: conv_template={conv_template} replaces the checkpoint's template "
                           f"{settings.template}")
            settings = replace(settings, template=conv_template)
        self.engine = Engine(model, tokenizer, settings)
        self._warned: set[str] = set()
        if self.rank == 0:
            logger.info(f"{MODEL_ID}: {folder} ({settings.image_mode}, template {settings.template}, "
                        f"{next(model.parameters()).dtype}) on {self._device}, world size {self.world_size}, "
                        f"batch size {self.batch_size_per_gpu}")

    # lmms-eval reads these
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def model(self):
        return self.engine.model

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def config(self):
        return self.engine.model.config

    @property
    def template(self) -> str:
        return self.engine.settings.template

    def settings_for(self, gen_kwargs: dict) -> GenerationSettings:
        values, ignored = effective_generation(gen_kwargs, max_new_tokens=self.max_new_tokens,
                                               repetition_penalty=self.repetition_penalty,
                                               stop_at_until=self.stop_at_until)
        for key in ignored:
            if key not in self._warned:
                self._warned.add(key)
                logger.warning(f"{MODEL_ID}: ignoring generation kwarg {key!r}")
        return GenerationSettings(**values)

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        args = [request.args for request in requests]
        settings = [self.settings_for(a[1]) for a in args]
        keys = [repr(s) for s in settings]
        batches = plan_batches(keys, [len(a[0]) for a in args], self.batch_size_per_gpu)
        results: list[GenerationResult | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=(self.rank != 0), desc="Model Responding")
        for batch in batches:
            prepared = [self._request(*args[i][:1], *args[i][2:]) for i in batch]
            for index, output in zip(batch, self._generate(prepared, settings[batch[0]], [args[i] for i in batch])):
                results[index] = output
                context, gen_kwargs = args[index][0], args[index][1]
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), output.text)
            progress.update(len(batch))
        progress.close()
        return results  # type: ignore[return-value]

    def _request(self, context: str, doc_to_visual, doc_id: int, task: str, split: str) -> Request:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        question = build_question(context, len(visuals))
        return Request([{"role": "user", "content": question}], visuals)

    def _generate(self, prepared: list[Request], settings: GenerationSettings, args: list[tuple]
                  ) -> Iterable[GenerationResult]:
        """One batched generate; answers stripped as lmms-eval's llava wrappers do; a request the engine refuses
        (too long, placeholders that do not match its images) answers "" and is logged."""
        try:
            outputs = self.engine.generate(prepared, settings)
        except EngineError:
            outputs = []
            for request, arg in zip(prepared, args):
                try:
                    outputs.extend(self.engine.generate([request], settings))
                except EngineError as error:
                    logger.warning(f"{MODEL_ID}: {arg[4]} doc {arg[3]}: {error}; answering ''")
                    outputs.append(None)
        for output in outputs:
            if output is None:
                yield GenerationResult(text="", token_counts=TokenCounts(input_tokens=0, output_tokens=0))
            else:
                yield GenerationResult(text=output.text.strip(), token_counts=TokenCounts(
                    input_tokens=output.prompt_tokens, output_tokens=output.completion_tokens))

    def loglikelihood(self, requests: list[Instance]):
        raise NotImplementedError(
            f"{MODEL_ID} implements generate_until only (ChartQA, DocVQA, InfoVQA, OCRBench and MMMU are generation "
            "tasks); tasks scored by loglikelihood are not supported")

    def generate_until_multi_round(self, requests: list[Instance]):
        raise NotImplementedError(f"{MODEL_ID} does not implement multi-round generation")

    def clean(self) -> None:
        self.engine = None
        super().clean()

