"""Peak memory (RSS) of one stage-2 training step, padded vs packed layouts of the same samples, fresh processes.

    python bench/memory.py                           # token budgets 2048, 4096, 8192 (~2-4 min)
    python bench/memory.py --quick                   # tiny model, budget 512: code-path check
    python bench/memory.py --budgets 4096 16384 --out bench/results

For each token budget the parent writes the small stage-2 model's assets (4-layer Qwen2 of width 256, 4-layer MLCD
tower at 112 px, anyres) and a synthetic LLaVA-NeXT-Data-shaped record set once, then starts one fresh Python
process per (budget, layout). The child builds the model and the samples, takes the first records whose lengths sum
to at most the budget (the same samples for every layout) and collates them right-padded (`PaddingCollator`,
B rows x longest sample), packed into one row with no mask (`sdpa_varlen`: per-sample attention, what training
uses) or packed with the [1, 1, T, T] float32 block mask on plain SDPA (`packed_mask`, the older path), then runs
`forward_loss` + `backward` once (float32, CPU).

Reported per child, from `resource.getrusage(RUSAGE_SELF).ru_maxrss` (the process's high-water mark, psutil-free) and
`/proc/self/statm` (current RSS): RSS before the step, peak RSS after it, and the step's own peak (peak after - RSS
before; only meaningful because the step's peak is above everything before it, which the table checks).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # bench/ is on sys.path: the script's own folder

LAYOUTS = ("padded", "packed", "packed_mask")


def current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: fall back to the high-water mark
        return peak_rss_mib()


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def shapes_for(quick: bool):
    from mlcd_vl.model.tiny import TinyShapes

    return TinyShapes() if quick else common.small_shapes()


def child(root: Path, layout: str, budget: int, quick: bool, threads: int) -> dict:
    """Runs in the fresh process: build, collate, one forward + backward; returns the measurements."""
    import torch
    from transformers.utils import logging as hf_logging

    from mlcd_vl.data.collate import PaddingCollator
    from mlcd_vl.data.dataset import SupervisedDataset
    from mlcd_vl.data.packing import PackingCollator
    from mlcd_vl.data.config import DataConfig
    from mlcd_vl.model.varlen import composite_attention
    from mlcd_vl.train.step import TrainBatch, forward_loss, plan_micro_batches

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    model, tokenizer, settings = common.build_small_vlm(root, shapes_for(quick))
    model.train()
    dataset = SupervisedDataset.from_config(DataConfig(train=str(root / "data" / "records.json"),
                                                       image_folder=str(root / "data"), max_length=budget),
                                            tokenizer, settings)
    samples, total = [], 0
    for index in range(len(dataset)):
        sample = dataset[index]
        if not hasattr(sample, "length") or total + sample.length > budget:
            continue
        samples.append(sample)
        total += sample.length
        if total > budget - 16:
            break
    if layout in ("packed", "packed_mask"):
        model.set_attn_implementation(composite_attention("sdpa", packing=layout == "packed"))
        collated = PackingCollator.for_model(tokenizer, build_4d_mask=layout == "packed_mask")(samples)
    else:
        collated = PaddingCollator.for_model(tokenizer)(samples)
    batch = TrainBatch.from_collated(collated)
    mask = collated["attention_mask"]
    before_peak, before = peak_rss_mib(), current_rss_mib()
    start = time.perf_counter()
    output = forward_loss(model, settings, batch, plan_micro_batches([batch]))
    output.loss.backward()
    seconds = time.perf_counter() - start
    after = peak_rss_mib()
    return {"layout": layout, "budget": budget, "samples": len(samples), "tokens": total,
            "shape": list(batch.input_ids.shape), "tensor_tokens": int(batch.input_ids.numel()),
            "mask_mib": mask.numel() * mask.element_size() / 2**20 if mask is not None else 0.0,
            "crops": sum(image.crops.shape[0] for image in batch.images),
            "rss_before": before, "peak_before": before_peak, "peak_after": after, "step_peak": after - before,
            "seconds": seconds, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--records", type=int, default=96, help="synthetic records to draw the samples from")
    parser.add_argument("--quick", action="store_true", help="tiny model, budget 512: checks the code path only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child (default 1)")
    parser.add_argument("--out", default=str(common.RESULTS))
    parser.add_argument("--child", nargs=3, metavar=("ROOT", "LAYOUT", "BUDGET"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = child(Path(args.child[0]), args.child[1], int(args.child[2]), args.quick, args.threads)
        print("RESULT " + json.dumps(result))
        return 0
    if args.quick:
        args.budgets, args.records = [512], min(args.records, 16)
    import torch

    torch.set_num_threads(args.threads)  # as in the children, so the header's software line says so
    load_before = common.load_average()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        from mlcd_vl.model import tiny

        # the assets the children reuse (build_small_vlm finds them by their stamp)
        tiny.write_tiny_assets(root / "assets", corpus=common.corpus(), shapes=shapes_for(args.quick))
        common.make_records(root / "data", args.records)
        for budget in args.budgets:
            for layout in LAYOUTS:
                command = [sys.executable, str(Path(__file__).resolve()), "--child", str(root), layout, str(budget),
                           "--threads", str(args.threads)]
                done = subprocess.run(command + (["--quick"] if args.quick else []), check=False,
                                      capture_output=True, text=True,
                                      env=dict(os.environ, TRANSFORMERS_VERBOSITY="error"))
                found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode != 0 or not found:
                    sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
                    raise SystemExit(f"memory child {layout} at budget {budget} failed (exit {done.returncode})")
                rows.append(json.loads(found[-1][len("RESULT "):]))
                print(f"budget {budget} {layout}: step peak {rows[-1]['step_peak']:.0f} MiB", flush=True)
    shapes = shapes_for(args.quick)
    out_path = common.result_path(args.out, "memory")
    lines = common.header("Peak memory of a stage-2 training step", common.command_line("memory.py", argv),
                          load_before, [
        f"model: {shapes.llm_layers}-layer Qwen2 (width {shapes.llm_hidden}) + {shapes.tower_layers}-layer MLCD tower "
        f"at {shapes.image_size} px, anyres; float32, CPU, SDPA, forward_loss + backward once, "
        f"{rows[0]['threads']} torch threads; every row is a fresh process",
        "the same samples in every layout of a budget: padded = B rows x longest sample, packed = one row, "
        "sdpa_varlen (no mask), packed_mask = one row with the [1, 1, T, T] float32 block mask on plain SDPA; RSS "
        "from ru_maxrss (peak) and /proc/self/statm (current)"])
    lines += ["| budget | layout | samples | tokens | tensor shape | mask MiB | crops | RSS before MiB | "
              "peak after MiB | step peak MiB | step s |", "|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        shape = "x".join(str(n) for n in row["shape"])
        lines.append(f"| {row['budget']} | {row['layout']} | {row['samples']} | {row['tokens']} | {shape} | "
                     f"{row['mask_mib']:.1f} | {row['crops']} | {row['rss_before']:.0f} | {row['peak_after']:.0f} | "
                     f"{row['step_peak']:.0f} | {row['seconds']:.2f} |")
    lines.append("")
    for budget in args.budgets:
        padded, packed, masked = (next(r for r in rows if r["budget"] == budget and r["layout"] == layout)
                                  for layout in LAYOUTS)
        ratio = packed["step_peak"] / max(padded["step_peak"], 1e-9)
        masked_ratio = masked["step_peak"] / max(padded["step_peak"], 1e-9)
        lines.append(f"- budget {budget}: packed step peak / padded = {ratio:.2f}x, with the 4D mask "
                     f"{masked_ratio:.2f}x (tensor tokens {packed['tensor_tokens']} vs {padded['tensor_tokens']}; the "
                     f"mask alone is {masked['mask_mib']:.0f} MiB and grows as T^2)")
    suspicious = [r for r in rows if r["peak_after"] <= r["peak_before"] + 1]
    if suspicious:
        lines.append(f"- caution: {len(suspicious)} row(s) peaked before the step, so their step peak is a lower "
                     "bound")
    if args.quick:
        lines += ["", "_--quick: the tiny model at one small budget; a code-path check only._"]
    common.write_result(out_path, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
