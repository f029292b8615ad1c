"""Training throughput with packing vs padding: supervised tokens/s, samples/s and padding fraction, side by side.

    python bench/train_throughput.py                 # full run: 320 records, token budget 2048 (~10 min, quiet machine)
    python bench/train_throughput.py --quick         # code-path check: the tiny model, 12 records, budget 512
    python bench/train_throughput.py --records 1000 --token-budget 4096 --out bench/results

Builds a small stage-2 model (4-layer Qwen2 of width 256, 4-layer MLCD RoPE2D tower at 112 px, anyres with
upstream's 5-pinpoint grid, random weights) and a synthetic record set shaped like LLaVA-NeXT-Data (`common.
make_records`: many short single-turn samples, a quarter with detailed answers, a long tail of multi-turn ones, mixed
aspect ratios, 10% text-only). All samples are built once (pixels included, not timed), then one epoch is trained
three times from the same initial weights, with the same step code (`train.step.forward_loss`, AdamW, clipping):

- **padded**: random order, fixed batch size B, right padding (`PaddingCollator`);
- **grouped**: `LengthGroupedBatchSampler` (upstream's length + modality grouping), same B;
- **packed**: `PackedBatchSampler` (first-fit-decreasing under the token budget) + `PackingCollator` with its 4D
  block-diagonal causal mask (SDPA on CPU).

Same token budget per micro-batch: a packed row holds at most `--token-budget` tokens; the padded modes use
B = round(budget / mean sample length), so every mode feeds the same real tokens per micro-batch on average and
the loss curves are comparable step for step. Padding fraction = padding / tensor tokens (for packing: the unused
part of the budget, 1 - tokens / (rows * budget)). Only the training step is timed (collation is timed apart).

Packing's own cost is measured too: on the first packed rows, the same step with the 4D mask and with a plain causal
mask (no sample isolation, same tokens): the difference is what the O(T^2) mask costs on CPU SDPA (the GPU path
uses flash-attention varlen, which has no mask). The three loss curves go into a PNG next to the result file.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

MODES = ("padded", "grouped", "packed")


@dataclass
class ModeRun:
    mode: str
    batch_size: str
    steps: int = 0
    samples: int = 0
    supervised: int = 0
    real_tokens: int = 0
    tensor_tokens: int = 0  # B x L for padded, rows x budget for packed
    step_seconds: float = 0.0
    collate_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)  # supervised tokens seen after each step

    @property
    def padding(self) -> float:
        return 1 - self.real_tokens / max(self.tensor_tokens, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.supervised / self.step_seconds

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.step_seconds


def batches_for(mode: str, table, batch_size: int, budget: int, seed: int) -> list[list[int]]:
    import torch

    from mlcd_vl.data.samplers import LengthGroupedBatchSampler, PackedBatchSampler

    if mode == "padded":
        valid = table.valid
        order = [int(valid[i]) for i in torch.randperm(len(valid), generator=torch.Generator().manual_seed(seed))]
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if mode == "grouped":
        return list(LengthGroupedBatchSampler(table.lengths, table.has_image, batch_size, seed=seed))
    return list(PackedBatchSampler(table.lengths, budget, seed=seed))


def collator_for(mode: str, tokenizer, settings):
    from mlcd_vl.data.collate import PaddingCollator
    from mlcd_vl.data.packing import PackingCollator

    if mode == "packed":
        return PackingCollator.for_model(tokenizer, settings, build_4d_mask=True)
    return PaddingCollator.for_model(tokenizer, settings)


def train_step(model, settings, optimizer, batch) -> tuple[float, int]:
    """One micro-batch = one optimizer step: forward_loss, backward, clip at 1.0, AdamW. Returns (mean loss, count)."""
    import torch

    from mlcd_vl.train.step import forward_loss, plan_micro_batches

    step = plan_micro_batches([batch])
    output = forward_loss(model, settings, batch, step)
    output.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(output.loss_sum) / max(output.supervised_tokens, 1), output.supervised_tokens


def run_modes(modes: tuple[str, ...], model, initial: dict, settings, tokenizer, samples: dict,
              plans: dict[str, list[list[int]]], budget: int, batch_size: int, lr: float) -> list[ModeRun]:
    """Train every mode from the same initial weights, one step of each mode in turn (round-robin), so that bursts
    of other work on the machine slow all modes alike. Each mode has its own model copy and AdamW state."""
    import torch

    from mlcd_vl.train.step import TrainBatch

    states = {}
    for mode in modes:
        copy_ = copy.deepcopy(model)
        copy_.load_state_dict(initial)
        collate = collator_for(mode, tokenizer, settings)
        warm = torch.optim.AdamW(copy_.parameters(), lr=lr, weight_decay=0.0)
        train_step(copy_, settings, warm, TrainBatch.from_collated(collate([samples[i] for i in plans[mode][0]])))
        copy_.load_state_dict(initial)  # the warm-up step is thrown away
        optimizer = torch.optim.AdamW(copy_.parameters(), lr=lr, weight_decay=0.0)
        run = ModeRun(mode, f"rows of <= {budget} tokens" if mode == "packed" else str(batch_size))
        states[mode] = (copy_, optimizer, collate, run)
    for step in range(max(len(plans[mode]) for mode in modes)):
        for mode in modes:
            if step >= len(plans[mode]):
                continue
            replica, optimizer, collate, run = states[mode]
            indices = plans[mode][step]
            start = time.perf_counter()
            batch = TrainBatch.from_collated(collate([samples[i] for i in indices]))
            middle = time.perf_counter()
            loss, count = train_step(replica, settings, optimizer, batch)
            end = time.perf_counter()
            run.collate_seconds += middle - start
            run.step_seconds += end - middle
            run.steps += 1
            run.samples += len(indices)
            run.supervised += count
            run.real_tokens += sum(samples[i].length for i in indices)
            tensor = max(budget, batch.input_ids.shape[1]) if mode == "packed" else int(batch.input_ids.numel())
            run.tensor_tokens += tensor
            run.losses.append(loss)
            run.seen.append(run.supervised)
    return [states[mode][3] for mode in modes]


def mask_cost(model, initial: dict, settings, tokenizer, samples: list, plan: list[list[int]], rows: int,
              lr: float) -> dict:
    """Median step time of packed rows with the 4D block mask vs the same rows with a plain causal mask."""
    import torch

    from mlcd_vl.data.packing import PackingCollator, block_causal_mask
    from mlcd_vl.train.step import TrainBatch

    collate = PackingCollator.for_model(tokenizer, settings, build_4d_mask=True)
    with_mask, causal, build = [], [], []
    model.load_state_dict(initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for indices in plan[:rows]:
        collated = collate([samples[i] for i in indices])
        start = time.perf_counter()
        block_causal_mask(collated["seq_lengths"])
        build.append(time.perf_counter() - start)
        packed = TrainBatch.from_collated(collated)
        plain = TrainBatch(packed.input_ids, packed.labels, torch.ones_like(packed.input_ids), None, packed.images)
        for batch, times in ((packed, with_mask), (plain, causal)):
            start = time.perf_counter()
            train_step(model, settings, optimizer, batch)
            times.append(time.perf_counter() - start)
    model.load_state_dict(initial)
    attention = [attention_times(model, [samples[i].length for i in indices]) for indices in plan[:rows]]
    return {"rows": len(with_mask), "mask": statistics.median(with_mask), "causal": statistics.median(causal),
            "build": statistics.median(build),
            "tokens": statistics.median(sum(samples[i].length for i in idx) for idx in plan[:rows]),
            **{key: statistics.median(a[key] for a in attention) for key in attention[0]}}


def attention_times(model, lengths: list[int], repeats: int = 2) -> dict:
    """SDPA forward + backward of all LLM layers (q, k, v of the model's shapes, random) for one packed row's samples:
    - `attn_packed`: one [T, T] call with the 4D block-diagonal mask (what the packed step does on CPU);
    - `attn_padded`: the same samples right-padded to the longest, B x [L, L] with a causal + padding mask;
    - `attn_varlen`: each sample alone, causal (what flash-attention varlen computes: the diagonal blocks only)."""
    import torch
    import torch.nn.functional as F

    from mlcd_vl.data.packing import block_causal_mask

    config = model.model.language_model.config
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    head_dim = config.hidden_size // heads

    def timed(shape_b: int, length: int, mask) -> float:
        best = float("inf")
        for _ in range(repeats):
            q, k, v = (torch.randn(shape_b, heads, length, head_dim, requires_grad=True) for _ in range(3))
            start = time.perf_counter()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
            out.sum().backward()
            best = min(best, time.perf_counter() - start)
        return best * layers

    total, longest = sum(lengths), max(lengths)
    segments = torch.zeros(len(lengths), longest, dtype=torch.long)
    for row, n in enumerate(lengths):
        segments[row, :n] = 1
    return {"attn_packed": timed(1, total, block_causal_mask(lengths)),
            "attn_padded": timed(len(lengths), longest, block_causal_mask(segments)),
            "attn_varlen": sum(timed(1, n, None) for n in lengths)}


def smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(runs: list[ModeRun], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    for run in runs:
        window = max(1, len(run.losses) // 20)
        axis.plot(run.seen, run.losses, alpha=0.25, linewidth=0.8)
        axis.plot(run.seen, smooth(run.losses, window), label=f"{run.mode} ({run.steps} steps)",
                  color=axis.lines[-1].get_color())
    axis.set_xlabel("supervised tokens seen")
    axis.set_ylabel("training loss (token mean of the micro-batch)")
    axis.set_title("Same records, same initial weights: padded vs grouped vs packed")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def loss_at(run: ModeRun, fraction: float, width: float = 0.1) -> float:
    """Mean step loss over the steps whose supervised-token position lies in [fraction - width, fraction]."""
    total = run.seen[-1]
    picked = [loss for loss, seen in zip(run.losses, run.seen) if (fraction - width) * total < seen <= fraction * total]
    return statistics.mean(picked) if picked else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--records", type=int, default=320, help="synthetic records (one epoch per mode)")
    parser.add_argument("--token-budget", type=int, default=2048, help="tokens per micro-batch (packed row length)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine a descheduled second OpenMP thread stalls "
                             "every parallel region; use the core count on a quiet machine)")
    parser.add_argument("--mask-rows", type=int, default=6, help="packed rows timed with and without the 4D mask")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model (width 64, 56 px), 12 records, budget 512, 1 mask row: code path only")
    parser.add_argument("--out", default=str(common.RESULTS))
    args = parser.parse_args(argv)
    shapes = common.small_shapes()
    if args.quick:
        from mlcd_vl.model.tiny import TinyShapes

        shapes = TinyShapes()
        args.records, args.mask_rows, args.token_budget = min(args.records, 12), 1, min(args.token_budget, 512)
    load_before = common.load_average()

    import torch
    from transformers.utils import logging as hf_logging

    from mlcd_vl.data.dataset import SupervisedDataset, scan
    from mlcd_vl.data.samples import DataConfig

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        model, tokenizer, settings = common.build_small_vlm(root, shapes, seed=args.seed)
        model.train()
        initial = copy.deepcopy(model.state_dict())
        records = common.make_records(root / "data", args.records, seed=args.seed)
        dataset = SupervisedDataset.from_config(DataConfig(data=str(records), image_folder=str(root / "data"),
                                                           max_length=4096), tokenizer, settings)
        table = scan(dataset)
        start = time.perf_counter()
        samples = {int(i): dataset[int(i)] for i in table.valid}
        data_seconds = time.perf_counter() - start
        setup_seconds = time.perf_counter() - started
    lengths = table.lengths[table.valid]
    mean_length = float(lengths.mean())
    batch_size = max(1, round(args.token_budget / mean_length))
    plans = {mode: batches_for(mode, table, batch_size, args.token_budget, args.seed) for mode in MODES}
    runs = run_modes(MODES, model, initial, settings, tokenizer, samples, plans, args.token_budget, batch_size,
                     args.lr)
    for run in runs:
        print(f"{run.mode}: {run.steps} steps, {run.tokens_per_s:.0f} supervised tokens/s", flush=True)
    packed_plan = batches_for("packed", table, batch_size, args.token_budget, args.seed)
    cost = mask_cost(model, initial, settings, tokenizer, samples, packed_plan, args.mask_rows, args.lr)

    by = {run.mode: run for run in runs}
    vs_padded = by["packed"].tokens_per_s / by["padded"].tokens_per_s
    vs_grouped = by["packed"].tokens_per_s / by["grouped"].tokens_per_s
    out_path = common.result_path(args.out, "train_throughput")
    png = plot(runs, out_path.with_name(out_path.stem + "_loss.png"))
    image_share = float(table.has_image[table.valid].mean())
    lines = common.header("Training throughput, padding vs packing", common.command_line("train_throughput.py", argv),
                          load_before, [
        f"model: {shapes.llm_layers}-layer Qwen2 (width {shapes.llm_hidden}, {shapes.llm_heads} heads, "
        f"{shapes.llm_kv_heads} KV heads, FFN {shapes.llm_intermediate}) + {shapes.tower_layers}-layer MLCD tower "
        f"(width {shapes.tower_hidden}) at {shapes.image_size} px, anyres "
        f"5-pinpoint grid, float32 on CPU, SDPA; {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; "
        f"AdamW lr {args.lr}, clip 1.0, one micro-batch per step; the three modes run round-robin, one step each in "
        "turn, so load bursts hit them alike",
        f"data: {len(samples)} synthetic LLaVA-NeXT-Data-shaped records ({image_share:.0%} with an image), "
        f"sample length min {int(lengths.min())} / median {int(statistics.median(lengths.tolist()))} / mean "
        f"{mean_length:.0f} / max {int(lengths.max())} tokens; building all samples took {data_seconds:.1f} s "
        f"(not in the step times; setup {setup_seconds:.0f} s)",
        f"token budget {args.token_budget} per micro-batch: packed rows <= budget, padded batch size B = "
        f"round(budget / mean length) = {batch_size}"])
    lines += ["| mode | batch | steps | samples/s | supervised tokens/s | padding fraction | step s (mean) | "
              "collate s (total) | loss at 50% | loss at 100% |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        lines.append(f"| {run.mode} | {run.batch_size} | {run.steps} | {run.samples_per_s:.2f} | "
                     f"{run.tokens_per_s:.1f} | {run.padding:.1%} | {run.step_seconds / run.steps:.3f} | "
                     f"{run.collate_seconds:.2f} | {loss_at(run, 0.5):.3f} | {loss_at(run, 1.0):.3f} |")
    packed = by["packed"]
    unmasked = cost["mask"] / cost["causal"]
    verdict = lambda ok: "met" if ok else "**MISSED**"  # noqa: E731
    lines += ["", "Targets (supervised tokens/s ratios from this one run):", "",
              f"- packed / padded = **{vs_padded:.2f}x** (target >= 2x: {verdict(vs_padded >= 2)})",
              f"- packed / grouped = **{vs_grouped:.2f}x** (target >= 1.3x: {verdict(vs_grouped >= 1.3)})",
              f"- ceiling if a step cost only its tensor tokens: packed / padded <= (1 - {packed.padding:.1%}) / "
              f"(1 - {by['padded'].padding:.1%}) = {(1 - packed.padding) / (1 - by['padded'].padding):.2f}x, packed / "
              f"grouped <= {(1 - packed.padding) / (1 - by['grouped'].padding):.2f}x: removing padding cannot give "
              f"more than this on this length distribution",
              f"- packed padding fraction = **{packed.padding:.1%}** (target < 3%: {verdict(packed.padding < 0.03)})",
              f"- loss curves: mean step loss over the last 10% of supervised tokens: padded "
              f"{loss_at(by['padded'], 1):.3f}, grouped {loss_at(by['grouped'], 1):.3f}, packed "
              f"{loss_at(by['packed'], 1):.3f}"
              + (f" (plot: `{png.name}`)" if png else " (matplotlib missing: no plot)"),
              "", f"Cost of the 4D block mask (median of {cost['rows']} packed rows of ~{cost['tokens']:.0f} tokens, "
                  f"same step):", "",
              f"- step with the 4D block-diagonal mask: {cost['mask']:.3f} s; with a plain causal mask (SDPA's "
              f"is_causal path, no isolation): {cost['causal']:.3f} s -> the mask costs "
              f"**{(cost['mask'] - cost['causal']) / cost['mask']:.0%}** of the packed step "
              f"(building it: {cost['build'] * 1000:.1f} ms per row)",
              f"- without that cost packed would run at ~{packed.tokens_per_s * unmasked:.1f} supervised tokens/s "
              f"({vs_padded * unmasked:.2f}x padded, {vs_grouped * unmasked:.2f}x grouped)",
              f"- attention alone (SDPA forward + backward, all {model.config.text_config.num_hidden_layers} layers, "
              f"median per row): packed row with the block mask {cost['attn_packed']:.3f} s "
              f"(**{cost['attn_packed'] / cost['mask']:.0%}** of the packed step), the same samples padded "
              f"{cost['attn_padded']:.3f} s, each sample alone as varlen would {cost['attn_varlen']:.3f} s: SDPA "
              f"computes the whole T x T square, so packing pays "
              f"{cost['attn_packed'] / max(cost['attn_varlen'], 1e-9):.1f}x the attention of per-sample blocks; "
              f"with varlen-style attention the packed step would take ~"
              f"{cost['mask'] - cost['attn_packed'] + cost['attn_varlen']:.3f} s -> ~"
              f"{vs_padded * cost['mask'] / (cost['mask'] - cost['attn_packed'] + cost['attn_varlen']):.2f}x padded"]
    if args.quick:
        lines += ["", "_--quick: a code-path check on a handful of records; the numbers mean nothing._"]
    common.write_result(out_path, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
