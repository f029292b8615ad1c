"""Host memory of a ZeRO-3 run per rank, before and after sharded initialisation and the streamed final save: peak
RSS while the model is built, while `accelerator.prepare` makes the DeepSpeed engine, and during the final save,
1 and 2 CPU processes (gloo), through the real training path (`train.run.train`, the function `mlcd-vl train` runs).

    python bench/zero3_memory.py                 # ~220M-parameter model, before and after, 1 and 2 processes
    python bench/zero3_memory.py --quick         # the tiny preset, "after" only: code-path check

"Before" is the package as of `--before` (default 08e6757, main before this work), extracted with `git archive`:
every rank builds the whole fp32 model, DeepSpeed partitions it in `prepare`, and the final save writes every rank's
partition then rebuilds the whole fp32 state on the main process. "After" is this checkout (the model
built partitioned under `zero.Init`, the weights streamed shard by shard); "after, sharded_init=false" is this
checkout with the old build (the switch) and the new save.

The model: the tiny stage-2 recipe (`configs/recipes/tiny_stage2.yaml`, anyres at 56 px, `configs/deepspeed/zero3.json`,
fp32) over a Qwen2 LLM and an MLCD tower written at the sizes below, every part training, one optimizer step of one
sample per rank. Each rank of each launch is a fresh process; a phase's peak is `VmHWM` after resetting it at the
phase's start (`/proc/self/clear_refs`), so it is that phase's own high-water mark of resident memory (the rank's
resident memory from before the phase included: the interpreter, torch, DeepSpeed, about 0.5-0.8 GiB). The phase's
growth is that peak less the resident memory at its start: what the phase itself needed at its worst, the figure
the acceptance compares (build growth per rank at 2 processes <= 0.6x the 1-process one) and the one that shows
whether a rank ever held the whole model (growth below the fp32 model's size: it never did).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # bench/ is on sys.path: the script's own folder

HERE = Path(__file__).resolve().parent
BEFORE = "08e6757"  # main before sharded initialisation and the streamed save
PHASES = ("build", "prepare", "save")


# ----------------------------------------------------------------------------------------------------------------
# One rank (a child process, the package under test first on sys.path)
# ----------------------------------------------------------------------------------------------------------------


def memory_mib() -> dict:
    """Resident memory now and its high-water mark since the last reset, MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return {"rss": fields["VmRSS"], "peak": fields["VmHWM"]}


def reset_peak() -> None:
    """VmHWM := VmRSS (Linux: writing 5 to clear_refs resets the peak resident set size)."""
    Path("/proc/self/clear_refs").write_text("5")


def child(args) -> None:
    """Train the recipe with phase marks around the model build, `prepare` and the final save."""
    sys.path.insert(0, args.tree)
    import torch
    from accelerate import Accelerator

    from mlcd_vl.train import models, run, zero
    from mlcd_vl.train.config import load_config

    torch.set_num_threads(1)
    marks: dict = {}
    counted: dict = {}

    def phase(name, function):
        def wrapped(*a, **k):
            reset_peak()
            start, rss_start = time.perf_counter(), memory_mib()["rss"]
            result = function(*a, **k)
            marks[name] = {**memory_mib(), "start": rss_start, "seconds": time.perf_counter() - start}
            return result
        return wrapped

    build = models.build_model

    def build_and_count(*a, **k):
        result = build(*a, **k)
        params = list(result[0].parameters())
        counted["params"] = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        # the part of the model this rank holds once built: its partitions and any whole parameter
        counted["held"] = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                              for p in params) / counted["params"]
        return result

    models.build_model = phase("build", build_and_count)
    Accelerator.prepare = phase("prepare", Accelerator.prepare)
    stage = zero.zero_stage

    def save_starts(accelerator):  # called once, where the final save begins (before and after this work)
        # the memory training freed is handed back first (both trees alike): else the save would reuse it unseen
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
        reset_peak()
        marks["save_start"], marks["save_rss"] = time.perf_counter(), memory_mib()["rss"]
        return stage(accelerator)

    zero.zero_stage = save_starts
    if hasattr(zero, "SHARD_SIZE"):  # the streamed save: shards small enough for its bound to show at this size
        zero.SHARD_SIZE = args.shard_size
    config = load_config(args.recipe, args.overrides)
    run.train(config)
    marks["save"] = {**memory_mib(), "start": marks.pop("save_rss"),
                     "seconds": time.perf_counter() - marks.pop("save_start")}
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{args.report}.{rank}.json").write_text(json.dumps({"rank": rank, **counted, **marks}))


# ----------------------------------------------------------------------------------------------------------------
# The parent: assets, data, launches, the result file
# ----------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_assets(folder: Path, quick: bool) -> dict:
    """A Qwen2 LLM and an MLCD tower (random) at the bench sizes, or the tiny preset's."""
    from mlcd_vl.model import tiny

    shapes = tiny.TinyShapes() if quick else tiny.TinyShapes(
        llm_hidden=1024, llm_layers=12, llm_heads=16, llm_kv_heads=4, llm_intermediate=2816,
        tower_hidden=768, tower_layers=12, tower_heads=12, tower_intermediate=3072)
    return tiny.write_tiny_assets(folder, shapes=shapes)


def launch(tree: Path, processes: int, overrides: list[str], work: Path, shard_size: str) -> list[dict]:
    run_dir = Path(tempfile.mkdtemp(dir=work, prefix="run-"))
    report = run_dir / "report"
    recipe = HERE.parent / "configs" / "recipes" / "tiny_stage2.yaml"
    argv = [str(Path(__file__).resolve()), "--child", "--tree", str(tree), "--report", str(report),
            "--shard-size", shard_size, str(recipe), *overrides, f"output_dir={run_dir / 'out'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(tree), TRANSFORMERS_VERBOSITY="error")
    if processes == 1:
        command = [sys.executable, *argv]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--master_addr", "127.0.0.1", "--master_port",
                   str(free_port()), "--nproc_per_node", str(processes), *argv]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-5000:])
        raise SystemExit(f"{tree} on {processes} process(es) failed (exit {done.returncode})")
    return [json.loads(report.with_suffix(f".{rank}.json").read_text()) for rank in range(processes)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--before", default=BEFORE, help="git revision of the 'before' package")
    parser.add_argument("--quick", action="store_true",
                        help="the tiny preset, 'after' only: checks the code path")
    parser.add_argument("--out", default=str(common.RESULTS))
    parser.add_argument("--shard-size", default="100MB",
                        help="the streamed save's shard size (training's default is 2GB, larger than this model)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("recipe", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0

    load_before = common.load_average()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        assets = write_assets(work / "assets", args.quick)
        data = common.make_records(work / "data", 8)
        before = None if args.quick else common.extract_package(args.before, work / "before")
        after = HERE.parent
        base = [f"model.llm={assets['llm']}", f"model.tower={assets['tower']}", "model.init_from=null",
                f"data.train={data}", f"data.image_folder={data.parent}", "optim.max_steps=1",
                "batch.per_device_batch_size=1", "batch.grad_accum=1", "data.num_workers=0",
                f"deepspeed={HERE.parent / 'configs' / 'deepspeed' / 'zero3.json'}", "save_steps=null"]
        runs = [(f"before ({args.before})", before, []), ("after", after, []),
                ("after, sharded_init=false", after, ["model.sharded_init=false"])]
        for processes in (1, 2):
            for label, tree, extra in runs:
                if tree is None or (extra and (processes == 1 or args.quick)):
                    continue  # one process: the partitioned model is the whole model either way
                reports = launch(tree, processes, base + extra, work, args.shard_size)
                rows.append({"label": label, "processes": processes, "reports": reports})
                peaks = " / ".join(f"{r['build']['peak']:.0f}" for r in reports)
                print(f"{label}, {processes} process(es): build peak {peaks} MiB", flush=True)
    params = rows[0]["reports"][0]["params"]
    model_mib = params * 4 / 2**20  # the whole model in fp32
    before_commit = args.before if args.quick else subprocess.run(
        ["git", "-C", str(HERE.parent), "rev-parse", "--short", args.before], check=True, capture_output=True,
        text=True).stdout.strip()
    out_path = common.result_path(args.out, "zero3_memory")
    lines = common.header("Host memory per rank of a ZeRO-3 run: build, prepare, final save",
                          common.command_line("zero3_memory.py", argv), load_before, [
        f"model: {params / 1e6:.1f}M parameters ({model_mib:,.0f} MiB in fp32; Qwen2 LLM + MLCD tower, random), "
        "tiny stage-2 recipe, configs/deepspeed/zero3.json, fp32, every part training, one optimizer step of one "
        "sample per rank, 1 torch thread per rank, gloo",
        f"before = `{before_commit}` (package extracted with git archive): whole fp32 model on every rank, whole fp32 "
        "state rebuilt on the main process at the save; after = this checkout: built partitioned, saved streamed; "
        "after, sharded_init=false = this checkout with the old build and the new save",
        "peak = VmHWM within the phase (reset at its start), growth = peak - resident memory at the phase's start, "
        "MiB; build + prepare = the higher of the two peaks - resident memory when the build starts (the model "
        "in place and partitioned, the optimizer states made); bytes/param = build growth / parameters; held = the "
        "fraction of the model's parameters a rank holds once built; save: freed memory handed back (malloc_trim) "
        "before it starts, in both trees; shards of "
        f"{args.shard_size} (training's default 2GB), its growth = the main process's; cells list rank 0 / rank 1"])
    lines += ["| run | processes | held after build | build growth MiB | build bytes/param | build peak MiB | "
              "build + prepare growth MiB | save growth MiB | save peak MiB | save s |", "|---|" + "---:|" * 9]

    def growth(report, phase):
        return report[phase]["peak"] - report[phase]["start"]

    def until_prepared(report):
        return max(report["build"]["peak"], report["prepare"]["peak"]) - report["build"]["start"]

    def cell(reports, value, digits=0):
        return " / ".join(f"{value(r):,.{digits}f}" for r in reports)

    for row in rows:
        reports = row["reports"]
        lines.append(f"| {row['label']} | {row['processes']} | {cell(reports, lambda r: r['held'], 2)} | "
                     f"{cell(reports, lambda r: growth(r, 'build'))} | "
                     f"{cell(reports, lambda r: growth(r, 'build') * 2**20 / params, 1)} | "
                     f"{cell(reports, lambda r: r['build']['peak'])} | {cell(reports, until_prepared)} | "
                     f"{cell(reports, lambda r: growth(r, 'save'))} | {cell(reports, lambda r: r['save']['peak'])} | "
                     f"{cell(reports, lambda r: r['save']['seconds'], 1)} |")

    def worst(label, processes, value):
        found = next(r for r in rows if r["label"].startswith(label) and r["processes"] == processes)
        return max(value(r) for r in found["reports"])

    lines.append("")
    for label in ("after",) if args.quick else ("before", "after"):
        build_2, build_1 = (worst(label, n, lambda r: growth(r, "build")) for n in (2, 1))
        prepared_2, prepared_1 = (worst(label, n, until_prepared) for n in (2, 1))
        save_2 = worst(label, 2, lambda r: growth(r, "save"))
        lines.append(f"- {label}: per rank at 2 processes / 1 process: build growth {build_2 / build_1:.2f}, "
                     f"build + prepare {prepared_2 / prepared_1:.2f}; largest build growth on a rank at 2 processes "
                     f"{build_2 / model_mib:.2f}x the fp32 model; final save growth on the main process at 2 "
                     f"processes {save_2:,.0f} MiB ({save_2 / model_mib:.2f}x the fp32 model)")
    if args.quick:
        lines += ["", "_--quick: the tiny preset; a code-path check only._"]
    common.write_result(out_path, lines)
    return 0

if __name__ == "__main__":
    sys.exit(main())
