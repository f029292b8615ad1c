"""`python -m mlcd_vl.train RECIPE [section.key=value ...]` (see `mlcd_vl.train.run`)."""

import argparse
import sys

from mlcd_vl.errors import run_reporting
from mlcd_vl.train.run import configure_parser, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m mlcd_vl.train", description=__doc__)
    configure_parser(parser)
    args = parser.parse_args()
    sys.exit(run_reporting("mlcd-vl train", lambda: run(args)))
