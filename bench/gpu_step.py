"""One stage-2 training step at real shapes on one GPU: tokens/s and MFU, packed vs padded.

    python bench/gpu_step.py                         # on a CUDA machine (H100 / H200): ~2-4 min including start-up
    python bench/gpu_step.py --token-budget 32768 --steps 8
    python bench/gpu_step.py --dry-run --out /tmp/x  # scaled-down config on CPU: validates the code path only

Without CUDA (and without --dry-run) it exits at once with status 2.

Model (random weights, bf16 parameters, AdamW, gradient checkpointing on the LLM and the tower): Qwen2.5-1.5B shapes
(hidden 1536, 28 layers, 12 heads, 2 KV heads, FFN 8960, vocab 151936) + a CLIP-format ViT-L/14-336 tower like
`DeepGlint-AI/mlcd-vit-large-patch14-336` (hidden 1024, 24 layers, 16 heads, FFN 4096, 336 px, features of layer -2
without CLS: 576 tokens per crop) + the 2-layer GELU projector, as `LlavaNextForConditionalGeneration` (anyres with
upstream's 5-pinpoint 336 grid, spatial_unpad). Built with `model.build.compose_config`, trained through
`train.step.forward_loss` (the project's own step).

Data: synthetic samples shaped like LLaVA-NeXT-Data at these settings (visual tokens exact from `anyres.image_layout`
for mixed aspect ratios, 1400-2900 per image; a short-question/short-answer majority, detailed answers and a
multi-turn tail; 10% text-only), random token ids and pixels.

- **packed**: rows of at most `--token-budget` tokens (first-fit-decreasing), flash-attention 2 varlen when
  `flash_attn` is installed (no mask), else `sdpa_varlen` (causal SDPA per sample, no mask);
- **padded**: the same samples in random order, B = round(budget / mean length) rows, right-padded.

Model FLOPs per step (MFU convention: no recomputation counted):
    6 * N_layers * tokens                         (LLM transformer layers, every real token)
  + 6 * N_lm_head * supervised                    (forward_loss applies lm_head to supervised positions only)
  + 6 * L * d * sum_i s_i^2                       (causal attention scores + values, per sample of length s_i:
                                                    2 matmuls x 2 FLOPs x s^2/2 x d forward, x3 with backward)
  + crops * (6 * N_tower * 577 + 12 * L_v * d_v * 577^2 + 6 * N_projector * 576)   (bidirectional tower attention)
Padding tokens are not counted (they are wasted work). MFU = FLOPs / step time / peak, peak = 989 TFLOP/s dense
bf16 for H100 SXM and H200 (`--peak-tflops` for other cards).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass

import common  # bench/ is on sys.path: the script's own folder

REAL = dict(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=151936, tower_hidden=1024,
            tower_layers=24, tower_heads=16, tower_intermediate=4096, image_size=336, patch_size=14)
DRY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1024, tower_hidden=32, tower_layers=2,
           tower_heads=2, tower_intermediate=64, image_size=56, patch_size=14)
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0}


@dataclass
class SampleSpec:
    prompt: int  # text tokens before and after the image (unsupervised)
    answer: int  # supervised tokens
    image: tuple[int, int] | None  # (width, height)


def sample_specs(count: int, seed: int, scale: int) -> list[SampleSpec]:
    """LLaVA-NeXT-Data-shaped lengths: short QA majority, detailed answers, multi-turn tail, 10% text-only."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sizes = [(size, weight) for size, weight in common.ASPECTS]
    probs = np.array([w for _, w in sizes], dtype=float)
    probs /= probs.sum()
    specs = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.10:  # text-only
            prompt, answer, image = int(rng.integers(30, 200)), int(rng.integers(100, 800)), None
        elif kind < 0.30:  # multi-turn tail
            turns = int(rng.integers(2, 9))
            prompt, answer = turns * int(rng.integers(15, 40)), turns * int(rng.integers(10, 80))
            image = sizes[int(rng.choice(len(sizes), p=probs))][0]
        else:
            prompt = int(rng.integers(15, 60))
            answer = int(rng.integers(100, 300)) if rng.random() < 0.3 else int(rng.integers(2, 25))
            image = sizes[int(rng.choice(len(sizes), p=probs))][0]
        specs.append(SampleSpec(max(1, prompt // scale), max(2, answer // scale), image))
    return specs


def make_sample(spec: SampleSpec, index: int, settings, image_token_id: int, vocab: int, generator):
    """A `data.samples.Sample` with random ids and pixels and exactly the visual tokens the model will produce."""
    import torch

    from mlcd_vl.data.samples import Sample
    from mlcd_vl.vocab import IGNORE_INDEX
    from mlcd_vl.model import anyres
    from mlcd_vl.model.multimodal import ImageInput

    text_vocab = min(vocab, image_token_id)
    head = torch.randint(0, text_vocab, (max(1, spec.prompt // 2),), generator=generator)
    tail = torch.randint(0, text_vocab, (spec.prompt - spec.prompt // 2 + spec.answer,), generator=generator)
    images, spans, visual = [], [], torch.zeros(0, dtype=torch.long)
    if spec.image is not None:
        layout = anyres.image_layout(spec.image, image_mode=settings.image_mode, merge_type=settings.merge_type,
                                     crop_size=settings.crop_size, patch_size=settings.patch_size,
                                     pinpoints=settings.pinpoints)
        pixels = torch.rand(layout.num_crops, 3, settings.crop_size, settings.crop_size, generator=generator)
        images.append(ImageInput(pixels, spec.image, settings.image_mode))
        spans.append((len(head), layout.tokens))
        visual = torch.full((layout.tokens,), image_token_id, dtype=torch.long)
    ids = torch.cat([head, visual, tail])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[-spec.answer:] = ids[-spec.answer:]
    return Sample(f"gpu-{index}", ids, labels, images, spans)


def build_model(shapes: dict, dtype, device: str, attn: str):
    import torch
    from transformers import AutoModelForImageTextToText, CLIPVisionConfig, MLCDVisionConfig, Qwen2Config

    from mlcd_vl.model.build import (
        VLMSettings,
        compose_config,
        init_projector_and_newline,
    )

    size = shapes["image_size"]
    settings = VLMSettings(image_mode="anyres", merge_type="spatial_unpad", crop_size=size,
                           patch_size=shapes["patch_size"],
                           pinpoints=[(size, 2 * size), (2 * size, size), (2 * size, 2 * size), (3 * size, size),
                                      (size, 3 * size)])
    text = Qwen2Config(vocab_size=shapes["vocab"], hidden_size=shapes["hidden"],
                       intermediate_size=shapes["intermediate"], num_hidden_layers=shapes["layers"],
                       num_attention_heads=shapes["heads"], num_key_value_heads=shapes["kv_heads"],
                       max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)
    # a CLIP-format tower (QuickGELU) by default; shapes["tower_kind"] = "mlcd" gives the RoPE2D MLCDVisionModel
    vision_class = MLCDVisionConfig if shapes.get("tower_kind") == "mlcd" else CLIPVisionConfig
    vision = vision_class(hidden_size=shapes["tower_hidden"], intermediate_size=shapes["tower_intermediate"],
                          num_hidden_layers=shapes["tower_layers"], num_attention_heads=shapes["tower_heads"],
                          image_size=size, patch_size=shapes["patch_size"],
                          hidden_act=shapes.get("tower_act", "quick_gelu"), layer_norm_eps=1e-5)
    image_token_id = shapes.get("image_token_id") or (  # Qwen2.5: 151665, len(tokenizer)
        shapes["vocab"] - 271 if shapes["vocab"] > 1000 else shapes["vocab"] - 1)
    config = compose_config(text, vision, settings, image_token_id)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn)
    init_projector_and_newline(model, seed=0)
    model.to(device=device, dtype=dtype)
    return model, settings, image_token_id


def enable_checkpointing(model) -> None:
    """Gradient checkpointing (non-reentrant) on the LLM and the tower, as the recipe trains."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def step_flops(model, shapes: dict, batch_samples: list, supervised: int) -> float:
    lm = model.model.language_model
    layer_params = count_params(lm.layers) + count_params(lm.norm)
    head_params = count_params(model.lm_head)
    tower = model.model.vision_tower
    tower_params = count_params(tower)
    projector_params = count_params(model.model.multi_modal_projector)
    tokens = sum(s.length for s in batch_samples)
    flops = 6 * layer_params * tokens + 6 * head_params * supervised
    flops += 6 * shapes["layers"] * shapes["hidden"] * sum(s.length ** 2 for s in batch_samples)
    unit = shapes["image_size"] // shapes["patch_size"]
    n = unit * unit + 1
    crops = sum(image.crops.shape[0] for s in batch_samples for image in s.images)
    flops += crops * (6 * tower_params * n + 12 * shapes["tower_layers"] * shapes["tower_hidden"] * n * n
                      + 6 * projector_params * (n - 1))
    return float(flops)


@dataclass
class ModeResult:
    mode: str
    attention: str
    steps: int
    seconds: list[float]
    tokens: int
    tensor_tokens: int
    supervised: int
    samples: int
    flops: float
    peak_gib: float
    batch: str

    @property
    def step_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.steps / self.step_s


def run_mode(mode: str, model, settings, shapes, plans: list[list], attn: str, dtype, device: str, warmup: int,
             batch_label: str) -> ModeResult:
    import torch

    from mlcd_vl.data.collate import PaddingCollator
    from mlcd_vl.data.packing import PackingCollator
    from mlcd_vl.model.varlen import MASK_FREE_IMPLEMENTATIONS, composite_attention, text_attention
    from mlcd_vl.train.step import TrainBatch, forward_loss, plan_micro_batches

    pad = 0
    model.set_attn_implementation(composite_attention(attn, packing=mode == "packed"))  # as training does
    if mode == "packed":
        text = text_attention(model)
        varlen = text in MASK_FREE_IMPLEMENTATIONS
        collate = PackingCollator(pad, build_4d_mask=not varlen, mask_dtype=dtype)
        attention = text + (" varlen (no mask)" if varlen else " + 4D block mask")
    else:
        collate = PaddingCollator(pad)
        attention = attn + " + padding mask"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds, tokens, tensor_tokens, supervised, samples, flops = [], 0, 0, 0, 0, 0.0
    for index, plan in enumerate(plans):
        batch = TrainBatch.from_collated(collate(plan)).to(device)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        output = forward_loss(model, settings, batch, plan_micro_batches([batch]))
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if not math.isfinite(float(output.loss_sum)):
            raise RuntimeError(f"{mode}: non-finite loss at step {index}")
        if index < warmup:
            continue
        seconds.append(elapsed)
        tokens += sum(s.length for s in plan)
        tensor_tokens += int(batch.input_ids.numel())
        supervised += output.supervised_tokens
        samples += len(plan)
        flops += step_flops(model, shapes, plan, output.supervised_tokens)
    del optimizer
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return ModeResult(mode, attention, len(seconds), seconds, tokens, tensor_tokens, supervised, samples, flops, peak,
                      batch_label)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="scaled-down model on CPU, float32: code path only")
    parser.add_argument("--token-budget", type=int, default=16384, help="tokens per packed row (default 16384)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--attn", default=None, help="attention implementation (default: flash_attention_2 if "
                                                     "flash_attn is installed, else sdpa)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="card's dense bf16 peak (default by name)")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(common.RESULTS))
    args = parser.parse_args(argv)
    load_before = common.load_average()

    import torch

    if not args.dry_run and common.cuda_missing("gpu_step.py"):
        return common.NO_CUDA_EXIT
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    if args.dry_run:
        shapes, device, dtype, scale = DRY, "cpu", torch.float32, 8
        args.token_budget, args.steps, args.warmup = min(args.token_budget, 1024), min(args.steps, 1), 0
        card = "dry-run-cpu"
    else:
        shapes, device, dtype, scale = REAL, "cuda", torch.bfloat16, 1
        card = common.machine_name("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
    attn = args.attn
    if attn is None:
        try:
            import flash_attn  # noqa: F401

            attn = "flash_attention_2" if device == "cuda" else "sdpa"
        except ImportError:
            attn = "sdpa"
    peak_tflops = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in card), None)

    started = time.perf_counter()
    model, settings, image_token_id = build_model(shapes, dtype, device, attn)
    model.train()
    if not args.no_checkpointing:
        enable_checkpointing(model)
    build_seconds = time.perf_counter() - started

    from mlcd_vl.data.packing import first_fit_decreasing

    generator = torch.Generator().manual_seed(args.seed)
    specs = sample_specs(200, args.seed, scale)
    pool = [make_sample(spec, i, settings, image_token_id, shapes["vocab"], generator)
            for i, spec in enumerate(specs)]
    lengths = [s.length for s in pool]
    mean_length = statistics.mean(lengths)
    batch_size = max(1, round(args.token_budget / mean_length))
    needed = args.warmup + args.steps
    fitting = [s for s in pool if s.length <= args.token_budget]
    rows = [[fitting[i] for i in row] for row in first_fit_decreasing([s.length for s in fitting], args.token_budget)]
    rows = sorted(rows, key=lambda row: -sum(s.length for s in row))[:needed]  # the fullest rows (FFD's tail is thin)
    used = [s for row in rows for s in row]
    order = torch.randperm(len(used), generator=generator).tolist()
    padded = [[used[i] for i in order[j:j + batch_size]] for j in range(0, len(order), batch_size)][:needed]

    results = [run_mode("packed", model, settings, shapes, rows, attn, dtype, device, args.warmup,
                        f"1 row <= {args.token_budget}"),
               run_mode("padded", model, settings, shapes, padded, attn, dtype, device, args.warmup,
                        f"B = {batch_size} rows")]

    from importlib.metadata import PackageNotFoundError, version

    def package(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    card_name = torch.cuda.get_device_name(0) if device == "cuda" else "none (CPU dry run)"
    cuda_line = (f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, flash-attn "
                 f"{package('flash-attn')}" if device == "cuda" else "CPU")
    llm_params = count_params(model.model.language_model) + count_params(model.lm_head)
    out_path = common.result_path(args.out, "gpu_step", card)
    lines = common.header("Stage-2 training step on one GPU" if not args.dry_run else "gpu_step dry run (CPU)",
                          common.command_line("gpu_step.py", argv), load_before, [
        f"card: {card_name}; {cuda_line}; dtype {str(dtype).replace('torch.', '')}; gradient checkpointing "
        f"{'off' if args.no_checkpointing else 'on'}; AdamW (fused on CUDA), clip 1.0",
        f"model: Qwen2 {shapes['layers']} layers x {shapes['hidden']} ({shapes['heads']} heads, {shapes['kv_heads']} "
        f"KV, FFN {shapes['intermediate']}, vocab {shapes['vocab']}) = {llm_params / 1e6:.1f}M + CLIP tower "
        f"{shapes['tower_layers']} x {shapes['tower_hidden']} at {shapes['image_size']} px = "
        f"{count_params(model.model.vision_tower) / 1e6:.1f}M + projector; random weights; built in "
        f"{build_seconds:.0f} s",
        f"samples: synthetic LLaVA-NeXT-Data-shaped, length mean {mean_length:.0f} / max {max(lengths)} tokens; "
        f"token budget {args.token_budget}; padded batch size round(budget / mean) = {batch_size}; "
        f"{args.warmup} warm-up + {args.steps} timed steps per mode (median step time)",
        f"peak for MFU: {f'{peak_tflops:.0f} TFLOP/s dense bf16' if peak_tflops else 'unknown (pass --peak-tflops)'}"
        "; model FLOPs as in the script's docstring (6N per token + causal attention per sample + tower)"])
    lines += ["| mode | attention | batch | step s (median) | tokens/s | supervised tokens/s | samples/s | "
              "padding | model TFLOP/s | MFU | peak GiB |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        total = r.step_s * r.steps
        tflops = r.flops / total / 1e12
        mfu = f"{tflops / peak_tflops:.1%}" if peak_tflops else "n/a"
        lines.append(f"| {r.mode} | {r.attention} | {r.batch} | {r.step_s:.3f} | {r.tokens / total:.0f} | "
                     f"{r.supervised / total:.0f} | {r.samples / total:.2f} | {1 - r.tokens / r.tensor_tokens:.1%} | "
                     f"{tflops:.1f} | {mfu} | {r.peak_gib:.1f} |")
    packed, padded_result = results
    lines += ["", f"Packed / padded: {packed.tokens_per_s / padded_result.tokens_per_s:.2f}x tokens/s "
                  f"(same samples pool, same step code)."]
    if args.dry_run:
        lines += ["", "_--dry-run: scaled-down model on CPU; validates the code path, the numbers mean nothing._"]
    common.write_result(out_path, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
