"""`mlcd-vl plan` for the real MLCD recipes (bigG-448 + Qwen2.5-7B, stage 1 and stage 2) on 8 x 80 GiB H100s.

    python bench/plan_recipes.py                   # writes bench/results/plan_recipes_<machine>_<date>.md (+ .json)
    python bench/plan_recipes.py --gpus 16 --nodes 2
    python bench/plan_recipes.py --synthetic-records 0     # the bounds only

No model is downloaded (the presets' architectures, built on the meta device). Each recipe is planned without a
length table, so micro-batches are the `data.max_length` bound with every token supervised (an upper bound), as it
is (its `optim.loss_impl`: auto, chunked above `optim.loss_chunk_tokens` supervised tokens, as training decides)
and with `optim.loss_impl=full` (full logits, what training did before the chunked loss). Stage 2 is then planned
again with a SYNTHETIC length table for a realistic figure: `--synthetic-records` LLaVA-NeXT-shaped records
(`common.make_records`: mixed aspect ratios, short and detailed answers, a multi-turn tail, 10% text-only) put
through training's own length scan (`SupervisedDataset` + `scan`, what `mlcd-vl data check` and `mlcd-vl train`
run) at the recipe's image settings (448-px crops, its five-pinpoint anyres grid, spatial_unpad) and template. The
Qwen2.5 tokenizer cannot be downloaded here: the text goes through the tiny preset's tokenizer trained on the
synthetic words, one token per word as Qwen2.5 has for these common English words (visual tokens, the bulk of a
sample, are exact). The real data's longest records set the real figure: run `mlcd-vl data check` on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import common  # bench/ is on sys.path: the script's own folder

RECIPES = ("configs/recipes/mlcd_bigG448_stage2.yaml", "configs/recipes/mlcd_bigG448_stage1.yaml")


STAGE2 = RECIPES[0]
LOSS_FULL = ("optim.loss_impl=full",)  # the comparison: full logits whatever the micro-batch


def synthetic_lengths(folder: Path, config, records: int) -> Path:
    """The length table of `records` synthetic LLaVA-NeXT-shaped records at `config`'s settings (module docstring)."""
    from mlcd_vl.data.dataset import LENGTHS_FILE, SupervisedDataset, scan
    from mlcd_vl.model.build import load_tokenizer
    from mlcd_vl.model.tiny import write_tiny_assets
    from mlcd_vl.plan.model_size import build_meta_model

    data = common.make_records(folder / "data", records, seed=0, image_format="JPEG")
    _, settings = build_meta_model(config)  # the recipe's crop size, grid, merge and template
    tokenizer = load_tokenizer(str(write_tiny_assets(folder / "tiny", corpus=common.corpus())["llm"]),
                               settings.template)
    data_config = dataclasses.replace(config.data, train=str(data), image_folder=str(data.parent), num_workers=0)
    table = scan(SupervisedDataset.from_config(data_config, tokenizer, settings, seed=config.seed))
    path = folder / LENGTHS_FILE
    table.save(str(path))
    return path


def describe(path: Path) -> str:
    import numpy as np

    from mlcd_vl.data.dataset import LengthTable

    table = LengthTable.load(str(path))
    usable = table.lengths[table.valid]
    quantiles = ", ".join(f"p{q} {np.percentile(usable, q):,.0f}" for q in (50, 90, 99))
    return (f"synthetic length table: {len(usable):,} usable of {len(table.lengths):,} records, "
            f"{int(table.has_image.sum()):,} with an image; tokens per sample mean {usable.mean():,.0f}, "
            f"{quantiles}, max {usable.max():,}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu-memory", type=float, default=80.0)
    parser.add_argument("--synthetic-records", type=int, default=2000,
                        help="records of the synthetic length table for stage 2 (0: none)")
    parser.add_argument("--out", default=str(common.RESULTS))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mlcd_vl.plan.planner import PlanRequest, make_plan
    from mlcd_vl.plan.report import render
    from mlcd_vl.train.config import load_config

    load_before = common.load_average()
    lines, plans, notes = [], [], ["no downloads: preset architectures on the meta device"]
    with tempfile.TemporaryDirectory(prefix="plan_recipes_") as scratch:
        cases = [(recipe, None) for recipe in RECIPES]
        if args.synthetic_records:
            table = synthetic_lengths(Path(scratch), load_config(common.REPO / STAGE2), args.synthetic_records)
            cases.append((STAGE2, table))
            notes.append(describe(table) + f" ({args.synthetic_records:,} records of `common.make_records`, seed 0; "
                         "text through the tiny tokenizer; see the script's docstring)")
        for recipe, table in cases:
            for overrides in ((), LOSS_FULL):
                request = PlanRequest(gpus=args.gpus, nodes=args.nodes, gpu_memory_gib=args.gpu_memory,
                                      lengths=str(table) if table else None)
                plan = make_plan(load_config(common.REPO / recipe, list(overrides)), request, recipe=recipe,
                                 overrides=overrides)
                if table:  # the scratch folder is gone afterwards: name the table by what it is
                    plan = json.loads(json.dumps(plan).replace(str(table), "SYNTHETIC/lengths.npz"))
                plan["synthetic_lengths"] = table is not None
                plans.append(plan)
                flags = " --lengths SYNTHETIC/lengths.npz" if table else ""
                title = "with the synthetic length table" if table else "without a length table (the bound)"
                lines += [f"## {title}: `mlcd-vl plan {' '.join((recipe, *overrides))} --gpus {args.gpus} "
                          f"--nodes {args.nodes} "
                          f"--gpu-memory {args.gpu_memory:g}{flags}`", "", "```", render(plan), "```", ""]
    header = common.header("plan of the real recipes", common.command_line("plan_recipes.py", argv), load_before,
                           notes)
    path = common.result_path(args.out, "plan_recipes")
    common.write_result(path, header + lines)
    common.write_json(path, plans)
    return 0


if __name__ == "__main__":
    sys.exit(main())
