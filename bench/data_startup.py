"""Data start-up before and after the cached record index and length table: per-rank memory, scan records/s, and
time to the first batch on a first launch and on a restart, through the real `build_data` path (`train.loader`;
`train.loop` before the house plan).

    python bench/data_startup.py                       # 100k launches, 1M opens (~20 min on 2 busy cores)
    python bench/data_startup.py --records 100000      # one size
    python bench/data_startup.py --quick               # 300 records: code-path check
    python bench/data_startup.py --records 1000000 --open-records "" --tag 1m   # 1M launches (~50 min quiet)

"Before" is the package as of `--before` (default f6469f2, the commit before this work), extracted with `git
archive` into a temporary folder; "after" is this checkout. Each launch is fresh processes (1, or 2 ranks with a
gloo process group, as `train.run` does: the main process prepares the data first, then the other ranks), each
reporting when its first batch came out of the DataLoader. After-launches use a fresh cache folder for the first
launch and the same folder for the restart. Before, a restart repeats the first launch (nothing is kept), so it
is measured once.

Data: a synthetic LLaVA `.json` list (one big JSON array, upstream's format) of short conversations, 70% of them
referencing one of 8 small PNGs, the tiny preset tokenizer and anyres settings at the tiny crop size.
`--open-records` (1M by default) only opens the records, what every rank does, and reads 1000 of them: before in
one process (the eager parse), after with the index built, then cached, in 1 and 2 processes. Full 1M launches
scan for 6-13 min per first launch on 2 quiet cores (bench/results/data_startup-1m_*); above 200k records the
"before" path runs in one process only (two eager copies of the parsed records per node would crowd 24 GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEFORE = "f6469f2"


# ----------------------------------------------------------------------------------------------------------------
# One rank (run in a child process, with the package under test first on sys.path)
# ----------------------------------------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it is not inherited from the parent on exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(args) -> None:
    sys.path.insert(0, args.tree)
    begin = time.perf_counter()
    import psutil
    import torch
    from accelerate import PartialState

    from mlcd_vl.model.build import VLMSettings, load_tokenizer
    from mlcd_vl.train.config import TrainConfig

    try:
        from mlcd_vl.train import loader as data_path  # after the house plan
    except ImportError:
        from mlcd_vl.train import loop as data_path  # before it (f6469f2)
    DataConfig = type(TrainConfig().data)

    torch.set_num_threads(1)
    state = PartialState(cpu=True)
    process = psutil.Process()
    tokenizer = load_tokenizer(args.tokenizer)
    size = 56
    settings = VLMSettings(image_mode="anyres", merge_type="spatial_unpad", crop_size=size, patch_size=14,
                           pinpoints=[(size, 2 * size), (2 * size, size), (2 * size, 2 * size)])
    fields = {"train": args.data, "image_folder": args.images, "max_length": 2048, "num_workers": args.workers}
    if args.cache_dir and "cache_dir" in DataConfig.__dataclass_fields__:
        fields["cache_dir"] = args.cache_dir
    config = TrainConfig(data=DataConfig(**fields), output_dir=args.run, seed=42)
    config.batch.per_device_batch_size = 2
    imported = time.perf_counter()
    baseline = process.memory_full_info()
    with state.main_process_first():
        start = time.perf_counter()
        data = data_path.build_data(config, tokenizer, settings, rank=state.process_index,
                                    world_size=state.num_processes, progress=False,
                                    table_path=Path(args.run) / "lengths.npz", scan=state.is_main_process)
        built = time.perf_counter()
    memory = process.memory_full_info()
    next(iter(data.loader))
    first = time.perf_counter()
    data_start = getattr(data, "start", None)
    report = {"rank": state.process_index, "imports_s": imported - begin, "build_data_s": built - start,
              "first_batch_s": first - start, "records": len(data.dataset),
              "scanned": bool(state.is_main_process and (data_start is None or data_start.scanned)),
              "seconds": getattr(data_start, "seconds", None),
              "rss_base_mib": baseline.rss / 2**20, "uss_base_mib": baseline.uss / 2**20,
              "rss_mib": memory.rss / 2**20, "uss_mib": memory.uss / 2**20,
              "peak_rss_mib": peak_rss_mib()}
    Path(args.report).with_suffix(f".{state.process_index}.json").write_text(json.dumps(report))


def child_open(args) -> None:
    """Only open the records (`open_source`, as every rank does) and read 1000 of them: time and memory."""
    sys.path.insert(0, args.tree)
    import numpy as np
    import psutil

    from mlcd_vl.data.sources import open_source

    process = psutil.Process()
    baseline = process.memory_full_info()
    start = time.perf_counter()
    kwargs = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    records = open_source(args.data, args.images, **kwargs)
    opened = time.perf_counter()
    picks = np.random.default_rng(0).integers(0, len(records), 1000)
    ids = [records[int(i)].record["id"] for i in picks]
    read = time.perf_counter()
    memory = process.memory_full_info()
    report = {"open_s": opened - start, "read_1000_ms": (read - opened) * 1000, "records": len(records),
              "first_id": ids[0], "rss_mib": (memory.rss - baseline.rss) / 2**20,
              "uss_mib": (memory.uss - baseline.uss) / 2**20,
              "peak_rss_mib": peak_rss_mib()}
    Path(args.report).write_text(json.dumps(report))


# ----------------------------------------------------------------------------------------------------------------
# The parent: data, trees, launches, the result file
# ----------------------------------------------------------------------------------------------------------------


def make_data(folder: Path, count: int, seed: int = 0) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(8):
        array = rng.integers(0, 256, (40 + 10 * index, 70 - 5 * index, 3), dtype=np.uint8)
        Image.fromarray(array).save(images / f"{index}.png")
    words = np.array("the a red green blue chart bar value left right top shows image how many what which colour "
                     "number text label highest lowest is are there of in on and with describe answer".split())
    path = folder / "records.json"
    with open(path, "w") as handle:
        handle.write("[")
        for index in range(count):
            question = " ".join(rng.choice(words, int(rng.integers(5, 16)))) + "?"
            answer = " ".join(rng.choice(words, int(rng.integers(3, 60)))) + "."
            record = {"id": f"synthetic-{index}", "conversations": [{"from": "human", "value": question},
                                                                    {"from": "gpt", "value": answer}]}
            if rng.random() < 0.7:
                record["image"] = f"{int(rng.integers(0, 8))}.png"
                record["conversations"][0]["value"] = "<image>\n" + question
            handle.write(("," if index else "") + json.dumps(record))
        handle.write("]")
    return path, images


def launch(tree: Path, processes: int, data: Path, images: Path, tokenizer: Path, work: Path, workers: int,
           cache_dir: Path | None, port: int) -> list[dict]:
    run = Path(tempfile.mkdtemp(dir=work, prefix="run-"))
    report = run / "report"
    commands = []
    for rank in range(processes):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes),
                   LOCAL_WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONPATH=str(tree))
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--tree", str(tree), "--data", str(data),
                "--images", str(images), "--tokenizer", str(tokenizer), "--run", str(run), "--report", str(report),
                "--workers", str(workers)] + (["--cache-dir", str(cache_dir)] if cache_dir else [])
        commands.append(subprocess.Popen(argv, env=env))
    codes = [command.wait() for command in commands]
    if any(codes):
        raise RuntimeError(f"a rank failed: exit codes {codes}")
    return [json.loads(report.with_suffix(f".{rank}.json").read_text()) for rank in range(processes)]


def open_rows(label: str, tree: Path, count: int, data: Path, images: Path, work: Path,
              cache_dir: Path | None, processes: int) -> str:
    """`processes` concurrent processes that only open the records; one table row."""
    reports = [work / f"open-{label.replace(' ', '-').replace(',', '')}-{rank}.json" for rank in range(processes)]
    commands = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child-open", "--tree", str(tree),
                                  "--data", str(data), "--images", str(images), "--report", str(report)]
                                 + (["--cache-dir", str(cache_dir)] if cache_dir else []),
                                 env=dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1"))
                for report in reports]
    if any(command.wait() for command in commands):
        raise RuntimeError(f"{label}: a process failed")
    results = [json.loads(report.read_text()) for report in reports]
    cells = [" / ".join(f"{r[key]:,.{digits}f}" for r in results)
             for key, digits in (("open_s", 1), ("read_1000_ms", 0), ("rss_mib", 0), ("uss_mib", 0),
                                 ("peak_rss_mib", 0))]
    return f"| {count:,} | {label} | {processes} | " + " | ".join(cells) + " |"


def row(label: str, count: int, processes: int, reports: list[dict]) -> str:
    main = reports[0]
    build = f"{main['build_data_s']:.1f} ({count / main['build_data_s']:,.0f}/s)"
    where = ", ".join(f"{k} {v:.1f}" for k, v in (main["seconds"] or {}).items()) or "-"
    ranks = " / ".join(f"{r['first_batch_s']:.1f}" for r in reports)
    memory = " / ".join(f"{r['rss_mib'] - r['rss_base_mib']:,.0f} ({r['uss_mib'] - r['uss_base_mib']:,.0f})"
                        for r in reports)
    peak = " / ".join(f"{r['peak_rss_mib']:,.0f}" for r in reports)
    scanned = "yes" if main["scanned"] else "no"
    return f"| {count:,} | {label} | {processes} | {scanned} | {build} | {where} | {ranks} | {memory} | {peak} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--records", default="100000", help="comma-separated record counts (full launches)")
    parser.add_argument("--quick", action="store_true", help="300 records, one process: checks the code path")
    parser.add_argument("--before", default=BEFORE, help="git revision of the 'before' package")
    parser.add_argument("--workers", type=int, default=1, help="data.num_workers per process (scan and loader)")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--tag", default="", help="result file data_startup-TAG_<machine>_<date>.md (keeps another "
                        "run of the same day)")
    parser.add_argument("--open-records", default="1000000",
                        help="comma-separated record counts for the open-only comparison (memory per rank)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-open", action="store_true", help=argparse.SUPPRESS)
    for name in ("tree", "data", "images", "tokenizer", "run", "report", "cache-dir"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child or args.child_open:
        (child if args.child else child_open)(args)
        return 0

    sys.path.insert(0, str(HERE))
    import common

    load_before = common.load_average()
    counts = [300] if args.quick else [int(n) for n in args.records.split(",") if n]
    open_counts = [300] if args.quick else [int(n) for n in args.open_records.split(",") if n]
    lines, opened, port = [], [], 29611
    with tempfile.TemporaryDirectory(prefix="data-startup-") as tmp:
        work = Path(tmp)
        from mlcd_vl.model.tiny import write_tiny_assets

        tokenizer = write_tiny_assets(work / "tiny")["llm"]
        before = common.extract_package(args.before, work / "before")
        after = HERE.parent
        for count in counts:
            started = time.perf_counter()
            data, images = make_data(work / f"data-{count}", count)
            size = data.stat().st_size / 2**20
            print(f"{count} records: {size:.0f} MiB written in {time.perf_counter() - started:.0f}s", flush=True)
            process_counts = [1] if args.quick else [1, 2]
            for processes in process_counts:
                if not (count > 200_000 and processes > 1):  # two eager 1M copies do not fit beside other work
                    port += 1
                    lines.append(row(f"before ({args.before})", count, processes,
                                     launch(before, processes, data, images, tokenizer, work, args.workers, None,
                                            port)))
                    print(lines[-1], flush=True)
                cache_dir = Path(tempfile.mkdtemp(dir=work, prefix="cache-"))
                for label in ("after, first launch", "after, restart"):
                    port += 1
                    lines.append(row(label, count, processes, launch(after, processes, data, images, tokenizer,
                                                                     work, args.workers, cache_dir, port)))
                    print(lines[-1], flush=True)
            (data.unlink(), [p.unlink() for p in images.iterdir()])
        for count in open_counts:
            data, images = make_data(work / f"open-{count}", count)
            print(f"{count} records: {data.stat().st_size / 2**20:.0f} MiB", flush=True)
            cache_dir = Path(tempfile.mkdtemp(dir=work, prefix="cache-"))
            runs = [(f"before ({args.before})", before, None, 1), ("after, first open (index built)", after,
                                                                     cache_dir, 1),
                    ("after, cached index", after, cache_dir, 1), ("after, cached index", after, cache_dir, 2)]
            for label, tree, cache, processes in runs:
                opened.append(open_rows(label, tree, count, data, images, work, cache, processes))
                print(opened[-1], flush=True)
            data.unlink()

    head = common.header("Data start-up: record reading, length scan, time to first batch",
                         common.command_line("data_startup.py", argv), load_before, [
                             f"before = `{args.before}` (package extracted with git archive), after = this checkout",
                             f"data.num_workers={args.workers} per process; after: the scan runs with num_workers x "
                             "processes on the node (the other ranks wait for it); one torch thread per process",
                             "synthetic LLaVA .json list (one JSON array), 70% of records with one of 8 small PNGs, "
                             "tiny preset tokenizer, anyres at 56 px crops, max_length 2048"])
    table = ["| records | path | processes | scanned | rank 0 build_data, s (records/s) | of which, s | "
             "time to first batch, s (rank 0 / 1) | RSS added by the data, MiB (USS) per rank | "
             "peak RSS, MiB per rank |", "|---:|---|---:|---|---:|---|---|---|---|"] + lines
    notes = ["", "build_data on rank 0: open the records, the length table (scanned or read), sampler and "
             "DataLoader; records/s = records / that time. Of which (after): the manifest's cheap form "
             "(fingerprint), the length table (scan or cache read) and the full manifest. "
             "Time to first batch: from `build_data` (open the records, length table, sampler, DataLoader) to "
             "the first batch out of the DataLoader, per rank; rank 1 starts after rank 0 has prepared the data "
             "(`main_process_first`, as in training) and its time is counted from then: its wall time to the "
             "first batch is rank 0's build_data plus its own figure. RSS added: resident memory "
             "after `build_data` minus before it (USS: the part no other process shares; the memory-mapped file "
             "and index count in RSS but are shared page cache). Peak RSS includes torch and the tokenizer (~0.4 "
             "GiB). Before, a restart repeats the first launch."]
    open_table = [] if not opened else [
        "", "Opening the records only (`open_source`, what every rank does), then reading 1000 random records; "
        "memory added per process (concurrent processes share the mapped file):", "",
        "| records | path | processes | open, s | read 1000, ms | RSS added, MiB | USS added, MiB | peak RSS, MiB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|"] + opened
    if any(count > 200_000 for count in counts) and not args.quick:
        notes.append("")
        notes.append("Before with 2 processes is not run above 200k records (two eager copies of the parsed records "
                     "per node); the 1-process row gives its per-rank cost.")
    name = "data_startup" + (f"-{args.tag}" if args.tag else "")
    common.write_result(common.result_path(args.out, name), head + table + notes + open_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
