"""Peak memory and time of the LM head + cross-entropy, full logits vs chunked, at Qwen2.5-7B's head, fresh processes.

    python bench/loss_memory.py                          # 2k / 4k / 8k / 32k supervised tokens, bf16 and fp32 (~1 h)
    python bench/loss_memory.py --quick                  # vocab 4096, hidden 256, 512 / 2048 tokens: code path only
    python bench/loss_memory.py --dtypes fp32 --max-minutes 30  # one dtype: loss_memory-fp32_<machine>_<date>.md

Each case (supervised tokens, dtype, path) runs in a fresh Python process: it allocates the head weight
[vocab, hidden] (151936 x 3584 by default) and the hidden states of the supervised positions [tokens, hidden], both
requiring gradients, then runs `train.head_loss.head_loss_sum` with `optim.loss_impl` full or chunked (default chunk
of 1024 positions) and `backward` once, CPU, one torch thread. Peak RSS comes from `ru_maxrss` (the process's
high-water mark) and the RSS before the step from `/proc/self/statm`; the step's own peak is their difference (it
includes the [vocab, hidden] weight gradient that both paths produce). A case whose estimated need exceeds the
memory available on this machine (minus a margin), or that would start after `--max-minutes`, is not run: its row
is extrapolated from the measured cases of the same path and dtype (a straight line through the two largest, or
through the origin from one), and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from memory import current_rss_mib, peak_rss_mib  # noqa: E402

PATHS = ("full", "chunked")
DTYPES = {"fp32": 4, "bf16": 2}  # bytes per element
GIB = 2 ** 30
MARGIN_GIB = 4.0  # left to the other work on this shared machine


def available_gib() -> float:
    """MemAvailable from /proc/meminfo (Linux); infinite elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return float("inf")


def estimated_gib(path: str, tokens: int, vocab: int, hidden: int, dtype: str, chunk: int) -> float:
    """A generous estimate of the whole process at its peak: inputs, weight gradient, logits machinery."""
    size = DTYPES[dtype]
    inputs = (vocab * hidden + tokens * hidden) * size + 0.5 * GIB  # + interpreter and torch
    if path == "full":  # measured on main: 11.8 bytes per (token x vocab) in fp32 and bf16 alike
        step = 12.5 * tokens * vocab + vocab * hidden * size + 2 * tokens * hidden * size
    else:  # float32 accumulator + result for a low-precision head; about 12 bytes per (chunk row x vocab)
        step = vocab * hidden * (4 + (size if size != 4 else 0)) + 12 * min(chunk, tokens) * vocab \
            + 2 * tokens * hidden * size
    return (inputs + step) / GIB


def child(tokens: int, dtype_name: str, path: str, vocab: int, hidden: int, chunk: int, threads: int) -> dict:
    """Runs in the fresh process: inputs, one loss + backward; returns the measurements."""
    import torch
    from torch import nn

    from mlcd_vl.train.head_loss import HeadLossSettings, head_loss_sum

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    head = nn.Linear(hidden, vocab, bias=False, device="meta")
    head.weight = nn.Parameter(torch.empty(vocab, hidden, dtype=dtype).normal_(0, 0.02))  # no float32 detour
    states = torch.empty(tokens, hidden, dtype=dtype).normal_().requires_grad_()
    targets = torch.randint(0, vocab, (tokens,))
    settings = HeadLossSettings(path, chunk_tokens=chunk)
    scale = 1.0 / tokens  # the step-global normalisation of one micro-batch
    before_peak, before = peak_rss_mib(), current_rss_mib()
    start = time.perf_counter()
    loss_sum = head_loss_sum(head, states, targets, settings, grad_scale=scale)
    forward = time.perf_counter() - start
    (loss_sum * scale).backward()
    total = time.perf_counter() - start
    after = peak_rss_mib()
    assert head.weight.grad is not None and states.grad is not None
    return {"tokens": tokens, "dtype": dtype_name, "path": path, "vocab": vocab, "hidden": hidden, "chunk": chunk,
            "loss": float(loss_sum) / tokens, "rss_before": before, "peak_before": before_peak, "peak_after": after,
            "step_peak": after - before, "forward_s": forward, "backward_s": total - forward, "total_s": total,
            "threads": torch.get_num_threads()}


def run_child(args, tokens: int, dtype: str, path: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(tokens), dtype, path,
               "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--chunk", str(args.chunk),
               "--threads", str(args.threads)]
    done = subprocess.run(command, check=False, capture_output=True, text=True,
                          env=dict(os.environ, TRANSFORMERS_VERBOSITY="error"))
    found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not found:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"loss child {path} {dtype} at {tokens} tokens failed (exit {done.returncode})")
    return json.loads(found[-1][len("RESULT "):])


def extrapolate(rows: list[dict], tokens: int, dtype: str, path: str, reason: str) -> dict | None:
    """A row for a case not run, from the measured ones of the same path and dtype: the step peak on the straight
    line through the two largest (through the origin from a single one), times proportional to tokens."""
    measured = sorted((r for r in rows if r["dtype"] == dtype and r["path"] == path and not r.get("skipped")),
                      key=lambda r: r["tokens"])
    if not measured:
        return None
    base = measured[-1]
    if len(measured) >= 2:
        low = measured[-2]
        slope = (base["step_peak"] - low["step_peak"]) / (base["tokens"] - low["tokens"])
        step_peak = base["step_peak"] + slope * (tokens - base["tokens"])
        source = f"{low['tokens']} and {base['tokens']}"
    else:
        step_peak, source = base["step_peak"] * tokens / base["tokens"], f"{base['tokens']}"
    factor = tokens / base["tokens"]
    return {**base, "tokens": tokens, "skipped": reason, "step_peak": step_peak, "peak_after": None,
            "rss_before": None, "forward_s": base["forward_s"] * factor, "backward_s": base["backward_s"] * factor,
            "total_s": base["total_s"] * factor, "from_tokens": source}


def bytes_per_entry(row: dict) -> float:
    """Step peak per (supervised token x vocab entry)."""
    return row["step_peak"] * 2 ** 20 / (row["tokens"] * row["vocab"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192, 32768])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--vocab", type=int, default=151936, help="Qwen2.5's vocabulary (embedding rows)")
    parser.add_argument("--hidden", type=int, default=3584, help="Qwen2.5-7B's hidden size")
    parser.add_argument("--chunk", type=int, default=1024, help="optim.loss_chunk_tokens")
    parser.add_argument("--quick", action="store_true", help="vocab 4096, hidden 256, 512 / 2048 tokens")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child (default 1)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no case after this many minutes; later ones are extrapolated and marked")
    parser.add_argument("--out", default=str(common.RESULTS))
    parser.add_argument("--child", nargs=3, metavar=("TOKENS", "DTYPE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = child(int(args.child[0]), args.child[1], args.child[2], args.vocab, args.hidden, args.chunk,
                       args.threads)
        print("RESULT " + json.dumps(result))
        return 0
    if args.quick:
        args.tokens, args.vocab, args.hidden, args.chunk = [512, 2048], 4096, 256, 256
    import torch

    torch.set_num_threads(args.threads)
    load_before = common.load_average()
    rows, started = [], time.monotonic()
    for dtype in args.dtypes:
        for tokens in sorted(args.tokens):
            for path in PATHS:
                need = estimated_gib(path, tokens, args.vocab, args.hidden, dtype, args.chunk)
                have = available_gib()
                minutes = (time.monotonic() - started) / 60
                reason = None
                if need > have - MARGIN_GIB:
                    reason = f"needs about {need:.1f} GiB, {have:.1f} GiB available (margin {MARGIN_GIB:.0f})"
                elif args.max_minutes is not None and minutes > args.max_minutes:
                    reason = f"time: {minutes:.0f} min spent, --max-minutes {args.max_minutes:g}"
                if reason:
                    row = extrapolate(rows, tokens, dtype, path, reason)
                    rows.append(row or {"tokens": tokens, "dtype": dtype, "path": path, "skipped": reason,
                                        "vocab": args.vocab, "hidden": args.hidden, "chunk": args.chunk})
                    print(f"{dtype} {tokens} {path}: skipped ({reason})", flush=True)
                    continue
                rows.append(run_child(args, tokens, dtype, path))
                print(f"{dtype} {tokens} {path}: step peak {rows[-1]['step_peak'] / 1024:.2f} GiB, "
                      f"{rows[-1]['total_s']:.1f} s", flush=True)
                remaining = len(args.dtypes) * len(args.tokens) * len(PATHS) - len(rows)
                if remaining:  # a long run keeps its finished rows, marked incomplete, until the end
                    write(args, argv, load_before, rows, remaining, quiet=True)
    write(args, argv, load_before, rows)
    return 0


def write(args, argv, load_before: str, rows: list[dict], remaining: int = 0, quiet: bool = False) -> Path:
    threads = next((r["threads"] for r in rows if "threads" in r), args.threads)
    lines = common.header("LM head + cross-entropy memory, full logits vs chunked", common.command_line(
        "loss_memory.py", argv), load_before, [
        f"head: vocab {args.vocab} x hidden {args.hidden} (Qwen2.5-7B: 151936 x 3584), no bias; chunk "
        f"{args.chunk} positions (`optim.loss_chunk_tokens`); CPU, {threads} torch thread(s); one fresh process per "
        "row: `head_loss_sum` + backward once on random hidden states of the supervised positions",
        "step peak = peak RSS (ru_maxrss) after the step - RSS before it (/proc/self/statm), so it includes the "
        "[vocab, hidden] weight gradient both paths produce; the inputs (weight, hidden states) are in the RSS "
        "before; bytes/entry = step peak / (tokens x vocab)",
        "chunked computes the gradients chunk by chunk in the forward pass (nothing recomputed), so its forward "
        "time holds most of its work and its backward only scales the stored gradients"])
    lines += ["| tokens | dtype | path | step peak GiB | RSS before GiB | peak GiB | bytes/entry | forward s | "
              "backward s | total s |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "step_peak" not in row:
            lines.append(f"| {row['tokens']} | {row['dtype']} | {row['path']} | not run: {row['skipped']} "
                         "| | | | | | |")
            continue
        extrapolated = row.get("skipped")
        mark = "~" if extrapolated else ""
        rss = "" if extrapolated else f"{row['rss_before'] / 1024:.2f}"
        peak = "" if extrapolated else f"{row['peak_after'] / 1024:.2f}"
        path = row["path"] + (f" (extrapolated from {row['from_tokens']}; not run: {extrapolated})"
                              if extrapolated else "")
        lines.append(f"| {row['tokens']} | {row['dtype']} | {path} | {mark}{row['step_peak'] / 1024:.2f} | {rss} | "
                     f"{peak} | {mark}{bytes_per_entry(row):.2f} | {mark}{row['forward_s']:.1f} | "
                     f"{mark}{row['backward_s']:.1f} | {mark}{row['total_s']:.1f} |")
    lines.append("")
    for dtype in args.dtypes:
        for tokens in sorted(args.tokens):
            pair = {r["path"]: r for r in rows if r["dtype"] == dtype and r["tokens"] == tokens and "step_peak" in r}
            if len(pair) == 2:
                full, chunked = pair["full"], pair["chunked"]
                note = " (full extrapolated)" if full.get("skipped") else ""
                ratio = chunked["step_peak"] / full["step_peak"]
                lines.append(f"- {dtype}, {tokens} tokens: chunked step peak {chunked['step_peak'] / 1024:.2f} GiB vs "
                             f"full {full['step_peak'] / 1024:.2f} GiB ({ratio:.2f}x), time "
                             f"{chunked['total_s'] / full['total_s']:.2f}x{note}")
    suspicious = [r for r in rows if r.get("peak_after") is not None and r["peak_after"] <= r["peak_before"] + 1]
    if suspicious:
        lines.append(f"- caution: {len(suspicious)} row(s) peaked before the step; their step peak is a lower bound")
    if args.quick:
        lines += ["", "_--quick: a small head at small sizes; a code-path check only._"]
    if remaining:
        lines += ["", f"_incomplete: {remaining} case(s) still running or to run_"]
    # a run of one dtype (a long benchmark split in parts) gets its own file: loss_memory-fp32_<machine>_<date>.md
    what = "loss_memory" if set(args.dtypes) == set(DTYPES) else "loss_memory-" + "-".join(args.dtypes)
    path = common.result_path(args.out, what)
    if quiet:
        path.write_text("\n".join(lines) + "\n")
        return path
    return common.write_result(path, lines)


if __name__ == "__main__":
    sys.exit(main())
