"""What `mlcd-vl demo` leaves behind: the per-stage wall clock, the results table, the commands to try the trained
model next, and `report.md`, `results.json` and `results.md` in the run folder (linking the resolved configs,
checkpoints, loss curves and lmms-eval results).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import textwrap
import time
from pathlib import Path

from mlcd_vl.demo.plan import DemoPlan
from mlcd_vl.demo.playground import QUESTIONS, SHORT, chance


class Timer:
    """Wall time per stage, and the load average at start and after the latest stage (the report shows both: on a
    shared machine the load explains the times)."""

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


def results_table(scores: dict[str, dict]) -> str:
    """Held-out accuracy per skill next to chance, as a Markdown table."""
    lines = ["| skill | held-out accuracy | chance | n | above chance |", "|---|---:|---:|---:|---|"]
    for skill, score in scores.items():
        margin = score["accuracy"] - chance(skill)
        lines.append(f"| {skill} | {score['accuracy']:.1%} | {chance(skill):.1%} | {score['n']} | "
                     f"{'yes' if margin > 0.15 else 'no'} ({margin:+.1%}) |")
    return "\n".join(lines) + "\n"


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def command_name() -> str:
    """How to call `mlcd-vl` from this shell: the bare name when it is this installation's, else its path."""
    beside = Path(sys.executable).parent / "mlcd-vl"
    found = shutil.which("mlcd-vl")
    if found and beside.is_file() and Path(found).resolve() == beside.resolve():
        return "mlcd-vl"
    return _shown(beside) if beside.is_file() else f"{_shown(Path(sys.executable))} -m mlcd_vl.cli"


def try_next(model: Path, heldout_images: dict[str, Path]) -> list[str]:
    """The commands to try the trained model with, on held-out pictures and in the question form it learned."""
    cli, folder = command_name(), shlex.quote(_shown(model))
    colour, shape = (shlex.quote(_shown(heldout_images[skill])) for skill in ("colour", "shape"))
    question = "$'" + (QUESTIONS["colour"] + SHORT).replace("\n", "\\n") + "'"  # bash's $'...\n...': a newline
    known = " / ".join(q.replace("{label}", "red") for q in QUESTIONS.values())
    return [
        f"Try the trained model ({_shown(model)}) on held-out pictures, asking as it was taught:",
        f"  {cli} ask --model {folder} --image {colour} \\",
        f"      {question}",
        f"  {cli} chat --model {folder} --image {shape}   # then ask: What shape is this?",
        f"  {cli} web --model {folder}     # http://127.0.0.1:7860, with an example picture",
        f"  {cli} serve --model {folder}   # OpenAI-compatible API on 127.0.0.1:8000 (README: Chat and serving)",
        *textwrap.wrap(f"Questions it was taught, one kind of picture each: {known} (add {SHORT.strip()!r} on a "
                       "new line for a one-word answer).", 100),
    ]


def sizes_table(shapes) -> str:
    """The demo model's sizes as a Markdown table."""
    rows = "\n".join(f"| {name} | {value} |" for name, value in vars(shapes).items())
    return f"| size | value |\n|---|---:|\n{rows}\n"


def write_report(workdir: Path, mode: str, plan: DemoPlan, scores: dict, transcript, timer: Timer,
                 shapes, threads: int, next_steps: list[str] | None = None) -> Path:
    """Write report.md, results.json and results.md into the run folder; returns report.md's path."""
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

Data: [data/](data/) ({plan.train_images} training images, [captions.json](data/captions.json),
[chat.json](data/chat.json); held-out [data/heldout/](data/heldout/), {plan.heldout_per_skill} per skill;
[playground.json](data/playground.json)). Logs: [logs/](logs/). Model sizes:

{sizes_table(shapes)}
## Try it

```bash
{chr(10).join(line.strip() for line in (next_steps or [])[1:6])}
```

{" ".join((next_steps or [])[6:])}

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
