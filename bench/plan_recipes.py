"""`mlcd-vl plan` for the real MLCD recipes (bigG-448 + Qwen2.5-7B, stage 1 and stage 2) on 8 x 80 GiB H100s.

    python bench/plan_recipes.py                   # writes bench/results/plan_recipes_<machine>_<date>.md (+ .json)
    python bench/plan_recipes.py --gpus 16 --nodes 2

No model is downloaded (the presets' architectures, built on the meta device) and no length table exists here, so
micro-batches are the `data.max_length` bound; each recipe is planned as it is and with the chunked loss
(`--loss-chunk 1024`), the setting being added for issue 14.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import common  # bench/ is on sys.path: the script's own folder

RECIPES = ("configs/recipes/mlcd_bigG448_stage2.yaml", "configs/recipes/mlcd_bigG448_stage1.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu-memory", type=float, default=80.0)
    parser.add_argument("--out", default=str(common.RESULTS))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mlcd_vl.plan.planner import PlanRequest, make_plan
    from mlcd_vl.plan.report import render
    from mlcd_vl.train.config import load_config

    load_before = common.load_average()
    lines, plans = [], []
    for recipe in RECIPES:
        for chunk in (None, 1024):
            request = PlanRequest(gpus=args.gpus, nodes=args.nodes, gpu_memory_gib=args.gpu_memory, loss_chunk=chunk)
            plan = make_plan(load_config(common.REPO / recipe), request, recipe=recipe)
            plans.append(plan)
            flags = f" --loss-chunk {chunk}" if chunk else ""
            lines += [f"## `mlcd-vl plan {recipe} --gpus {args.gpus} --nodes {args.nodes} --gpu-memory "
                      f"{args.gpu_memory:g}{flags}`", "", "```", render(plan), "```", ""]
    header = common.header("plan of the real recipes", common.command_line("plan_recipes.py", argv), load_before,
                           ["no downloads: preset architectures on the meta device; no length table (the "
                            "data.max_length bound)"])
    path = common.result_path(args.out, "plan_recipes")
    common.write_result(path, header + lines)
    path.with_suffix(".json").write_text(json.dumps(plans, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
