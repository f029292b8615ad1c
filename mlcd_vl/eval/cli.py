"""`mlcd-vl eval`: summarize lmms-eval results, make synthetic benchmark sets, write offline tasks, run lmms-eval.

    mlcd-vl eval summarize RESULTS_DIR_OR_FILE... [--output table.md] [--require TASK,...]
    mlcd-vl eval make-synthetic OUT [--items 8] [--seed 0]
    mlcd-vl eval tasks DATA_DIR OUT          # an --include_path whose task YAMLs read DATA_DIR's parquet files
    mlcd-vl eval lmms ARGS...                # lmms-eval's own CLI with `mlcd_llava` registered in-process

`lmms` works before the `lmms_eval.models` entry point is installed (e.g. `accelerate launch -m mlcd_vl.eval.cli
lmms --model mlcd_llava ...`); everything after `lmms` goes to lmms-eval unchanged. Remember that lmms-eval exits
0 even when a run fails: `scripts/eval.sh` checks the results file.
"""

from __future__ import annotations

import argparse
import sys


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="eval_command", metavar="ACTION")
    summarize = sub.add_parser("summarize", help="table of lmms-eval results next to the published MLCD rows")
    summarize.add_argument("results", nargs="+", metavar="RESULTS",
                           help="lmms-eval output folders (searched for *_results.json) or results files")
    summarize.add_argument("--output", "-o", metavar="FILE.md", help="also write the markdown here")
    summarize.add_argument("--no-published", action="store_true", help="leave out the published MLCD rows")
    summarize.add_argument("--require", metavar="TASKS",
                           help="comma-separated tasks that must be in the results with every metric of their "
                                "metric_list (exit 1 otherwise: lmms-eval itself exits 0 when a run fails)")
    synthetic = sub.add_parser("make-synthetic", help="write small synthetic sets in each benchmark's parquet schema")
    synthetic.add_argument("out", metavar="OUT", help="folder for <benchmark>.parquet files")
    synthetic.add_argument("--items", type=int, default=8, help="documents per benchmark (default 8)")
    synthetic.add_argument("--seed", type=int, default=0)
    tasks = sub.add_parser("tasks", help="write offline task YAMLs reading a folder of parquet files")
    tasks.add_argument("data", metavar="DATA_DIR",
                       help="folder with <stem>.parquet or <stem>/ shards (stems: chartqa, docvqa_val, infovqa_val, "
                            "ocrbench, mmmu_val)")
    tasks.add_argument("out", metavar="OUT", help="folder to pass to lmms-eval --include_path")
    lmms = sub.add_parser("lmms", help="run lmms-eval's CLI with mlcd_llava registered", prefix_chars="+",
                          add_help=False)
    lmms.add_argument("lmms_args", nargs="*", metavar="ARGS", help="arguments for lmms-eval")


def run(args: argparse.Namespace) -> int:
    command = getattr(args, "eval_command", None)
    if command == "summarize":
        from mlcd_vl.eval.summarize import SummaryError, check_results, summarize_paths

        if args.require:
            problems = check_results(args.results, [t for t in args.require.split(",") if t])
            for problem in problems:
                print(f"mlcd-vl eval summarize: missing result: {problem}", file=sys.stderr)
            if problems:
                return 1
        try:
            summary = summarize_paths(args.results, published=not args.no_published)
        except SummaryError as error:
            print(f"mlcd-vl eval summarize: error: {error}", file=sys.stderr)
            return 2
        for warning in summary.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(summary.markdown, end="")
        if args.output:
            with open(args.output, "w") as handle:
                handle.write(summary.markdown)
        return 0
    if command == "make-synthetic":
        from mlcd_vl.eval.synthetic import make_synthetic

        for stem, path in make_synthetic(args.out, items=args.items, seed=args.seed).items():
            print(f"{stem}: {path}")
        return 0
    if command == "tasks":
        from pathlib import Path

        from mlcd_vl.eval.tasks import BENCHMARKS, write_task_dir

        if not Path(args.data).is_dir():
            print(f"mlcd-vl eval tasks: error: {args.data} is not a folder", file=sys.stderr)
            return 2
        written = write_task_dir(args.out, args.data)
        if not written:
            stems = ", ".join(b.stem for b in BENCHMARKS)
            print(f"mlcd-vl eval tasks: error: no benchmark data in {args.data} (expected <stem>.parquet or "
                  f"<stem>/*.parquet for {stems})", file=sys.stderr)
            return 2
        for path in written:
            print(path)
        return 0
    if command == "lmms":
        from mlcd_vl.eval import register_lmms_model

        register_lmms_model()
        from lmms_eval.cli.dispatch import main as lmms_main

        sys.argv = ["lmms-eval", *args.lmms_args]
        lmms_main()
        return 0
    print("mlcd-vl eval: choose an action: summarize, make-synthetic, tasks, lmms (see --help)", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlcd-vl eval", description=__doc__.strip().splitlines()[0])
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
