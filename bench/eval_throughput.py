"""Throughput of the `mlcd_llava` lmms-eval adapter at batch size 1 and 8, with identical greedy answers required.

    python bench/eval_throughput.py [--items 8] [--max-new-tokens 32] [--out bench/results]

Builds the tiny model (random weights, CPU) and the synthetic sets of the five benchmarks, makes the requests
lmms-eval would make (official prompts, doc_to_visual and generation kwargs, max_new_tokens capped), answers them
through `MLCDLlava.generate_until` at batch 1 and at batch 8 (after a warm-up), checks that both give the same
answers, and writes `bench/results/eval_throughput_<machine>_<YYYY-MM-DD>.md`. The tiny model never stops early, so
every answer is max_new_tokens long: the numbers measure the adapter and engine (image processing, padding,
generate), not a real model.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import common  # bench/ is on sys.path: the script's own folder
import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.utils import load_yaml_config  # noqa: E402

from mlcd_vl.eval.tasks import BENCHMARKS, write_task_dir  # noqa: E402
from mlcd_vl.eval.lmms_adapter import MLCDLlava  # noqa: E402
from mlcd_vl.eval.synthetic import make_synthetic  # noqa: E402
from mlcd_vl.model.tiny import build_tiny_vlm  # noqa: E402


def requests(root: Path, items: int, max_new_tokens: int) -> tuple[list[Instance], dict]:
    """lmms-eval's requests for every document of the five synthetic sets, through the offline task YAMLs."""
    make_synthetic(root / "data", items=items)
    task_dict, out = {}, []
    for path, benchmark in zip(write_task_dir(root / "tasks", root / "data"), BENCHMARKS):
        config = load_yaml_config(str(path))
        files = config["dataset_kwargs"]["data_files"]
        docs = load_dataset("parquet", data_files=files, cache_dir=str(root / "hf"))[benchmark.split]
        task_dict[benchmark.local_task] = {benchmark.split: docs}
        prompts = config["lmms_eval_specific_kwargs"]["default"]
        kwargs = dict(config["generation_kwargs"], until=["\n\n"])
        kwargs["max_new_tokens"] = min(kwargs["max_new_tokens"], max_new_tokens)
        for doc_id in range(len(docs)):
            context = config["doc_to_text"](docs[doc_id], prompts)
            args = (context, dict(kwargs), config["doc_to_visual"], doc_id, benchmark.local_task, benchmark.split)
            out.append(Instance("generate_until", args, idx=0,
                                metadata={"task": benchmark.local_task, "doc_id": doc_id, "repeats": 1}))
    return out, task_dict


def timed(adapter: MLCDLlava, batch_size: int, instances: list[Instance]) -> tuple[float, list[str], int]:
    adapter.batch_size_per_gpu = batch_size
    start = time.perf_counter()
    results = adapter.generate_until(instances)
    seconds = time.perf_counter() - start
    return seconds, [r.text for r in results], sum(r.token_counts.output_tokens for r in results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--items", type=int, default=8, help="documents per benchmark (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="cap on each task's max_new_tokens")
    parser.add_argument("--out", default=str(common.RESULTS))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_vlm(root)
        instances, task_dict = requests(root, args.items, args.max_new_tokens)
        adapter = MLCDLlava(pretrained=str(model))
        adapter.task_dict = task_dict
        timed(adapter, 8, instances[:8])  # warm-up
        rows = {size: timed(adapter, size, instances) for size in (1, 8)}
    same = rows[1][1] == rows[8][1]
    machine, today = common.machine_name(), common.today()
    lines = [f"# Eval adapter throughput: {machine}, {today}", "",
             f"`python bench/eval_throughput.py --items {args.items} --max-new-tokens {args.max_new_tokens}`: tiny "
             f"random model ({'cuda' if torch.cuda.is_available() else 'cpu'}, {torch.get_num_threads()} torch "
             f"threads, torch {torch.__version__}, Python {platform.python_version()}), {len(instances)} requests "
             f"from the synthetic sets of the five benchmarks (official prompts and doc_to_visual, max_new_tokens "
             f"capped at {args.max_new_tokens}). Load average when done: "
             f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} (other work on the machine slows every row).", "",
             "| batch size | seconds | samples/s | generated tokens/s |", "|---:|---:|---:|---:|"]
    for size, (seconds, _, tokens) in rows.items():
        lines.append(f"| {size} | {seconds:.2f} | {len(instances) / seconds:.2f} | {tokens / seconds:.1f} |")
    lines += ["", f"Greedy answers at batch 8 identical to batch 1: **{'yes' if same else 'NO'}** "
                  f"({sum(a == b for a, b in zip(rows[1][1], rows[8][1]))} of {len(instances)} equal).",
              f"Speed-up batch 8 over batch 1: {rows[1][0] / rows[8][0]:.2f}x."]
    common.write_result(common.result_path(args.out, "eval_throughput", machine), lines)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
