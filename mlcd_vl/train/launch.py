"""What the launcher scripts (`scripts/pretrain.sh`, `scripts/finetune.sh`) ask before they start a run.

    python -m mlcd_vl.train.launch RECIPE --world-size N [section.key=value ...]

prints the resolved recipe's batch arithmetic for N processes (per device x processes x accumulation) and fails in
one line, with the config's own message, when the recipe or an override does not load, `batch.global_batch_size`
does not fit, or an input is missing (`inputs.check_inputs`: data files, model folders), so a bad launch stops
before torchrun starts N processes. The scripts pass `--quiet`: the run itself prints the batch once it starts, so
the console shows it once per stage.
"""

from __future__ import annotations

import argparse
import sys

from mlcd_vl.errors import run_reporting


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlcd_vl.train.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--world-size", type=int, required=True, help="processes in all (GPUs x nodes)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--quiet", action="store_true", help="check only; print nothing when the launch is fine")
    args = parser.parse_intermixed_args(argv)
    return run_reporting("mlcd-vl train", lambda: _check(args))


def _check(args: argparse.Namespace) -> int:
    from mlcd_vl.train.config import load_config
    from mlcd_vl.train.inputs import check_inputs

    config = load_config(args.recipe, args.overrides)
    config.batch.check(args.world_size)
    check_inputs(config)
    if not args.quiet:
        print(f"effective {config.batch.describe(args.world_size)}"
              + (f"; deepspeed {config.deepspeed}" if config.deepspeed else "") + f"; output {config.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
