"""`mlcd-vl demo`: train, evaluate and chat with a tiny MLCD-VL model on the CPU, end to end, with no downloads.

Six numbered stages, about 5 minutes on 2 cores (`--quick`: 2-4 minutes):

1. synthetic data: coloured shapes, counts, bar charts with values and words, as LLaVA JSON with an image folder,
   and a held-out split the model never sees in training;
2. a ~1M-parameter model: an MLCD RoPE2D vision tower, an MLP projector and a Qwen2 LLM whose tokenizer is
   trained on that text;
3. stage 1 (projector only, captions) and 4. stage 2 (every part, anyres images, questions and answers), started
   the way a GPU run is (`scripts/pretrain.sh` / `scripts/finetune.sh` in a repository checkout);
5. lmms-eval on the held-out pictures: accuracy per skill next to chance;
6. a short chat about a held-out picture.

Everything lands in the run folder (default `runs/demo/`): `report.md`, the resolved configs, checkpoints, loss
curves, results, and each stage's full log in `logs/`. The demo ends with the commands to try the trained model
yourself (`ask`, `chat`, `web`, `serve`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from mlcd_vl.demo.plan import PLANS, REQUIRED_SKILLS, DemoPlan, demo_shapes
from mlcd_vl.demo.report import Timer, results_table, try_next, write_report
from mlcd_vl.demo.stages import chat, child_env, default_launcher, evaluate, train_stage

DEFAULT_WORKDIR = Path("runs") / "demo"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=None,
                        help=f"the run folder (default {DEFAULT_WORKDIR}/ under the current directory, or "
                             f"{DEFAULT_WORKDIR}-quick/ with --quick); an earlier demo run there is replaced")
    parser.add_argument("--quick", action="store_true",
                        help="a shortened run (fewer steps and held-out items, 2-4 minutes)")
    parser.add_argument("--stage2-steps", type=int, default=None, metavar="N",
                        help="train stage 2 for N steps instead of the plan's (more steps, better answers)")
    parser.add_argument("--launcher", choices=("auto", "scripts", "module"), default="auto",
                        help="how training starts: scripts (scripts/pretrain.sh and finetune.sh with NUM_GPUS=1, "
                             "as on GPUs), module (python -m mlcd_vl.train RECIPE), auto: scripts in a repository "
                             "checkout, else module")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: OMP_NUM_THREADS, else 2)")
    parser.add_argument("--seed", type=int, default=0, help="data seed")


def _banner(step: int, total: int, text: str) -> None:
    print(f"\n=== [{step}/{total}] {text} ===", flush=True)


def run(args: argparse.Namespace) -> int:
    """The six stages in order, each timed; the report at the end. Returns the exit status."""
    from transformers.utils import logging as hf_logging

    from mlcd_vl.console import quiet_deepspeed_cpu_notice
    from mlcd_vl.demo.playground import chance, write_playground
    from mlcd_vl.model import tiny

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    quiet_deepspeed_cpu_notice()
    mode = "quick" if args.quick else "full"
    plan = PLANS[mode]
    if args.stage2_steps:
        plan = DemoPlan(**{**plan.__dict__, "stage2_steps": args.stage2_steps})
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS") or 2)
    workdir = Path(args.workdir or (DEFAULT_WORKDIR.with_name("demo-quick") if args.quick else DEFAULT_WORKDIR))
    workdir = workdir.expanduser().resolve()
    if workdir.exists() and any(workdir.iterdir()):
        if not any((workdir / name).exists() for name in ("logs", "data", "results.json", "stage1")):
            print(f"mlcd-vl demo: {workdir} is not empty and is not a demo run folder; choose another --workdir",
                  file=sys.stderr)
            return 2
        shutil.rmtree(workdir)
    (workdir / "logs").mkdir(parents=True)
    env = child_env(threads)
    launcher = default_launcher(args.launcher)
    timer = Timer()
    total = 6
    print(f"MLCD-VL CPU demo ({mode}): run folder {workdir}"
          f"{' (the default, runs/demo under the current directory)' if args.workdir is None else ''}; "
          f"{threads} thread(s), training launched by {launcher}, nothing is downloaded")

    _banner(1, total, f"synthetic data: {plan.train_images} training images, {plan.heldout_per_skill} held-out "
                      "items per skill")
    data = write_playground(workdir / "data", train_images=plan.train_images,
                            heldout_per_skill=plan.heldout_per_skill, seed=args.seed, progress=True)
    print(f"wrote {data.captions}, {data.chat}, held-out sets in {data.root / 'heldout'} ({timer.lap('data'):.0f} s)")

    _banner(2, total, "tiny model: tokenizer trained on the generated text, random Qwen2 LLM and MLCD tower")
    shapes = demo_shapes()
    assets = tiny.write_tiny_assets(workdir / "assets", corpus=data.corpus + tiny.default_corpus(), shapes=shapes)
    print(f"wrote {assets['llm']} and {assets['tower']} ({timer.lap('tiny model'):.0f} s)")

    common = [f"model.llm={assets['llm']}", f"model.tower={assets['tower']}",
              f"data.image_folder={data.images}"]
    _banner(3, total, "stage 1: projector pretraining on captions (square images, plain template)")
    stage1 = train_stage(1, workdir, [*common, f"data.train={data.captions}",
                                      f"optim.max_steps={plan.stage1_steps}"], launcher, env)
    timer.lap("stage 1")
    _banner(4, total, "stage 2: every part trains on questions and answers (anyres, chat template)")
    stage2 = train_stage(2, workdir, [*common, f"data.train={data.chat}", f"model.init_from={stage1}",
                                      f"optim.max_steps={plan.stage2_steps}",
                                      f"batch.per_device_batch_size={plan.batch_size}"], launcher, env)
    timer.lap("stage 2")

    _banner(5, total, "lmms-eval (mlcd_llava adapter) on the held-out sets, one task per skill")
    scores = evaluate(stage2, data.heldout, workdir, plan.eval_batch_size, env)
    timer.lap("evaluation")
    print("\nHeld-out accuracy per skill (lmms-eval, ChartQA relaxed accuracy):\n")
    print(results_table(scores))

    _banner(6, total, "chat about a held-out image (serve.Engine)")
    transcript = chat(stage2, data, threads)
    for who, text in transcript:
        print(f"{who:>9}: {text}")
    timer.lap("chat")

    first = {}
    for item in json.loads(data.heldout_json.read_text()):
        first.setdefault(item["skill"], data.images / item["image"])
    next_steps = try_next(stage2, first)
    report = write_report(workdir, mode, plan, scores, transcript, timer, shapes, threads, next_steps)
    print(f"\nReport: {report}\nRun folder: {workdir} (configs, checkpoints, loss curves, results, logs)")
    print(f"Wall time: {timer.total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timer.stages.items()) + "); "
          f"load average {timer.load_start[0]:.1f} at start, {timer.load_end[0]:.1f} at end on {os.cpu_count()} CPU(s)")
    missing = [s for s in REQUIRED_SKILLS if s in scores and scores[s]["accuracy"] <= chance(s)]
    if missing:
        print(f"warning: {', '.join(missing)} not above chance: the model did not learn enough in this run")
    print("\n" + "\n".join(next_steps))
    return 0
