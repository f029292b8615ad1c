"""Where serving time goes, in process (no HTTP): the continuous batcher's decode step with 1 row vs 8 rows, the
prefill that admits 1 vs 8 requests, and `Engine.generate` for 8 requests one after another vs together, each with 1
and with 2 torch threads.

    python bench/serve_steps.py                 # the tiny model (built in a temporary folder)
    python bench/serve_steps.py --repeats 9 --max-tokens 64
    python bench/serve_steps.py --quick         # code-path check: 4 tokens, 1 repeat, 1 thread

Request: the bundled picture + a question (as `bench/serve_latency.py`). Each measure is the median of `--repeats`
runs, taken round-robin (one run of every measure in turn) so load bursts from other work hit them alike. Writes
`bench/results/serve_steps_<machine>_<YYYY-MM-DD>.md`. Timings, never assertions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common


def measures(engine, prompts, max_tokens: int) -> dict:
    """name -> function returning seconds (or seconds per step for the step measures)."""
    from mlcd_vl.serve.requests import GenerationSettings
    from mlcd_vl.serve.decode import RunningBatch

    settings = GenerationSettings(max_new_tokens=max_tokens)

    def joined(rows: int) -> tuple[RunningBatch, float]:
        batch = RunningBatch(engine)
        start = time.perf_counter()
        batch.join([batch.sequence(i, prompts[i], settings, show=False) for i in range(rows)])
        return batch, time.perf_counter() - start

    def step_time(rows: int) -> float:
        batch, _ = joined(rows)
        start, steps = time.perf_counter(), 0
        while len(batch) == rows:
            batch.step()
            steps += 1
        return (time.perf_counter() - start) / steps

    def timed(function) -> float:
        start = time.perf_counter()
        function()
        return time.perf_counter() - start

    return {
        "decode step, 1 row (ms)": lambda: 1000 * step_time(1),
        "decode step, 8 rows (ms)": lambda: 1000 * step_time(len(prompts)),
        "prefill of 1 request (ms)": lambda: 1000 * joined(1)[1],
        "prefill of 8 requests together (ms)": lambda: 1000 * joined(len(prompts))[1],
        "Engine.generate, 8 requests one after another (ms)":
            lambda: 1000 * timed(lambda: [engine.generate([p], settings) for p in prompts]),
        "Engine.generate, 8 requests in one call (ms)":
            lambda: 1000 * timed(lambda: engine.generate(prompts, settings)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="HF-native folder (default: build the tiny model)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", default="1,2", help="torch thread counts to compare")
    parser.add_argument("--quick", action="store_true", help="4 tokens, 1 repeat, 1 thread: checks the code path")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.max_tokens, args.repeats, args.threads = min(args.max_tokens, 4), 1, "1"

    import torch
    from transformers.utils import logging as hf_logging

    from mlcd_vl.assets import DEMO_IMAGE
    from mlcd_vl.model.tiny import build_tiny_vlm
    from mlcd_vl.serve.engine import Engine
    from mlcd_vl.serve.requests import Request

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    load_before = common.load_average()
    threads = [int(t) for t in args.threads.split(",")]
    initial_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as scratch:
        engine = Engine.from_pretrained(args.model or build_tiny_vlm(Path(scratch)), device="cpu")
        prompts = [engine.prepare(Request([{"role": "user", "content": f"<image>\nQuestion {i}: what is in this "
                                                                      "picture?"}], [DEMO_IMAGE])) for i in range(8)]
        table = {count: measures(engine, prompts, args.max_tokens) for count in threads}
        samples: dict[tuple[int, str], list[float]] = {}
        for _ in range(args.repeats + 1):  # the first round warms up and is dropped
            for count, functions in table.items():
                torch.set_num_threads(count)
                for name, function in functions.items():
                    samples.setdefault((count, name), []).append(function())
    torch.set_num_threads(initial_threads)  # the header reports the process default
    names = list(next(iter(table.values())))
    lines = common.header("Serving steps", " ".join(["python bench/serve_steps.py", *(sys.argv[1:] if argv is None
                                                                                       else argv)]), load_before,
                          [f"model: {'tiny (random weights)' if args.model is None else args.model}; "
                           f"{len(prompts[0].input_ids)} prompt tokens, {args.max_tokens} new tokens, greedy; "
                           f"median of {args.repeats} round-robin runs"])
    lines += ["| measure | " + " | ".join(f"{count} thread(s)" for count in threads) + " |",
              "|---|" + "---|" * len(threads)]
    for name in names:
        cells = [f"{statistics.median(samples[(count, name)][1:]):.1f}" for count in threads]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if args.quick:
        lines += ["", "_--quick: a code-path check; the numbers mean nothing._"]
    common.write_result(common.result_path(args.out, "serve_steps"), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
