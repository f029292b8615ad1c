"""Write the demo's synthetic data (training + held-out) without running the demo.

    python playground/generate.py OUT [--train-images 2400] [--heldout-per-skill 60] [--seed 0]

A thin command line over `mlcd_vl.playground.generate.write_playground` (the code lives in the installed package so
that `mlcd-vl demo` works from any directory); see that module for the layout and the skills.
"""

from __future__ import annotations

import argparse

from mlcd_vl.playground.generate import write_playground


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("out", help="output folder")
    parser.add_argument("--train-images", type=int, default=2400)
    parser.add_argument("--heldout-per-skill", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = write_playground(args.out, train_images=args.train_images, heldout_per_skill=args.heldout_per_skill,
                            seed=args.seed, progress=True)
    print(f"stage 1: {data.captions}\nstage 2: {data.chat}\nimages:  {data.images}")
    for skill, path in data.heldout.items():
        print(f"held-out {skill}: {path}")


if __name__ == "__main__":
    main()
