"""What `mlcd-vl demo` leaves behind: the per-stage wall clock, the results table, and `report.md`, `results.json`
and `results.md` in the run folder (linking the resolved configs, checkpoints, loss curves and lmms-eval results).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mlcd_vl.demo.plan import DemoPlan
from mlcd_vl.demo.playground import chance


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


def write_report(workdir: Path, mode: str, plan: DemoPlan, scores: dict, transcript, timer: Timer,
                 shapes, threads: int) -> Path:
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
