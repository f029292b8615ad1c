"""GPU acceptance on one H100 / H200 in under 8 minutes: real widths in bf16, varlen packing, the chunked loss,
sharded init, throughput and MFU.

    PYTHONUNBUFFERED=1 python bench/gpu_acceptance.py --out DIR   # on the GPU machine: about 4-6 min, budget 450 s
    python bench/gpu_acceptance.py --dry-run --out /tmp/x         # CPU, tiny widths, float32: every phase, < 1 min

Writes `gpu_acceptance_<card>_<date>.md` and `.json` (bench/common.py) after EVERY phase, so a crash or a kill in a
late phase keeps the earlier phases' results. Each phase is time-boxed (SIGALRM) inside an overall budget
(`--budget-s`, default 450 s): a phase that would start with too little time left is skipped and says so. A
watchdog ends the process (exit 3) at `--hard-limit-s` (default 560 s), inside a 10-minute command limit. Progress
lines go to stdout as it runs. Exit status: 0 every phase that ran passed (skips allowed), 1 a phase failed or
raised, 2 no CUDA (without --dry-run), 3 the watchdog fired.

Phases (run in the order 1, 2, 3, 4, 6, 5: the throughput needs phase 2's model, the sharded builds need its GPU
memory freed):

1. **environment**: GPU name and memory, torch / CUDA / cuDNN / transformers versions, flash-attn (present or not:
   it cannot be installed on an offline machine, PyPI has only its CUDA source build, so packed rows run
   `sdpa_varlen` without it, and the phase says which path runs), bf16 support, DeepSpeed and liger-kernel present,
   the dense bf16 peak table (H100 SXM 989, H100 PCIe 756, H100 NVL 835, H200 989, H200 NVL 835 TFLOP/s) and the
   row this card matched, and an 8192^3 bf16 matmul measured (the achievable rate, for context).
2. **real widths**: the stage-2 composite (`model.build.compose_config`, LlavaNext anyres + spatial_unpad) with
   Qwen2.5-7B's layer shape (hidden 3584, 28 heads, 4 KV heads, head dim 128, FFN 18944, vocab 152064) cut to
   `--llm-layers` (default 7 of 28) and MLCD-bigG-448's (`presets.TOWERS["mlcd-bigG-448"]`: the RoPE2D
   MLCDVisionModel, hidden 1664, 16 heads, FFN 8192, patch 14, 448 px) cut to `--tower-layers` (default 12 of 48:
   the same quarter, so the tower's share of the FLOPs is the full model's), + the 2-layer projector; bf16, built on
   the GPU, gradient checkpointing on (as the recipe). Checked: one decoder layer and one tower layer hold exactly
   the parameters of the real architectures (`qwen2_layer_params`, `mlcd_layer_params`), which extrapolate to the
   full models' sizes (Qwen2.5-7B: 7,615,616,512 exactly); every tensor is bf16 on the GPU.
3. **packed vs unpacked**: the same 4 samples (3 with images, 1 text-only) as one packed varlen row (flash-attention
   varlen or `sdpa_varlen`, no mask) and as a right-padded batch (SDPA + padding mask), through
   `train.step.forward_loss`: mean loss, the final hidden states of every real token and the projector's gradient
   must agree. Tolerance: float32 (--dry-run) 1e-5 relative. bf16: 3e-2 (hidden states), 5e-2 (gradient), 5e-3
   (loss). bf16 keeps 8 significant bits (one rounding: 2^-9 = 2e-3 relative); the two layouts run different kernels
   (matmul shapes, attention tiles; the tower sees the same crops in both), so each decoder layer adds an
   independent error of about that size, about sqrt(7) x 2e-3 = 5e-3 over 7 layers: the hidden-state bound leaves
   a 6x margin; the gradient sums bf16 products over about ten thousand positions (wider bound); the loss, a mean
   over about a thousand tokens, averages the errors down. A negative control shows the comparison has power: the
   same packed row WITHOUT sample boundaries (position ids running on, so samples attend to earlier samples) must
   differ from the padded batch by more than 10x what the real packed row differs.
4. **chunked vs full loss** (`train.head_loss`, `optim.loss_impl`): LM head + cross-entropy at Qwen2.5-7B's head
   (152064 x 3584), forward + backward once, at `--loss-tokens` supervised tokens (default 8192 and 32768), bf16:
   loss and gradients (hidden states, head weight) of "chunked" against "full", and each path's peak GPU memory
   above its inputs; the chunked peak must be lower. Plus the same at the smallest size in float32 (TF32 off), where
   the two paths must agree within 1e-5 relative (the CPU test's 1e-6 bound, loosened for the GPU's summation order
   over 3584-long dot products). bf16 tolerance: 1e-3 on the summed loss, 2e-2 on gradients (bf16 operands, METHOD:
   1e-3 to 1e-2, with a margin for kernels the two paths choose differently). A full path that runs out of GPU
   memory is reported as such (that is what the chunked loss is for), not failed.
5. **sharded init** (`model.sharded_init`, ZeRO-3 built partitioned, when this commit has it: else "skipped: not on
   this commit"): random weights at real widths cut to `--sharded-llm-layers` / `--sharded-tower-layers` written as
   safetensors folders (`model.tiny` writers, real vocabulary), then two fresh processes: the whole-model build
   (`build.build_vlm` in float32 on the host, moved to the GPU in bf16, as a run without sharded init) and the
   partitioned build (`model.sharded.build_vlm_partitioned` under a 1-process ZeRO-3 bf16 config). Checked: the
   LLM's and tower's weights are equal (checksum; the projector is drawn fresh), and the host memory the build adds
   is lower partitioned. Reported: peak GPU memory of each (one process holds the whole model either way), peak
   host RSS, seconds. Needs DeepSpeed on the machine.
6. **throughput**: `--warmup` + `--steps` packed training steps at real widths (rows of `--token-budget` tokens,
   first-fit-decreasing over synthetic LLaVA-NeXT-Data-shaped samples, bf16, gradient checkpointing as the recipe,
   fused AdamW, clip 1.0) through `bench/gpu_step.run_mode` (`train.step.forward_loss`): tokens/s, supervised
   tokens/s, samples/s, peak GPU memory, MFU with and without the tower.

FLOPs and MFU (`train.metrics.FlopsModel`, the 6N convention training logs, with the head counted where it runs):

    with tower    = 6 x (N_llm x tokens + N_head x supervised + N_tower x tower_tokens)
    without tower = 6 x (N_llm x tokens + N_head x supervised)

N_llm: the decoder layers, final norm, projector and image_newline (the embedding is a lookup: no FLOPs); N_head:
lm_head (forward_loss applies it to supervised positions only); N_tower: the tower; tokens: real tokens (no padding);
tower_tokens: crops x (patches + CLS). 6 = 2 (forward) + 4 (backward) FLOPs per parameter and token; gradient
checkpointing's recomputation is not counted, nor is attention's quadratic term (reported beside, as a fraction of
the model FLOPs). MFU = FLOPs / (median step time x timed steps) / peak. "Without tower" divides the same step time
(which includes the tower) by the LLM's FLOPs alone, as peers that quote an LLM-only MFU do. (The training log's
`FlopsModel.from_summary` folds the embedding and the head into N_llm over every token: close enough at 28 layers,
but on a model cut to 7 layers those two matrices would be two fifths of the count.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import common  # bench/ is on sys.path: the script's own folder

# Dense bf16 tensor-core peaks, TFLOP/s, by the vendor's datasheets (sparsity excluded); first substring match of
# torch.cuda.get_device_name() wins, so the specific names come first.
PEAK_TFLOPS = (("H100 PCIe", "H100 PCIe", 756.0), ("H100 NVL", "H100 NVL", 835.0), ("H200 NVL", "H200 NVL", 835.0),
               ("H100", "H100 SXM", 989.0), ("H200", "H200 (SXM)", 989.0))

QWEN25_7B = dict(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064,
                 image_token_id=151665)
BIGG_448 = dict(tower_heads=16, tower_intermediate=8192, tower_layers=48)  # hidden, patch, size, act: the preset
DRY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1024, image_token_id=1000,
           tower_kind="mlcd", tower_act="gelu", tower_hidden=32, tower_layers=2, tower_heads=2,
           tower_intermediate=64, image_size=56, patch_size=14)

WATCHDOG_EXIT = 3
PHASES = {1: "environment", 2: "real widths", 3: "packed vs unpacked", 4: "chunked vs full loss",
          5: "sharded init", 6: "throughput"}
RUN_ORDER = (1, 2, 3, 4, 6, 5)
# Time box per phase (seconds, on the GPU) and the least time worth starting it with.
TIME_BOX = {1: 60, 2: 120, 3: 60, 4: 90, 5: 150, 6: 150}
MIN_START = {1: 5, 2: 30, 3: 15, 4: 20, 5: 60, 6: 40}
GIB = 2 ** 30


class PhaseTimeout(Exception):
    pass


class Skip(Exception):
    """A phase that cannot run here; the message says why."""


@contextlib.contextmanager
def time_box(seconds: float | None):
    """Raise PhaseTimeout in the main thread after `seconds` (SIGALRM; no box where signals are unavailable)."""
    usable = seconds and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise PhaseTimeout(f"over its {seconds:.0f} s time box")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Check:
    name: str
    value: float | None  # what was measured (an error, a ratio)
    limit: float | None  # the bound it must stay under (or over, when `above`)
    passed: bool
    above: bool = False

    def line(self) -> str:
        value = "n/a" if self.value is None else f"{self.value:.3g}"
        bound = "" if self.limit is None else f" ({'>' if self.above else '<='} {self.limit:.3g})"
        return f"{self.name}: {value}{bound} {'ok' if self.passed else 'FAILED'}"


@dataclass
class Phase:
    number: int
    status: str = "not run"  # pass | fail | error | timeout | skipped | not run
    summary: str = ""
    seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    table: list[str] = field(default_factory=list)  # markdown rows for the result file

    def check(self, name: str, value: float | None, limit: float | None, above: bool = False) -> bool:
        ok = value is not None and math.isfinite(value) and (limit is None or (value > limit if above
                                                                                else value <= limit))
        self.checks.append(Check(name, value, limit, ok, above))
        return ok

    def require(self, name: str, condition: bool) -> bool:
        """A yes/no check (value 1 = yes)."""
        self.checks.append(Check(name, float(condition), None, bool(condition)))
        return bool(condition)


class Report:
    """The result file (.md + .json), rewritten after every phase."""

    def __init__(self, path: Path, title: str, header: list[str], meta: dict):
        self.path, self.title, self.header, self.meta = path, title, header, meta
        self.phases = {n: Phase(n) for n in PHASES}

    def lines(self) -> list[str]:
        out = list(self.header)
        out += ["| phase | status | seconds | summary |", "|---|---|---:|---|"]
        for n, phase in self.phases.items():
            out.append(f"| {n} {PHASES[n]} | {phase.status} | {phase.seconds:.1f} | {phase.summary} |")
        for n, phase in self.phases.items():
            if phase.status == "not run":
                continue
            out += ["", f"## {n}. {PHASES[n]}: {phase.status}", ""]
            if not phase.checks and not phase.table:
                out.append(f"- {phase.summary}")
            out += [f"- {c.line()}" for c in phase.checks]
            if phase.table:
                out += ([""] if phase.checks else []) + phase.table
        return out

    def save(self, echo: bool = False) -> None:
        common.write_result(self.path, self.lines(), echo=echo)
        common.write_json(self.path, {**self.meta, "phases": [
            {"number": n, "name": PHASES[n], "status": p.status, "summary": p.summary, "seconds": p.seconds,
             "checks": [c.__dict__ for c in p.checks], "data": p.data} for n, p in self.phases.items()]})


def say(started: float, text: str) -> None:
    print(f"[{time.perf_counter() - started:6.1f} s] {text}", flush=True)


def relative_error(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------------------------
# Shapes and expected parameter counts
# ----------------------------------------------------------------------------------------------------------------

def real_shapes(llm_layers: int, tower_layers: int) -> dict:
    from mlcd_vl.presets import TOWERS

    tower = TOWERS["mlcd-bigG-448"]
    return dict(QWEN25_7B, layers=llm_layers, tower_kind=tower.kind, tower_act=tower.hidden_act,
                tower_hidden=tower.hidden_size, tower_layers=tower_layers, tower_heads=BIGG_448["tower_heads"],
                tower_intermediate=BIGG_448["tower_intermediate"], image_size=tower.image_size,
                patch_size=tower.patch_size)


def qwen2_layer_params(s: dict) -> int:
    """One Qwen2 decoder layer: q/k/v with biases, o without, gated MLP (3 matrices), two RMSNorm weights."""
    h, head_dim = s["hidden"], s["hidden"] // s["heads"]
    kv = s["kv_heads"] * head_dim
    return (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * s["intermediate"] + 2 * h


def mlcd_layer_params(s: dict) -> int:
    """One MLCD (CLIP-like) encoder layer: q/k/v/out with biases, fc1/fc2 with biases, two LayerNorms."""
    h, f = s["tower_hidden"], s["tower_intermediate"]
    return 4 * (h * h + h) + (h * f + f) + (f * h + h) + 4 * h


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Phases
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Context:
    args: argparse.Namespace
    started: float
    device: str
    dtype: object = None
    shapes: dict = field(default_factory=dict)
    attn: str = "sdpa"
    peak_tflops: float | None = None
    model: object = None
    settings: object = None
    pool: list = field(default_factory=list)


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def phase_environment(ctx: Context, phase: Phase) -> None:
    import torch
    import transformers

    import mlcd_vl.train.step  # noqa: F401  (the project imports with this machine's packages)

    flash = package_version("flash-attn")
    flash_ok = False
    if flash:
        try:
            import flash_attn  # noqa: F401

            flash_ok = True
        except Exception as error:  # noqa: BLE001  (an ABI mismatch with this torch shows up here)
            flash = f"{flash} (import fails: {type(error).__name__})"
    cuda = ctx.device == "cuda"
    ctx.attn = ctx.args.attn or ("flash_attention_2" if flash_ok and cuda else "sdpa")
    packed_path = ctx.attn + " varlen" if ctx.attn != "sdpa" else "sdpa_varlen (causal SDPA per sample)"
    data = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "flash_attn": flash, "deepspeed": package_version("deepspeed"), "liger_kernel": package_version(
                "liger-kernel"), "attention": ctx.attn, "packed_attention": packed_path,
            "peak_table_tflops": {label: peak for _, label, peak in PEAK_TFLOPS}}
    # pyproject asks for transformers >= 5.20; an older one that imports the project is noted, not failed
    old_transformers = tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 20)
    data["transformers_below_pyproject"] = old_transformers
    if cuda:
        name = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        match = next(((label, peak) for key, label, peak in PEAK_TFLOPS if key in name), None)
        ctx.peak_tflops = ctx.args.peak_tflops or (match[1] if match else None)
        bf16 = torch.cuda.is_bf16_supported()
        data.update(gpu=name, gpu_memory_gib=props.total_memory / GIB, multiprocessors=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version(), bf16=bf16,
                    peak_row=match[0] if match else None, peak_tflops=ctx.peak_tflops)
        phase.require("bf16 supported", bf16)
        size = 8192
        a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        torch.cuda.synchronize()
        measured = 10 * 2 * size ** 3 / (start.elapsed_time(end) / 1e3) / 1e12
        del a, b
        data["matmul_bf16_tflops"] = measured
        phase.check("bf16 8192^3 matmul TFLOP/s (random data, measured; reported, not bounded)", measured, None)
        card = (f"{name}, {props.total_memory / GIB:.0f} GiB, sm_{props.major}{props.minor}; "
                f"peak {ctx.peak_tflops or 'unknown'} TFLOP/s ({match[0] if match else 'no table row'}), "
                f"matmul measured {measured:.0f}")
    else:
        data.update(gpu=None, bf16=None, peak_tflops=None)
        card = "CPU dry run"
    phase.table = ["| card | dense bf16 peak TFLOP/s |", "|---|---:|"] + [
        f"| {label} | {peak:.0f} |" for _, label, peak in PEAK_TFLOPS]
    phase.data = data
    phase.summary = (f"{card}; torch {torch.__version__} CUDA {torch.version.cuda}, transformers "
                     f"{transformers.__version__}" + (" (below pyproject's 5.20)" if old_transformers else "")
                     + f"; flash-attn {flash or 'absent'}: packed rows run {packed_path}")


def phase_real_widths(ctx: Context, phase: Phase) -> None:
    import gpu_step
    import torch

    shapes = ctx.shapes
    ctx.model, ctx.settings, _ = gpu_step.build_model(shapes, ctx.dtype, ctx.device, ctx.attn)
    model = ctx.model
    model.train()
    gpu_step.enable_checkpointing(model)  # as the recipe trains, and as phases 3 and 6 run
    lm, tower = model.model.language_model, model.model.vision_tower
    encoder = (tower.vision_model if hasattr(tower, "vision_model") else tower).encoder
    llm_layer, tower_layer = count(lm.layers[0]), count(encoder.layers[0])
    expected_llm, expected_tower = qwen2_layer_params(shapes), mlcd_layer_params(shapes)
    phase.check("decoder layer parameters - Qwen2 closed form", float(abs(llm_layer - expected_llm)), 0.0)
    phase.check("tower layer parameters - MLCD closed form", float(abs(tower_layer - expected_tower)), 0.0)
    wrong = [n for n, p in model.named_parameters() if p.dtype != ctx.dtype or p.device.type != ctx.device]
    phase.check("tensors not in the run's dtype and device", float(len(wrong)), 0.0)
    embed, head = count(lm.embed_tokens), count(model.lm_head)
    full_llm = embed + head + (QWEN25_7B["layers"] if not ctx.args.dry_run else shapes["layers"]) * llm_layer \
        + count(lm.norm)
    tower_rest = count(tower) - shapes["tower_layers"] * tower_layer
    full_tower = tower_rest + (BIGG_448["tower_layers"] if not ctx.args.dry_run else shapes["tower_layers"]) \
        * tower_layer
    if not ctx.args.dry_run:  # the real models' published sizes: Qwen2.5-7B 7.62B, MLCD-bigG 1.84B
        phase.check("full Qwen2.5-7B parameters (extrapolated) - 7,615,616,512", float(abs(full_llm - 7_615_616_512)),
                    0.0)
        phase.check("full bigG-448 tower parameters / 1.842e9 - 1 (extrapolated)", abs(full_tower / 1.842e9 - 1),
                    5e-3)
    memory = torch.cuda.memory_allocated() / GIB if ctx.device == "cuda" else None
    phase.data = {"shapes": shapes, "llm_layer_params": llm_layer, "tower_layer_params": tower_layer,
                  "llm_params": count(lm) + head, "tower_params": count(tower),
                  "projector_params": count(model.model.multi_modal_projector), "full_llm_params": full_llm,
                  "full_tower_params": full_tower, "gpu_memory_gib": memory,
                  "dtype": str(ctx.dtype).replace("torch.", "")}
    phase.summary = (f"Qwen2 {shapes['layers']} x {shapes['hidden']} ({(count(lm) + head) / 1e9:.2f}B) + MLCD "
                     f"{shapes['tower_layers']} x {shapes['tower_hidden']} at {shapes['image_size']} px "
                     f"({count(tower) / 1e9:.2f}B), {phase.data['dtype']}; per-layer counts extrapolate to "
                     f"{full_llm / 1e9:.2f}B + {full_tower / 1e9:.2f}B"
                     + (f"; {memory:.1f} GiB on the GPU" if memory is not None else ""))
    ctx.pool = make_pool(ctx)  # the synthetic samples of phases 3 and 6 (random ids and pixels)


def make_pool(ctx: Context, count_: int = 120) -> list:
    """Synthetic LLaVA-NeXT-Data-shaped samples (bench/gpu_step.py); 120 fill the throughput's rows at 448 px, whose
    float32 pixels take about 6 GB of host memory."""
    import gpu_step
    import torch

    generator = torch.Generator().manual_seed(ctx.args.seed)
    scale = 8 if ctx.args.dry_run else 1
    specs = gpu_step.sample_specs(count_, ctx.args.seed, scale)
    return [gpu_step.make_sample(spec, i, ctx.settings, ctx.shapes["image_token_id"], ctx.shapes["vocab"], generator)
            for i, spec in enumerate(specs)]


def phase_packed_vs_unpacked(ctx: Context, phase: Phase) -> None:
    import torch

    from mlcd_vl.data.collate import PaddingCollator
    from mlcd_vl.data.packing import PackingCollator
    from mlcd_vl.model.varlen import composite_attention
    from mlcd_vl.train.step import TrainBatch, forward_loss, plan_micro_batches

    if ctx.model is None:
        raise Skip("needs phase 2's model")
    model, settings = ctx.model, ctx.settings
    text_only = [s for s in ctx.pool if not s.images]
    with_image = sorted((s for s in ctx.pool if s.images), key=lambda s: s.length)
    samples = with_image[:3] + text_only[:1]  # the shortest: the padded batch stays small on an 80 GB card
    captured = {}
    hook = model.model.language_model.norm.register_forward_hook(
        lambda module, inputs, output: captured.__setitem__("hidden", output.detach().float()))

    def run(attention, collate, continuous_positions: bool = False):
        model.set_attn_implementation(attention)
        batch = TrainBatch.from_collated(collate(samples))
        if continuous_positions:  # the negative control: one long "sample", attention runs across the boundaries
            batch.position_ids = torch.arange(batch.input_ids.shape[1])[None]
        model.zero_grad(set_to_none=True)
        output = forward_loss(model, settings, batch, plan_micro_batches([batch]))
        output.loss.backward()
        grad = model.model.multi_modal_projector.linear_2.weight.grad.detach().float().clone()
        mean = float(output.loss_sum) / max(output.supervised_tokens, 1)
        return mean, output.supervised_tokens, captured.pop("hidden"), grad

    try:
        packed_attention = composite_attention(ctx.attn, packing=True)
        collate = PackingCollator(0, build_4d_mask=False, mask_dtype=ctx.dtype)
        packed = run(packed_attention, collate)
        control = run(packed_attention, collate, continuous_positions=True)
        padded = run(ctx.attn, PaddingCollator(0))
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)
    lengths = [s.length for s in samples]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]

    def unpack(hidden):
        return torch.cat([hidden[0, start:start + n] for start, n in zip(starts, lengths)])

    def unpad(hidden):
        return torch.cat([hidden[i, :n] for i, n in enumerate(lengths)])

    fp32 = ctx.dtype == torch.float32
    tol_hidden, tol_grad, tol_loss = (1e-5, 1e-5, 1e-5) if fp32 else (3e-2, 5e-2, 5e-3)
    reference = unpad(padded[2])
    loss_error = abs(packed[0] - padded[0]) / abs(padded[0])
    hidden_error = relative_error(unpack(packed[2]), reference)
    grad_error = relative_error(packed[3], padded[3])
    control_error = relative_error(unpack(control[2]), reference)
    phase.check("supervised tokens packed - padded", float(abs(packed[1] - padded[1])), 0.0)
    phase.check("mean loss, relative difference", loss_error, tol_loss)
    phase.check("final hidden states of every real token, relative L2", hidden_error, tol_hidden)
    phase.check("projector gradient, relative L2", grad_error, tol_grad)
    phase.check("negative control: packed row without sample boundaries, hidden relative L2 / the packed row's",
                control_error / max(hidden_error, 1e-12), 10.0, above=True)
    phase.data = {"lengths": lengths, "images": [len(s.images) for s in samples], "loss_packed": packed[0],
                  "loss_padded": padded[0], "loss_control": control[0], "supervised": packed[1],
                  "loss_error": loss_error, "hidden_error": hidden_error, "grad_error": grad_error,
                  "control_hidden_error": control_error, "tolerance_hidden": tol_hidden, "tolerance_grad": tol_grad,
                  "tolerance_loss": tol_loss,
                  "packed_attention": str(packed_attention), "padded_attention": ctx.attn}
    phase.summary = (f"{len(samples)} samples ({sum(lengths)} tokens): loss {packed[0]:.5f} vs {padded[0]:.5f} "
                     f"(rel {loss_error:.1e}), hidden rel {hidden_error:.1e}, gradient rel {grad_error:.1e}; "
                     f"control without boundaries {control_error:.1e}")


def loss_case(tokens: int, vocab: int, hidden: int, dtype, impl: str, chunk: int, device: str, seed: int) -> dict:
    """One LM head + cross-entropy forward and backward (fresh inputs from `seed`): loss, gradients, peak, time."""
    import torch
    from torch import nn

    from mlcd_vl.train.head_loss import HeadLossSettings, head_loss_sum

    generator = torch.Generator(device=device).manual_seed(seed)
    head = nn.Linear(hidden, vocab, bias=False, device="meta")
    head.weight = nn.Parameter(torch.randn(vocab, hidden, generator=generator, device=device, dtype=dtype) * 0.02)
    states = torch.randn(tokens, hidden, generator=generator, device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=generator, device=device)
    targets[::7] = -100  # some ignored positions, as a packed row's sample starts
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    scale = 1.0 / tokens
    loss_sum = head_loss_sum(head, states, targets, HeadLossSettings(impl, chunk_tokens=chunk), grad_scale=scale)
    (loss_sum * scale).backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) / GIB if cuda else None
    return {"loss": float(loss_sum.detach()), "grad_hidden": states.grad.detach(),
            "grad_weight": head.weight.grad.detach(), "peak_gib": peak, "seconds": seconds}


def phase_chunked_loss(ctx: Context, phase: Phase) -> None:
    import torch

    vocab, hidden = ctx.shapes["vocab"], ctx.shapes["hidden"]
    chunk = ctx.args.loss_chunk
    sizes = sorted(int(t) for t in ctx.args.loss_tokens.split(","))
    device = ctx.device
    cuda = device == "cuda"
    cases = [(sizes[0], torch.float32)] + [(t, torch.bfloat16) for t in sizes]
    rows = ["| supervised tokens | dtype | path | loss | peak GiB above inputs | seconds |",
            "|---:|---|---|---:|---:|---:|"]
    records = []
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 here
    try:
        for tokens, dtype in cases:
            name = str(dtype).replace("torch.", "")
            fp32 = dtype == torch.float32
            say(ctx.started, f"  loss at {tokens} supervised tokens, {name}")
            results = {}
            for impl in ("chunked", "full"):
                try:
                    results[impl] = loss_case(tokens, vocab, hidden, dtype, impl, chunk, device, ctx.args.seed + tokens)
                except torch.cuda.OutOfMemoryError:
                    results[impl] = None
                if cuda:
                    torch.cuda.empty_cache()
            chunked, full = results["chunked"], results["full"]
            if chunked is None:
                phase.check(f"{tokens} {name}: chunked path ran (out of GPU memory)", None, None)
                continue
            for impl, result in results.items():
                peak = "out of memory" if result is None else (
                    f"{result['peak_gib']:.2f}" if result["peak_gib"] is not None else "n/a (CPU)")
                rows.append(f"| {tokens} | {name} | {impl} | "
                            f"{'-' if result is None else format(result['loss'], '.6g')} | {peak} | "
                            f"{'-' if result is None else format(result['seconds'], '.3f')} |")
            record = {"tokens": tokens, "dtype": name, "chunked_peak_gib": chunked["peak_gib"],
                      "chunked_s": chunked["seconds"], "full_peak_gib": full and full["peak_gib"],
                      "full_s": full and full["seconds"], "full_out_of_memory": full is None}
            if full is not None:
                tol_loss, tol_grad = (1e-5, 1e-5) if fp32 else (1e-3, 2e-2)
                record.update(loss_error=abs(chunked["loss"] - full["loss"]) / abs(full["loss"]),
                              grad_hidden_error=relative_error(chunked["grad_hidden"], full["grad_hidden"]),
                              grad_weight_error=relative_error(chunked["grad_weight"], full["grad_weight"]))
                phase.check(f"{tokens} {name}: summed loss, relative difference", record["loss_error"], tol_loss)
                phase.check(f"{tokens} {name}: hidden-state gradient, relative L2", record["grad_hidden_error"],
                            tol_grad)
                phase.check(f"{tokens} {name}: head weight gradient, relative L2", record["grad_weight_error"],
                            tol_grad)
                if cuda:
                    phase.check(f"{tokens} {name}: chunked peak / full peak", chunked["peak_gib"] / full["peak_gib"],
                                1.0)
            records.append(record)
            del results, chunked, full
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    phase.data = {"vocab": vocab, "hidden": hidden, "chunk_tokens": chunk, "cases": records}
    phase.table = rows
    largest = records[-1] if records else {}
    if cuda and largest:
        full_peak = ("out of memory" if largest["full_out_of_memory"] else f"{largest['full_peak_gib']:.1f} GiB")
        phase.summary = (f"head {vocab} x {hidden}: at {largest['tokens']} bf16 tokens chunked peak "
                         f"{largest['chunked_peak_gib']:.1f} GiB vs full {full_peak}; losses and gradients equal "
                         f"within tolerance")
    else:
        phase.summary = f"head {vocab} x {hidden}: chunked = full at {', '.join(map(str, sizes))} tokens (CPU: " \
                        f"no peak memory)"


def sharded_init_available() -> str | None:
    """None when this commit has ZeRO-3 sharded initialisation, else why not."""
    import importlib.util

    from mlcd_vl.train.config import ModelConfig

    if "sharded_init" not in ModelConfig.__dataclass_fields__ or importlib.util.find_spec(
            "mlcd_vl.model.sharded") is None:
        return "not on this commit"
    return None


def phase_sharded_init(ctx: Context, phase: Phase) -> None:
    missing = sharded_init_available()
    if missing:
        raise Skip(missing)
    if package_version("deepspeed") is None:
        raise Skip("deepspeed is not installed on this machine (carry its wheel: bench/README.md)")
    import torch

    from mlcd_vl.model import tiny

    ctx.model = None  # free phase 2's model for the children's measurements
    if ctx.device == "cuda":
        torch.cuda.empty_cache()
    s = ctx.shapes
    layers = (s["layers"], s["tower_layers"]) if ctx.args.dry_run else (ctx.args.sharded_llm_layers,
                                                                         ctx.args.sharded_tower_layers)
    shapes = tiny.TinyShapes(llm_hidden=s["hidden"], llm_layers=layers[0], llm_heads=s["heads"],
                             llm_kv_heads=s["kv_heads"], llm_intermediate=s["intermediate"], vocab_padding=0,
                             tower_hidden=s["tower_hidden"], tower_layers=layers[1], tower_heads=s["tower_heads"],
                             tower_intermediate=s["tower_intermediate"], image_size=s["image_size"],
                             patch_size=s["patch_size"])
    root = Path(ctx.args.work_dir) / "sharded-assets"
    say(ctx.started, f"  writing random weights at real widths ({layers[0]} + {layers[1]} layers) to {root}")
    tokenizer_size = len(tiny.train_tokenizer(tiny.default_corpus()))
    shapes = tiny.TinyShapes(**{**shapes.__dict__, "vocab_padding": max(0, s["vocab"] - tokenizer_size)})
    assets = tiny.write_tiny_assets(root, shapes=shapes, tower_kind="mlcd", seed=ctx.args.seed)
    results = {}
    for mode in ("whole", "partitioned"):
        say(ctx.started, f"  {mode} build in a fresh process")
        out = root / f"{mode}.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--sharded-child", mode, "--child-llm",
                   str(assets["llm"]), "--child-tower", str(assets["tower"]), "--child-out", str(out),
                   "--seed", str(ctx.args.seed)] + (["--dry-run"] if ctx.args.dry_run else [])
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIME_BOX[5], check=False)
        if done.returncode != 0 or not out.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"{mode} build exited {done.returncode}: {' | '.join(tail)}")
        results[mode] = json.loads(out.read_text())
    whole, part = results["whole"], results["partitioned"]
    checksum_error = abs(part["checksum"] - whole["checksum"]) / max(abs(whole["checksum"]), 1e-30)
    phase.check("LLM + tower weights checksum, partitioned vs whole, relative", checksum_error, 1e-5)
    phase.check("parameters partitioned - whole", float(abs(part["params"] - whole["params"])), 0.0)
    # the host memory the build adds (peak RSS above the RSS after imports); bounded at real widths only, where the
    # weights dominate it (a tiny model's build is allocator noise)
    phase.check("host memory added by the build, partitioned / whole", part["host_build_gib"]
                / max(whole["host_build_gib"], 1e-9), None if ctx.args.dry_run else 1.0)
    if ctx.device == "cuda":  # one process holds the whole model either way: reported, not bounded
        phase.check("GPU peak partitioned / whole", part["gpu_peak_gib"] / whole["gpu_peak_gib"], None)
    phase.data = results
    phase.table = ["| build | parameters | host peak RSS GiB | added by the build GiB | GPU peak GiB | seconds |",
                   "|---|---:|---:|---:|---:|---:|"] + [
        f"| {mode} | {r['params'] / 1e9:.2f}B | {r['host_peak_gib']:.2f} | {r['host_build_gib']:.2f} | "
        f"{'n/a' if r['gpu_peak_gib'] is None else format(r['gpu_peak_gib'], '.2f')} | {r['seconds']:.1f} |"
        for mode, r in results.items()]
    phase.summary = (f"{whole['params'] / 1e9:.2f}B parameters: host memory added by the build "
                     f"{whole['host_build_gib']:.2f} -> {part['host_build_gib']:.2f} GiB"
                     + (f", GPU peak {whole['gpu_peak_gib']:.1f} -> {part['gpu_peak_gib']:.1f} GiB"
                        if ctx.device == "cuda" else ""))


def loaded_from_files(name: str) -> bool:
    """The LLM's and the tower's tensors (read from the files); the projector and image_newline are drawn fresh, from
    the CPU generator in one build and maybe the GPU's in the other, so they are left out of the checksum."""
    return "multi_modal_projector" not in name and "image_newline" not in name


def sharded_child(args: argparse.Namespace) -> int:
    """One build in this fresh process (phase 5): whole (float32 on the host, then to the device) or partitioned."""
    import socket

    import deepspeed  # in both builds, so that the host baseline holds the same libraries
    import torch
    from memory import current_rss_mib, peak_rss_mib

    from mlcd_vl.model.build import VLMSpec, build_vlm
    from mlcd_vl.presets import upstream_grid

    cuda = not args.dry_run
    dtype = torch.bfloat16 if cuda else torch.float32
    tower_size = json.loads((Path(args.child_tower) / "config.json").read_text())["image_size"]
    spec = VLMSpec(llm=args.child_llm, tower=args.child_tower, pinpoints=upstream_grid(tower_size), seed=args.seed)
    rss_before = current_rss_mib() / 1024
    start = time.perf_counter()
    if args.sharded_child == "whole":
        model, _, _ = build_vlm(spec)  # float32 on the host, as a run without sharded init builds it
        model.to(device="cuda" if cuda else "cpu", dtype=dtype)
        checksum, params = 0.0, 0
        for name, parameter in model.named_parameters():
            params += parameter.numel()
            if loaded_from_files(name):
                checksum += float(parameter.detach().double().sum())
    else:
        from mlcd_vl.model.sharded import build_vlm_partitioned

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        if cuda:
            torch.cuda.set_device(0)
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 3}, "bf16": {"enabled": cuda}}
        model, _, _ = build_vlm_partitioned(spec, config)
        checksum, params = 0.0, 0
        for name, parameter in model.named_parameters():
            with deepspeed.zero.GatheredParameters([parameter]):
                params += parameter.numel()
                if loaded_from_files(name):
                    checksum += float(parameter.detach().to(dtype).double().sum())
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    host_peak = peak_rss_mib() / 1024
    gpu_peak = torch.cuda.max_memory_allocated() / GIB if cuda else None
    Path(args.child_out).write_text(json.dumps({
        "params": params, "checksum": checksum, "seconds": seconds, "host_peak_gib": host_peak,
        "host_build_gib": host_peak - rss_before, "gpu_peak_gib": gpu_peak}))
    return 0


def phase_throughput(ctx: Context, phase: Phase) -> None:
    import gpu_step
    import torch

    from mlcd_vl.data.packing import first_fit_decreasing
    from mlcd_vl.train.metrics import FlopsModel, StepCounts

    if ctx.model is None:
        raise Skip("needs phase 2's model")
    model, args = ctx.model, ctx.args
    budget = args.token_budget
    steps, warmup = (1, 1) if args.dry_run else (args.steps, args.warmup)
    fitting = [s for s in ctx.pool if s.length <= budget]
    rows = [[fitting[i] for i in row] for row in first_fit_decreasing([s.length for s in fitting], budget)]
    rows = sorted(rows, key=lambda row: -sum(s.length for s in row))[:warmup + steps]  # the fullest rows
    if len(rows) < warmup + steps:
        raise RuntimeError(f"only {len(rows)} packed rows from the sample pool; lower --steps")
    result = gpu_step.run_mode("packed", model, ctx.settings, ctx.shapes, rows, ctx.attn, ctx.dtype, ctx.device,
                               warmup, f"1 row <= {budget}")
    timed = rows[warmup:]
    tokens_per_crop = (ctx.shapes["image_size"] // ctx.shapes["patch_size"]) ** 2 + 1  # patches + CLS
    crops = sum(image.crops.shape[0] for row in timed for s in row for image in s.images)
    counts = StepCounts(tokens=result.tokens, supervised=result.supervised, samples=result.samples,
                        tower_tokens=crops * tokens_per_crop)
    lm = model.model.language_model
    flops_model = FlopsModel(llm_params=count(lm.layers) + count(lm.norm) + count(model.model.multi_modal_projector)
                             + getattr(model.model, "image_newline", torch.zeros(0)).numel(),
                             tower_params=count(model.model.vision_tower), head_params=count(model.lm_head))
    with_tower, without_tower = flops_model.step_flops(counts), flops_model.step_flops(counts, with_tower=False)
    attention = 6 * ctx.shapes["layers"] * ctx.shapes["hidden"] * sum(s.length ** 2 for row in timed for s in row)
    total = result.step_s * result.steps
    peak = ctx.peak_tflops
    mfu = (with_tower / total / 1e12 / peak) if peak else None
    mfu_llm = (without_tower / total / 1e12 / peak) if peak else None
    phase.check("timed steps", float(result.steps), 0.0, above=True)
    phase.check("model FLOPs with tower > without > 0 (TFLOP)", (with_tower - without_tower) / 1e12, 0.0, above=True)
    phase.data = {"attention": result.attention, "token_budget": budget, "steps": result.steps, "warmup": warmup,
                  "step_seconds": result.seconds, "median_step_s": result.step_s,
                  "tokens_per_s": result.tokens / total, "supervised_tokens_per_s": result.supervised / total,
                  "samples_per_s": result.samples / total, "padding_fraction": 1 - result.tokens / result.tensor_tokens,
                  "peak_gpu_gib": None if ctx.device != "cuda" else result.peak_gib,
                  "flops_with_tower": with_tower, "flops_without_tower": without_tower,
                  "attention_flops_fraction": attention / with_tower, "peak_tflops": peak,
                  "model_tflops_per_s": with_tower / total / 1e12, "mfu_with_tower": mfu, "mfu_without_tower": mfu_llm,
                  "flops_model": flops_model.__dict__, "tower_tokens": counts.tower_tokens}
    d = phase.data
    pct = lambda x: "n/a" if x is None else f"{x:.1%}"  # noqa: E731
    peak_gib = "n/a" if d["peak_gpu_gib"] is None else f"{d['peak_gpu_gib']:.1f}"
    phase.table = ["| attention | row | step s (median) | tokens/s | supervised tokens/s | samples/s | peak GiB | "
                   "model TFLOP/s | MFU with tower | MFU without tower | attention FLOPs (not counted) |",
                   "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                   f"| {result.attention} | <= {budget} tokens | {result.step_s:.3f} | {d['tokens_per_s']:.0f} | "
                   f"{d['supervised_tokens_per_s']:.0f} | {d['samples_per_s']:.2f} | {peak_gib} | "
                   f"{d['model_tflops_per_s']:.1f} | {pct(mfu)} | {pct(mfu_llm)} | "
                   f"{d['attention_flops_fraction']:.1%} of counted |"]
    phase.summary = (f"{d['tokens_per_s']:.0f} tokens/s, {d['samples_per_s']:.2f} samples/s, peak {peak_gib} GiB, "
                     f"MFU {pct(mfu)} with tower / {pct(mfu_llm)} without ({result.steps} steps, {result.attention})")


PHASE_FUNCTIONS = {1: phase_environment, 2: phase_real_widths, 3: phase_packed_vs_unpacked, 4: phase_chunked_loss,
                   5: phase_sharded_init, 6: phase_throughput}


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny widths on CPU in float32: code paths only")
    parser.add_argument("--out", default=str(common.RESULTS))
    parser.add_argument("--budget-s", type=float, default=450.0, help="overall time budget of the phases (450)")
    parser.add_argument("--hard-limit-s", type=float, default=560.0, help="watchdog: exit 3 after this (560)")
    parser.add_argument("--phases", default="1,2,3,4,5,6", help="which phases to run (1 always runs, 2 with 3 or 6)")
    parser.add_argument("--llm-layers", type=int, default=7, help="Qwen2.5-7B layers kept (7 of 28)")
    parser.add_argument("--tower-layers", type=int, default=12, help="bigG-448 layers kept (12 of 48)")
    parser.add_argument("--token-budget", type=int, default=16384, help="tokens per packed row (16384)")
    parser.add_argument("--steps", type=int, default=6, help="timed throughput steps (6)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--loss-tokens", default="8192,32768", help="supervised tokens of phase 4")
    parser.add_argument("--loss-chunk", type=int, default=1024, help="chunked loss positions per chunk (1024)")
    parser.add_argument("--sharded-llm-layers", type=int, default=2)
    parser.add_argument("--sharded-tower-layers", type=int, default=4)
    parser.add_argument("--attn", default=None, help="attention (default flash_attention_2 when flash_attn "
                                                     "imports on CUDA, else sdpa: packed rows run sdpa_varlen)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak (by name)")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    for name in ("--sharded-child", "--child-llm", "--child-tower", "--child-out"):
        parser.add_argument(name, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run:
        args.token_budget, args.loss_tokens, args.loss_chunk = min(args.token_budget, 1024), "512,2048", 256
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sharded_child:
        return sharded_child(args)
    load_before = common.load_average()
    import tempfile

    import torch

    if not args.dry_run and common.cuda_missing("gpu_acceptance.py"):
        return common.NO_CUDA_EXIT
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    device = "cpu" if args.dry_run else "cuda"
    ctx = Context(args, started, device, dtype=torch.float32 if args.dry_run else torch.bfloat16,
                  shapes=DRY if args.dry_run else real_shapes(args.llm_layers, args.tower_layers))
    torch.manual_seed(args.seed)
    card = "dry-run-cpu" if args.dry_run else common.machine_name("cuda")
    path = common.result_path(args.out, "gpu_acceptance", card)
    title = "GPU acceptance" + (" dry run (CPU, tiny widths, float32: code paths only)" if args.dry_run else "")
    header = common.header(title, common.command_line("gpu_acceptance.py", argv), load_before, [
        f"budget {args.budget_s:.0f} s for the phases (time box each: {TIME_BOX} s on the GPU), watchdog at "
        f"{args.hard_limit_s:.0f} s; phases run in the order {', '.join(map(str, RUN_ORDER))}",
        "FLOPs and tolerances: the script's docstring"])
    report = Report(path, title, header, {"card": card, "date": common.today(), "dry_run": args.dry_run,
                                          "command": common.command_line("gpu_acceptance.py", argv)})
    wanted = {1} | {int(x) for x in args.phases.split(",") if x.strip()}
    if wanted & {3, 6}:
        wanted.add(2)  # their model

    def watchdog():
        print(f"gpu_acceptance.py: watchdog at {args.hard_limit_s:.0f} s; results so far are in {path}",
              file=sys.stderr, flush=True)
        os._exit(WATCHDOG_EXIT)

    timer = threading.Timer(args.hard_limit_s, watchdog)
    timer.daemon = True
    timer.start()
    scratch = tempfile.TemporaryDirectory(prefix="gpu-acceptance-")
    args.work_dir = args.work_dir or scratch.name
    say(started, f"writing {path} (and .json) after every phase")
    try:
        for number in RUN_ORDER:
            phase = report.phases[number]
            left = args.budget_s - (time.perf_counter() - started)
            if number not in wanted:
                phase.status, phase.summary = "skipped", "not asked for (--phases)"
            elif left < MIN_START[number] and not args.dry_run:
                phase.status, phase.summary = "skipped", f"out of the time budget ({left:.0f} s left)"
            else:
                run_phase(ctx, phase, None if args.dry_run else min(TIME_BOX[number], left))
                if number == 1 and phase.status != "pass":
                    report.save()
                    break
            report.save()
    finally:
        timer.cancel()
        scratch.cleanup()
    report.save(echo=True)
    failed = [n for n, p in report.phases.items() if p.status in ("fail", "error", "timeout")]
    say(started, "all phases that ran passed" if not failed else f"FAILED phases: {failed}")
    return 1 if failed else 0


def run_phase(ctx: Context, phase: Phase, box: float | None) -> None:
    import torch

    say(ctx.started, f"phase {phase.number} {PHASES[phase.number]} ..." + (f" (time box {box:.0f} s)" if box else ""))
    start = time.perf_counter()
    try:
        with time_box(box):
            PHASE_FUNCTIONS[phase.number](ctx, phase)
        phase.status = "pass" if all(c.passed for c in phase.checks) else "fail"
    except Skip as reason:
        phase.status, phase.summary = "skipped", str(reason)
    except PhaseTimeout as error:
        phase.status, phase.summary = "timeout", f"{error}; {phase.summary}".rstrip("; ")
    except torch.cuda.OutOfMemoryError as error:
        phase.status, phase.summary = "error", f"out of GPU memory: {str(error).splitlines()[0]}"
    except Exception as error:  # noqa: BLE001  (one phase's failure must not lose the others)
        traceback.print_exc()
        first_line = str(error).splitlines()[0] if str(error) else ""
        phase.status, phase.summary = "error", f"{type(error).__name__}: {first_line}"
    finally:
        phase.seconds = time.perf_counter() - start
        if ctx.device == "cuda":
            torch.cuda.empty_cache()
    failed = [c.line() for c in phase.checks if not c.passed]
    say(ctx.started, f"phase {phase.number} {phase.status} in {phase.seconds:.1f} s: {phase.summary}"
        + (f" | failed: {'; '.join(failed)}" if failed else ""))


if __name__ == "__main__":
    sys.exit(main())
