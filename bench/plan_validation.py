"""`mlcd-vl plan`'s parameter / gradient / optimizer-state bytes against what real DeepSpeed ranks hold (CPU).

    python bench/plan_validation.py                 # tiny and ~85M models, ZeRO-2 and ZeRO-3, 1 and 2 processes
    python bench/plan_validation.py --quick         # tiny model, 2 processes only (what the test runs)
    python bench/plan_validation.py --out /tmp/bench

Each case is a real `mlcd_vl.train` launch of the tiny stage-2 recipe (tower, projector and LLM all train, fp32 on
CPU) through torchrun (gloo) with configs/deepspeed/zero2.json or zero3.json, one optimizer step, with
`bench/plan_probe.py` recording on every rank the bytes of its parameters, gradients and optimizer states (fp32
master + AdamW m, v) at that step, each tensor storage counted once. The plan for the same recipe, overrides and
world size (`planner.make_plan`, the recipe's scenario) predicts the same three terms; the target is every term on
every rank within 15%. Reduction buckets and ZeRO-3's gathered working set are reported beside (not validated: on
a small model they are fixed-size and dominate). The models: the tiny preset (~0.2M parameters, many tensors under
ZeRO-3's persistence threshold) and a ~85M one (12-layer Qwen2 of width 768, 6-layer MLCD tower of width 384).
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

import common  # bench/ is on sys.path: the script's own folder

REPO = common.REPO
RECIPE = REPO / "configs" / "recipes" / "tiny_stage2.yaml"
DEEPSPEED = REPO / "configs" / "deepspeed"
TERMS = ("parameters", "gradients", "optimizer states")
TOLERANCE = 0.15
LAUNCH_TIMEOUT = 900  # the first DeepSpeed launch on a fresh machine JIT-builds its shm op (about 2 minutes)


def medium_shapes():
    from mlcd_vl.model.tiny import TinyShapes

    return TinyShapes(llm_hidden=768, llm_layers=12, llm_heads=12, llm_kv_heads=2, llm_intermediate=2048,
                      tower_hidden=384, tower_layers=6, tower_heads=6, tower_intermediate=1536)


def prepare(root: Path, models: list[str]) -> dict:
    """Data (8 synthetic records) and each model's overrides."""
    from mlcd_vl.model.tiny import write_tiny_assets

    data = root / "data"
    records = common.make_records(data, 8, seed=0)
    setups = {"data": [f"data.train={records}", f"data.image_folder={data}", "data.max_length=512"]}
    if "tiny" in models:
        setups["tiny"] = ["model.llm=tiny", "model.tower=tiny"]
    if "medium" in models:
        paths = write_tiny_assets(root / "medium", shapes=medium_shapes())
        setups["medium"] = [f"model.llm={paths['llm']}", f"model.tower={paths['tower']}"]
    return setups


def overrides_for(setups: dict, model: str, config: str, out: Path) -> list[str]:
    return [*setups["data"], *setups[model], f"deepspeed={DEEPSPEED / config}", f"output_dir={out}",
            "model.init_from=null", "optim.max_steps=1", "optim.warmup_ratio=0", "batch.per_device_batch_size=1",
            "batch.grad_accum=1", "save_steps=null"]


def launch(overrides: list[str], world: int, out: Path, tiny_dir: Path) -> list[dict]:
    """One probed training launch; the rank records."""
    probe = out / "probe"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO), MLCD_VL_TINY_DIR=str(tiny_dir), PLAN_PROBE_OUT=str(probe))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               str(REPO / "bench" / "plan_probe.py"), str(RECIPE), *overrides]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return [json.loads((probe / f"rank{rank}.json").read_text()) for rank in range(world)]


def predict(overrides: list[str], world: int, tiny_dir: Path) -> dict:
    """The plan's per-GPU terms for the recipe's own scenario."""
    os.environ["MLCD_VL_TINY_DIR"] = str(tiny_dir)
    from mlcd_vl.plan.planner import PlanRequest, make_plan
    from mlcd_vl.train.config import load_config

    plan = make_plan(load_config(RECIPE, overrides), PlanRequest(gpus=world))
    row = next(r for r in plan["scenarios"] if r["recipe"])
    return {"scenario": row["scenario"], **{term: row["gpu"][term] for term in (*TERMS, "buffers")},
            "per_rank": row["gpu_per_rank"],
            "parameters_counted": sum(plan["model"]["parameters"].values()),
            "trainable": sum(plan["model"]["trainable"].values())}


def compare(measured: list[dict], predicted: dict) -> list[dict]:
    """One row per rank: measured, predicted (the rank's own where the plan has per-rank terms) and their ratio per
    term (and for the three together)."""
    rows = []
    for record in measured:
        row = {"rank": record["rank"]}
        wanted = {t: predicted["per_rank"].get(t, [predicted[t]] * len(measured))[record["rank"]] for t in TERMS}
        for term in (*TERMS, "sum"):
            have = sum(record[t] for t in TERMS) if term == "sum" else record[term]
            want = sum(wanted.values()) if term == "sum" else wanted[term]
            row[term] = {"measured": have, "predicted": want, "ratio": want / have if have else float("inf")}
        row["within"] = all(abs(row[t]["ratio"] - 1) <= TOLERANCE for t in (*TERMS, "sum"))
        row["buffers"] = {"measured": record["buffers"], "predicted": predicted["buffers"]}
        row["all live tensors"] = record["all live tensors"]
        rows.append(row)
    return rows


def validate(root: Path, models: list[str], configs: list[str], worlds: list[int]) -> list[dict]:
    """Every (model, config, world) case: launch, predict, compare."""
    setups = prepare(root, models)
    cases = []
    for model in models:
        for config in configs:
            for world in worlds:
                out = root / f"{model}-{config.removesuffix('.json')}-{world}"
                overrides = overrides_for(setups, model, config, out)
                start = time.perf_counter()
                measured = launch(overrides, world, out, root / "tiny")
                predicted = predict(overrides, world, root / "tiny")
                cases.append({"model": model, "config": config, "world": world, "predicted": predicted,
                              "ranks": compare(measured, predicted), "seconds": time.perf_counter() - start})
    return cases


def saved_bytes(run, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves for backward while `run()` executes (parameters excluded)."""
    import torch

    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(seen.values())


def activation_check(root: Path, positions: int = 512, crops: int = 4) -> list[dict]:
    """The plan's activation rates against the bytes autograd saves in a forward pass of the ~85M model (stage 2,
    every part trains, no checkpointing), fp32 and bf16, LLM and tower + projector separately. (With
    checkpointing the forward keeps only each layer's input; the plan adds one layer recomputed in backward.)"""
    import torch

    from mlcd_vl.model.multimodal import encode_crops
    from mlcd_vl.model.tiny import write_tiny_assets
    from mlcd_vl.plan import memory
    from mlcd_vl.plan.model_size import model_shape
    from mlcd_vl.train import models, optim
    from mlcd_vl.train.config import load_config

    paths = write_tiny_assets(root / "medium", shapes=medium_shapes())
    config = load_config(RECIPE, ["model.init_from=null", f"output_dir={root / 'activations'}",
                                  f"model.llm={paths['llm']}", f"model.tower={paths['tower']}",
                                  "gradient_checkpointing=false"])
    shape, settings = model_shape(config)
    rows = []
    for dtype, e in ((torch.float32, 4), (torch.bfloat16, 2)):
        torch.manual_seed(0)
        model = models.build_model(config)[0]
        optim.apply_tunable_parts(model, config.tunable_parts)
        optim.freeze_unreached(model)
        model.to(dtype).train()
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        ids = torch.randint(0, 500, (1, positions))
        pixels = torch.randn(crops, 3, settings.crop_size, settings.crop_size, dtype=dtype)
        llm = saved_bytes(lambda: model.model.language_model(input_ids=ids), weights)
        tower = saved_bytes(lambda: encode_crops(model, pixels), weights)
        rates = memory.activation_rates(shape.llm, shape.tower, shape.projector_in, shape.projector_out, e,
                                        llm_trainable=True, tower_trainable=True, projector_trainable=True,
                                        checkpointing=False)
        rows.append({"dtype": str(dtype).removeprefix("torch."), "positions": positions, "crops": crops,
                     "llm": {"measured": llm, "predicted": rates.per_position * positions},
                     "tower": {"measured": tower, "predicted": rates.per_crop * crops},
                     "tower_layers": {"run": model.config.vision_config.num_hidden_layers,
                                      "reaching_projector": shape.tower.layers_used}})
    return rows


def mib(value: float) -> str:
    return f"{value / 2**20:,.2f}"


def report(cases: list[dict], command: str, load_before: str, activations: list[dict]) -> list[str]:
    ok = all(row["within"] for case in cases for row in case["ranks"])
    lines = common.header("plan validation", command, load_before, [
        f"recipe: {RECIPE.relative_to(REPO)} (fp32 on CPU, every part trains), one optimizer step, torchrun + gloo",
        f"target: parameters, gradients and optimizer states each within {100 * TOLERANCE:.0f}% on every rank",
        f"result: {'every term within the target' if ok else 'SOME TERMS OUTSIDE THE TARGET'}"])
    lines += ["| model (parameters / trainable) | DeepSpeed | ranks | rank | term | measured MiB | plan MiB | "
              "plan / measured |", "|---|---|---|---|---|---|---|---|"]
    for case in cases:
        label = (f"{case['model']} ({case['predicted']['parameters_counted']:,} / "
                 f"{case['predicted']['trainable']:,})")
        for row in case["ranks"]:
            for term in (*TERMS, "sum"):
                cell = row[term]
                lines.append(f"| {label} | {case['config']} | {case['world']} | {row['rank']} | {term} | "
                             f"{mib(cell['measured'])} | {mib(cell['predicted'])} | {cell['ratio']:.3f} |")
    lines += ["", "Not validated, for reference (MiB; measured on rank 0 at the step): reduction buckets / gathered "
              "working set (ZeRO-2 allocates its bucket for backward and frees it before the step; the plan's ZeRO-3 "
              "figure is the most `stage3_max_live_parameters` allows), and every live tensor storage of the process "
              "before and after the step (model, data, buffers).", "",
              "| model | DeepSpeed | ranks | buffers measured | buffers plan | all live tensors before / after |",
              "|---|---|---|---|---|---|"]
    for case in cases:
        row = case["ranks"][0]
        live = row["all live tensors"]
        lines.append(f"| {case['model']} | {case['config']} | {case['world']} | {mib(row['buffers']['measured'])} | "
                     f"{mib(row['buffers']['predicted'])} | {mib(live['before step'])} / {mib(live['after step'])} |")
    if activations:
        layers = activations[0]["tower_layers"]
        lines += ["", "Activations (reported, no target): bytes autograd saves in one forward of the ~85M model, "
                  "every part training, no checkpointing, against the plan's per-position and per-crop rates. The "
                  f"tower's forward runs all {layers['run']} layers; only {layers['reaching_projector']} reach the "
                  "projector, and the plan counts those (the last layer's saved tensors are freed when the tower "
                  "returns, before the LLM runs).", "",
                  "| dtype | part | measured MiB | plan MiB | plan / measured |", "|---|---|---|---|---|"]
        for row in activations:
            for part, label in (("llm", f"LLM, {row['positions']} positions"), ("tower", f"tower + projector, "
                                                                                       f"{row['crops']} crops")):
                cell = row[part]
                lines.append(f"| {row['dtype']} | {label} | {mib(cell['measured'])} | {mib(cell['predicted'])} | "
                             f"{cell['predicted'] / cell['measured']:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 processes (ZeRO-2 and ZeRO-3)")
    parser.add_argument("--out", default=str(common.RESULTS), help="folder of the result file")
    args = parser.parse_args(argv)
    load_before = common.load_average()
    models = ["tiny"] if args.quick else ["tiny", "medium"]
    worlds = [2] if args.quick else [1, 2]
    with tempfile.TemporaryDirectory(prefix="plan_validation_") as folder:
        cases = validate(Path(folder), models, ["zero2.json", "zero3.json"], worlds)
        activations = [] if args.quick else activation_check(Path(folder))
    path = common.result_path(args.out, "plan_validation")
    common.write_result(path, report(cases, common.command_line("plan_validation.py", argv), load_before,
                                     activations))
    common.write_json(path, {"cases": cases, "activations": activations})
    return 0 if all(row["within"] for case in cases for row in case["ranks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
