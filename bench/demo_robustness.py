"""Does the CPU demo learn on every seed, thread count and CPU? `mlcd-vl demo` over a grid, one table.

    python bench/demo_robustness.py                               # quick and full plans, seeds 0-4, 1 and 2 threads
    python bench/demo_robustness.py --plans quick --seeds 0,1 --threads 1 --cpu-capability avx2

Each cell is a whole `mlcd-vl demo` run in a fresh process (data seed `--seed`, torch threads `--threads`), scored
by lmms-eval on held-out images exactly as a user's run is. `--cpu-capability` sets ATEN_CPU_CAPABILITY (default /
avx2 / avx512) and MKL_ENABLE_INSTRUCTIONS to match, which makes torch and MKL take the kernels of another CPU
generation: the floating-point path then differs as it does on another machine. The result file lists every run
(held-out accuracy per skill, wall time), then per plan the min / median per skill against the bars the demo
promises (colour >= chance + 30 points in both plans, chart's highest bar >= chance + 30 points in the full plan)
and the wall-time limits (quick < 4 min, full < 6 min on 2 cores), judged on runs that ran alone. `--parallel N`
runs N demos at once (for 1-thread cells on a 2-core machine): accuracy is unaffected, wall times are then not
those of a run alone, and the file says so. `--plans '' --include A.json B.json` reports earlier parts together.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import REPO, command_line, header, load_average, result_path, write_result

SKILLS = ("colour", "chart", "shape", "count", "chart_value", "word")
BARS = {"quick": ("colour",), "full": ("colour", "chart")}  # skills that must reach chance + MARGIN
MARGIN = 0.30
WALL_LIMIT_S = {"quick": 240, "full": 360}
MKL_ISA = {"default": "SSE4_2", "avx2": "AVX2", "avx512": "AVX512"}


def run_demo(plan: str, seed: int, threads: int, workdir: Path, capability: str | None, parallel: int) -> dict:
    """One demo run in a fresh process; its results.json plus the command's own wall time."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if capability:  # torch's own kernels and MKL's (matmuls) as on a CPU of that generation
        env.update(ATEN_CPU_CAPABILITY=capability, MKL_ENABLE_INSTRUCTIONS=MKL_ISA[capability])
    command = [sys.executable, "-m", "mlcd_vl.cli", "demo", "--seed", str(seed), "--threads", str(threads),
               "--workdir", str(workdir), *(["--quick"] if plan == "quick" else [])]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"demo {plan} seed {seed} threads {threads} failed:\n{done.stdout[-3000:]}"
                           f"\n{done.stderr[-3000:]}")
    results = json.loads((workdir / "results.json").read_text())
    return {"plan": plan, "seed": seed, "threads": threads, "capability": capability or "native", "wall_s": wall,
            "parallel": parallel,
            "scores": {s: v["accuracy"] for s, v in results["scores"].items()},
            "n": results["plan"]["heldout_per_skill"],
            "stage_s": results["wall_seconds"]}


def cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def chance_levels() -> dict[str, float]:
    from mlcd_vl.demo.playground import chance

    return {skill: chance(skill) for skill in SKILLS}


def table(runs: list[dict], chance: dict[str, float]) -> list[str]:
    lines = ["| plan | seed | threads | kernels | " + " | ".join(SKILLS) + " | wall | runs at once |",
             "|---|---:|---:|---|" + "---:|" * len(SKILLS) + "---:|---:|"]
    for run in runs:
        cells = []
        for skill in SKILLS:
            value = run["scores"][skill]
            low = skill in BARS[run["plan"]] and value < chance[skill] + MARGIN
            cells.append(f"{'**' if low else ''}{100 * value:.1f}%{'**' if low else ''}")
        lines.append(f"| {run['plan']} | {run['seed']} | {run['threads']} | {run['capability']} | "
                     + " | ".join(cells) + f" | {run['wall_s']:.0f} s | {run.get('parallel', 1)} |")
    return lines


def summary(runs: list[dict], chance: dict[str, float]) -> tuple[list[str], bool]:
    lines, ok = ["| plan | runs | " + " | ".join(f"{s} min / median" for s in SKILLS) + " | wall min / median / max |",
                 "|---|---:|" + "---|" * len(SKILLS) + "---|"], True
    for plan in dict.fromkeys(run["plan"] for run in runs):
        mine = [run for run in runs if run["plan"] == plan]
        cells = []
        for skill in SKILLS:
            values = [run["scores"][skill] for run in mine]
            cells.append(f"{100 * min(values):.1f}% / {100 * statistics.median(values):.1f}%")
        walls = sorted(run["wall_s"] for run in mine)
        lines.append(f"| {plan} | {len(mine)} | " + " | ".join(cells)
                     + f" | {walls[0]:.0f} / {statistics.median(walls):.0f} / {walls[-1]:.0f} s |")
    lines.append("")
    for plan in dict.fromkeys(run["plan"] for run in runs):
        mine = [run for run in runs if run["plan"] == plan]
        for skill in BARS[plan]:
            worst = min(run["scores"][skill] for run in mine)
            bar = chance[skill] + MARGIN
            passed = worst >= bar
            ok &= passed
            lines.append(f"- {plan}, {skill}: worst {100 * worst:.1f}% vs bar {100 * bar:.1f}% (chance "
                         f"{100 * chance[skill]:.1f}% + {100 * MARGIN:.0f} points): {'met' if passed else 'MISSED'}")
        alone = [run["wall_s"] for run in mine if run.get("parallel", 1) == 1]  # concurrent runs share the cores
        if alone:
            lines.append(f"- {plan}, wall time of a run alone: slowest {max(alone):.0f} s vs limit "
                         f"{WALL_LIMIT_S[plan]} s: {'met' if max(alone) < WALL_LIMIT_S[plan] else 'MISSED'}")
        else:
            lines.append(f"- {plan}, wall time: not judged (no run alone; limit {WALL_LIMIT_S[plan]} s)")
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plans", default="quick,full",
                        help="comma-separated demo plans (default quick,full; \"\" runs none and reports the "
                             "--include runs)")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated data seeds (default 0,1,2,3,4)")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)")
    parser.add_argument("--cpu-capability", default=None, choices=("default", "avx2", "avx512"),
                        help="ATEN_CPU_CAPABILITY for every run: another CPU generation's kernels (default: this "
                             "CPU's best)")
    parser.add_argument("--parallel", type=int, default=1,
                        help="demo runs at once (default 1; wall times are only those of a run alone with 1)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for the result file")
    parser.add_argument("--what", default="demo_robustness", help="result file prefix")
    parser.add_argument("--include", nargs="*", default=[], metavar="JSON",
                        help="runs of earlier invocations (the .json written next to each result file) to report "
                             "together with this one's, so a long grid can run in parts")
    args = parser.parse_args(argv)
    plans = [p for p in args.plans.split(",") if p]  # none: only report the --include runs together
    unknown = set(plans) - set(BARS)
    if unknown:
        parser.error(f"unknown plan(s) {sorted(unknown)}; use quick and/or full")
    seeds = [int(s) for s in args.seeds.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    cells = [(plan, seed, t) for plan in plans for t in threads for seed in seeds]
    load_before = load_average()
    runs = [run for path in args.include for run in json.loads(Path(path).read_text())]
    included = len(runs)
    partial = Path(args.out) / f"{args.what}.partial.json"
    partial.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="demo-robustness-") as scratch, \
            ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        futures = [pool.submit(run_demo, plan, seed, t, Path(scratch) / f"{plan}-s{seed}-t{t}", args.cpu_capability,
                               args.parallel) for plan, seed, t in cells]
        for (plan, seed, t), future in zip(cells, futures):
            run = future.result()
            runs.append(run)
            partial.write_text(json.dumps(runs, indent=1) + "\n")  # a long grid that dies keeps what it measured
            print(f"{plan} seed {seed} threads {t}: " + ", ".join(f"{s} {100 * v:.0f}%" for s, v in
                                                                     run["scores"].items())
                  + f" ({run['wall_s']:.0f} s)", flush=True)
    chance = chance_levels()
    summary_lines, ok = summary(runs, chance)
    extra = [(f"runs: plans {','.join(plans)} x seeds {args.seeds} x threads {args.threads}, "
              f"kernels {args.cpu_capability or 'native (this CPU)'}, {args.parallel} at a time"
              + ("" if args.parallel == 1 else " (wall times are of concurrent runs, not of a run alone)")
              if cells else "no new runs")
             + (f"; with {included} earlier run(s) from "
                + ", ".join(Path(p).name for p in args.include) if args.include else ""),
             "kernels: native = this CPU's best (torch.backends.cpu.get_cpu_capability(): "
             f"{cpu_capability()}), default = ATen's unvectorised kernels with MKL held to SSE4.2 (an older CPU's "
             "path)",
             "held-out accuracy is lmms-eval's ChartQA relaxed accuracy on images never seen in training; bold "
             f"marks a promised skill below chance + {100 * MARGIN:.0f} points"]
    lines = header("CPU demo robustness", command_line("demo_robustness.py", argv), load_before, extra)
    lines += ["## Summary", "", *summary_lines, "", "## Every run", "", *table(runs, chance)]
    path = result_path(args.out, args.what)
    write_result(path, lines)
    path.with_suffix(".json").write_text(json.dumps(runs, indent=1) + "\n")
    partial.unlink(missing_ok=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
