"""`mlcd-vl demo`: train, evaluate and chat with a tiny MLCD-VL model on the CPU, end to end, with no downloads.

Every stage is the one a GPU run goes through, at toy size (a 0.74M-parameter Qwen2 LLM with its own tokenizer, a
0.19M-parameter MLCD RoPE2D tower, 0.95M in all; synthetic data):

1. data: `mlcd_vl.playground.generate` draws seeded images (coloured shapes, counts, bar charts with values, words)
   as LLaVA JSON + an image folder (stage-1 captions, stage-2 single/multi-turn Q&A) and a held-out split in the
   schema of lmms-eval's ChartQA, one parquet file per skill;
2. model: the `tiny` preset (`model.tiny.write_tiny_assets`) at the demo's sizes, its tokenizer trained on the
   generated text;
3. stage 1 (projector only, square images, plain template) and stage 2 (every part, anyres + spatial_unpad, the
   Qwen chat template) with the recipes in `mlcd_vl/playground/recipes/`, launched as a GPU run is:
   `NUM_GPUS=1 RECIPE=... scripts/pretrain.sh` / `scripts/finetune.sh` in a repository checkout (torchrun, one
   process), `python -m mlcd_vl.train RECIPE overrides` where there is no scripts/ folder (`--launcher`);
4. lmms-eval 0.7.3 with the `mlcd_llava` adapter on the held-out sets, one task per skill (ChartQA's prompt,
   generation settings and relaxed-accuracy metric), accuracy printed next to chance;
5. a two-turn chat about a held-out image through `serve.Engine`;
6. `report.md` in the run folder linking the resolved configs, checkpoints, loss curves and results.

`--quick` is a shortened run (the CI test's, 2-4 minutes); the default run takes 4.5-6.5 minutes on a busy 2-core
machine (measured with other jobs running, load average 2-5). The helpers
`build_tiny_model`, `tiny_pinpoints` and `DEMO_IMAGE` build the untrained tiny model that the tests share.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_IMAGE = ASSETS / "demo.png"
DEMO_QUESTION = "What shapes and colours are in this picture?"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORKDIR = Path("runs") / "demo"
LMMS_TASK_PREFIX = "mlcd_demo_"
REQUIRED_SKILLS = ("colour", "chart")  # what the demo promises to learn clearly above chance


def default_workdir() -> Path:
    return DEFAULT_WORKDIR


def draw_demo_image():
    """The bundled picture (320x240): a red circle, a blue square and the word "MLCD". Used if the file is missing,
    and to regenerate it: `python -c "from mlcd_vl.demo import draw_demo_image; draw_demo_image().save(...)"`."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (320, 240), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.ellipse((24, 40, 124, 140), fill=(220, 30, 30))
    draw.rectangle((190, 40, 290, 140), fill=(30, 60, 220))
    try:
        font = ImageFont.load_default(size=44)
    except TypeError:  # Pillow < 10.1: the bitmap font has one size
        font = ImageFont.load_default()
    draw.text((160, 195), "MLCD", fill=(0, 0, 0), font=font, anchor="mm")
    return image


def tiny_pinpoints(crop_size: int) -> list[tuple[int, int]]:
    """Upstream's five-crop grid (1x2, 2x1, 2x2, 3x1, 1x3) at the tiny tower's crop size, (width, height)."""
    s = crop_size
    return [(s, 2 * s), (2 * s, s), (2 * s, 2 * s), (3 * s, s), (s, 3 * s)]


def build_tiny_model(workdir: Path) -> Path:
    """Write the (untrained) tiny assets, compose the anyres VLM and save it; returns the model folder."""
    from mlcd_vl.model import tiny
    from mlcd_vl.model.build import VLMSpec, build_vlm
    from mlcd_vl.model.checkpoint import save_vlm

    paths = tiny.write_tiny_assets(workdir / "assets")
    spec = VLMSpec(llm=str(paths["llm"]), tower=str(paths["tower"]), image_mode="anyres",
                   merge_type="spatial_unpad", pinpoints=tiny_pinpoints(tiny.TinyShapes().image_size))
    model, tokenizer, settings = build_vlm(spec)
    return save_vlm(model, tokenizer, settings, workdir / "model")


# ------------------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run."""

    train_images: int
    heldout_per_skill: int
    stage1_steps: int
    stage2_steps: int
    batch_size: int
    eval_batch_size: int = 32


PLANS = {"full": DemoPlan(train_images=2400, heldout_per_skill=60, stage1_steps=100, stage2_steps=800, batch_size=8),
         "quick": DemoPlan(train_images=2400, heldout_per_skill=24, stage1_steps=50, stage2_steps=450, batch_size=8)}


def demo_shapes():
    """The demo's tiny model: a 3-layer, 128-wide Qwen2 LLM and a 3-layer, 64-wide MLCD tower (56-px crops)."""
    from mlcd_vl.model.tiny import TinyShapes

    return TinyShapes(llm_hidden=128, llm_layers=3, llm_heads=4, llm_kv_heads=2, llm_intermediate=384,
                      tower_hidden=64, tower_layers=3, tower_heads=4, tower_intermediate=256)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=None,
                        help=f"the run folder (default {DEFAULT_WORKDIR}/ under the current directory, or "
                             f"{DEFAULT_WORKDIR}-quick/ with --quick); an earlier demo run there is replaced")
    parser.add_argument("--quick", action="store_true",
                        help="a shortened run (fewer steps and held-out items, 2-4 minutes): what CI runs")
    parser.add_argument("--stage2-steps", type=int, default=None, help="override the plan's stage-2 steps")
    parser.add_argument("--launcher", choices=("auto", "scripts", "module"), default="auto",
                        help="scripts: scripts/pretrain.sh and scripts/finetune.sh with NUM_GPUS=1 and RECIPE=..., "
                             "as a GPU run calls them; module: python -m mlcd_vl.train RECIPE directly (the code "
                             "both run); auto (default): scripts in a repository checkout, else module")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: OMP_NUM_THREADS, else 2)")
    parser.add_argument("--seed", type=int, default=0, help="data seed")


# ---------------------------------------------------------------------------------------------------- the stages


class Timer:
    def __init__(self):
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}
        self._last = self.start
        self.load_start = os.getloadavg()
        self.load_end = self.load_start

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.stages[name] = now - self._last
        self._last = now
        self.load_end = os.getloadavg()
        return self.stages[name]

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


def _banner(step: int, total: int, text: str) -> None:
    print(f"\n=== [{step}/{total}] {text} ===", flush=True)


def _child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning threads make tiny ops 5x slower.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    path = env.get("PYTHONPATH", "")
    if (REPO / "mlcd_vl").is_dir() and str(REPO) not in path.split(os.pathsep):
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + path if path else "")
    return env


def _run(command: list[str], env: dict, log: Path, cwd: Path | None = None) -> None:
    """Run a stage in a child process: its output goes to the console (progress bars) and to `log`."""
    print("$ " + " ".join(str(c) for c in command), flush=True)
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert process.stdout is not None
        while chunk := process.stdout.read1(4096):
            sink.write(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        code = process.wait()
    if code != 0:
        raise RuntimeError(f"{command[2] if len(command) > 2 else command[0]} failed with exit status {code} "
                           f"(log: {log})")


def train_stage(stage: int, workdir: Path, overrides: list[str], launcher: str, env: dict) -> Path:
    """One training stage through the recipe code path; returns its output folder."""
    from mlcd_vl.playground import RECIPES

    recipe = RECIPES / f"demo_stage{stage}.yaml"
    out = workdir / f"stage{stage}"
    overrides = [*overrides, f"output_dir={out}"]
    script = REPO / "scripts" / ("pretrain.sh" if stage == 1 else "finetune.sh")
    if launcher == "scripts":
        if not script.is_file():
            raise RuntimeError(f"--launcher scripts: {script} not found (an installed package has no scripts/)")
        import socket

        with socket.socket() as probe:  # a free rendezvous port: other runs may hold torchrun's default
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = ["bash", str(script), *overrides]
        env = dict(env, NUM_GPUS="1", RECIPE=str(recipe), MASTER_PORT=str(port), PYTHON=sys.executable)
    else:
        command = [sys.executable, "-m", "mlcd_vl.train", str(recipe), *overrides]
    _run(command, env, workdir / "logs" / f"stage{stage}.log", cwd=REPO if launcher == "scripts" else None)
    print(f"(on GPUs: NUM_GPUS=8 RECIPE=configs/recipes/mlcd_bigG448_stage{stage}.yaml "
          f"scripts/{script.name} data.train=... runs the same code)")
    return out


def write_tasks(heldout: dict[str, Path], out: Path) -> list[str]:
    """One lmms-eval task per skill: ChartQA's settings (prompt, generation, relaxed accuracy) over its parquet."""
    from mlcd_vl.eval import Benchmark, task_yaml

    out.mkdir(parents=True, exist_ok=True)
    names = []
    for skill, path in heldout.items():
        name = f"{LMMS_TASK_PREFIX}{skill}"
        benchmark = Benchmark(f"demo {skill}", "chartqa", name, "chartqa", "test", "relaxed_overall", 100, "%",
                              0)
        (out / f"{name}.yaml").write_text(task_yaml(benchmark, [str(path.resolve())]))
        names.append(name)
    return names


def evaluate(model: Path, heldout: dict[str, Path], workdir: Path, batch_size: int, env: dict) -> dict[str, dict]:
    """lmms-eval with `mlcd_llava` on the held-out sets; returns {skill: {"accuracy", "n"}}."""
    out = workdir / "eval"
    tasks = write_tasks(heldout, out / "tasks")
    env = dict(env, HF_DATASETS_CACHE=str(out / "hf-datasets-cache"))
    marker = time.time()
    command = [sys.executable, "-m", "mlcd_vl.eval.cli", "lmms", "--model", "mlcd_llava",
               "--model_args", f"pretrained={model.resolve()}", "--tasks", ",".join(tasks),
               "--include_path", str((out / "tasks").resolve()), "--batch_size", str(batch_size),
               "--output_path", str(out.resolve()), "--log_samples"]
    _run(command, env, workdir / "logs" / "eval.log")
    found = [p for p in out.rglob("*_results.json") if p.stat().st_mtime >= marker - 1]
    if not found:  # lmms-eval exits 0 even when it fails
        raise RuntimeError(f"lmms-eval wrote no results file (log: {workdir / 'logs' / 'eval.log'})")
    data = json.loads(max(found, key=lambda p: p.stat().st_mtime).read_text())
    scores = {}
    for skill in heldout:
        task = f"{LMMS_TASK_PREFIX}{skill}"
        if task not in data.get("results", {}):
            raise RuntimeError(f"lmms-eval's results lack {task} (log: {workdir / 'logs' / 'eval.log'})")
        scores[skill] = {"accuracy": float(data["results"][task]["relaxed_overall,none"]),
                         "n": int(data["n-samples"][task]["effective"])}
    return scores


def chat(model: Path, data, threads: int) -> list[tuple[str, str]]:
    """Two turns about the first held-out colour image: colour, then shape (the engine keeps the conversation)."""
    import torch

    from mlcd_vl.playground.generate import QUESTIONS, SHORT
    from mlcd_vl.serve.engine import Engine, GenerationSettings, Request

    torch.set_num_threads(threads)
    items = json.loads(Path(data.heldout_json).read_text())
    item = next(i for i in items if i["skill"] == "colour")
    image = data.images / item["image"]
    engine = Engine.from_pretrained(model, device="cpu")
    settings = GenerationSettings(max_new_tokens=8)
    messages = [{"role": "user", "content": f"<image>\n{QUESTIONS['colour']}{SHORT}"}]
    transcript = [("image", str(image.relative_to(data.root.parent)) if data.root.parent in image.parents
                   else str(image))]
    for follow_up in (f"{QUESTIONS['shape']}{SHORT}", None):
        answer = engine.generate([Request(messages, [str(image)])], settings)[0].text.strip()
        shown = messages[-1]["content"].replace("<image>\n", "[image] ").replace("\n", " ")
        transcript += [("user", shown), ("assistant", answer)]
        messages.append({"role": "assistant", "content": answer})
        if follow_up is None:
            break
        messages.append({"role": "user", "content": follow_up})
    truth = item["conversations"][1]["value"]
    transcript.append(("truth", f"colour {truth} ({image.name}, never seen in training)"))
    return transcript


# ------------------------------------------------------------------------------------------------------ reporting


def results_table(scores: dict[str, dict]) -> str:
    from mlcd_vl.playground.generate import chance

    lines = ["| skill | held-out accuracy | chance | n | above chance |", "|---|---:|---:|---:|---|"]
    for skill, score in scores.items():
        margin = score["accuracy"] - chance(skill)
        lines.append(f"| {skill} | {score['accuracy']:.1%} | {chance(skill):.1%} | {score['n']} | "
                     f"{'yes' if margin > 0.15 else 'no'} ({margin:+.1%}) |")
    return "\n".join(lines) + "\n"


def write_report(workdir: Path, mode: str, plan: DemoPlan, scores: dict, transcript, timer: Timer,
                 shapes, threads: int) -> Path:
    def rel(path: Path) -> str:
        return os.path.relpath(path, workdir)

    def both(name: str) -> str:
        return f"[stage1/{name}](stage1/{name}) | [stage2/{name}](stage2/{name})"

    stages = "\n".join(f"| {name} | {seconds:.0f} s |" for name, seconds in timer.stages.items())
    talk = "\n".join(f"- **{who}**: {text}" for who, text in transcript)
    picture = transcript[0][1]
    load = ", ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(timer.load_start, timer.load_end))
    results = sorted((workdir / "eval").rglob("*_results.json"))
    body = f"""# MLCD-VL CPU demo ({mode})

A tiny LLaVA-NeXT-style model (MLCD RoPE2D tower -> 2-layer GELU MLP -> Qwen2 LLM) trained from scratch on
synthetic data in two stages, scored with lmms-eval on a held-out split, then asked about a held-out image.
Total wall time: {timer.total:.0f} s with {threads} torch thread(s) per process on a machine with
{os.cpu_count()} CPU(s); load average (1, 5, 15 min) at start/end: {load}.

## Results (lmms-eval `mlcd_llava`, ChartQA relaxed accuracy, held-out images)

{results_table(scores)}
"above chance" means more than 15 points above a uniform guess. Results file(s):
{", ".join(f"[{rel(p)}]({rel(p)})" for p in results)}; per-sample answers in the `*_samples_*.jsonl` beside them.

## Chat (serve.Engine, {rel(workdir / 'stage2')})

![held-out image]({picture})

{talk}

## Training

| | stage 1 | stage 2 |
|---|---|---|
| what trains | projector | tower, projector, LLM |
| images | square, 1 crop | anyres (5-crop grid), spatial_unpad |
| template | plain (captions) | qwen_1_5 (single and multi-turn Q&A) |
| steps x batch | {plan.stage1_steps} x 16 | {plan.stage2_steps} x {plan.batch_size} |
| resolved config | {both("train_config.yaml")} |
| loss curve | {both("loss_curve.png")} |
| metrics | {both("metrics.jsonl")} |
| checkpoint (HF-native) | [stage1/](stage1/) (+ projector.safetensors) | [stage2/](stage2/) |

![stage 1 loss](stage1/loss_curve.png) ![stage 2 loss](stage2/loss_curve.png)

Model sizes: {json.dumps(shapes.__dict__)}. Data: [data/](data/) ({plan.train_images} training images,
[captions.json](data/captions.json), [chat.json](data/chat.json); held-out [data/heldout/](data/heldout/),
{plan.heldout_per_skill} per skill; [playground.json](data/playground.json)). Logs: [logs/](logs/).

## Wall time

| stage | time |
|---|---:|
{stages}
"""
    path = workdir / "report.md"
    path.write_text(body)
    (workdir / "results.json").write_text(json.dumps({
        "mode": mode, "plan": plan.__dict__, "scores": scores, "wall_seconds": timer.stages,
        "total_seconds": timer.total, "threads": threads, "cpus": os.cpu_count(),
        "load_average_start": timer.load_start, "load_average_end": timer.load_end}, indent=2) + "\n")
    (workdir / "results.md").write_text(results_table(scores))
    return path


# ----------------------------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from mlcd_vl.model import tiny
    from mlcd_vl.playground.generate import chance, write_playground

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
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
    env = _child_env(threads)
    launcher = args.launcher
    if launcher == "auto":
        have_scripts = all((REPO / "scripts" / name).is_file() for name in ("pretrain.sh", "finetune.sh"))
        launcher = "scripts" if have_scripts else "module"
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

    report = write_report(workdir, mode, plan, scores, transcript, timer, shapes, threads)
    print(f"\nReport: {report}\nRun folder: {workdir} (configs, checkpoints, loss curves, results, logs)")
    print(f"Wall time: {timer.total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timer.stages.items()) + "); "
          f"load average {timer.load_start[0]:.1f} at start, {timer.load_end[0]:.1f} at end on {os.cpu_count()} CPU(s)")
    missing = [s for s in REQUIRED_SKILLS if s in scores and scores[s]["accuracy"] <= chance(s)]
    if missing:
        print(f"warning: {', '.join(missing)} not above chance: the model did not learn enough in this run")
    return 0
