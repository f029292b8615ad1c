"""The stages of `mlcd-vl demo` that run real code paths: training through the recipe launchers, lmms-eval on the
held-out sets, and a chat through `serve.Engine`.

Training and evaluation run as child processes (as a GPU run would launch them), their whole output kept in a log
in the run folder; the console shows training's own lines and, of lmms-eval's, only its progress bar (its INFO
chatter and its own results table stay in the log: the demo prints its table). `demo.run` sequences the stages.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPES = Path(__file__).resolve().parent / "recipes"
LMMS_TASK_PREFIX = "mlcd_demo_"


def child_env(threads: int) -> dict:
    """The environment of every child process: offline, `threads` OpenMP threads, this checkout importable."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning threads make tiny ops 5x slower.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    path = env.get("PYTHONPATH", "")
    if (REPO / "mlcd_vl").is_dir() and str(REPO) not in path.split(os.pathsep):
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + path if path else "")
    return env


def run_logged(command: list[str], env: dict, log: Path, cwd: Path | None = None,
               show: Callable[[bytes], bool] | None = None) -> None:
    """Run a stage in a child process: all its output goes to `log`; to the console all of it, or with `show` only
    the lines (and progress-bar updates, which end in a carriage return) it accepts. A failure names the log."""
    print("$ " + " ".join(str(c) for c in command), flush=True)
    console, pending, open_bar = sys.stdout.buffer, b"", False
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert process.stdout is not None
        while chunk := process.stdout.read1(4096):
            sink.write(chunk)
            if show is None:
                console.write(chunk)
            else:
                *pieces, pending = re.split(rb"(?<=[\r\n])", pending + chunk)
                for piece in pieces:
                    text = piece.rstrip(b"\r\n")
                    if text and show(text):
                        ending = b"\n" if piece.endswith(b"\n") else b""
                        console.write(b"\r" + text + ending)
                        open_bar = not ending
            console.flush()
        code = process.wait()
    if open_bar:
        console.write(b"\n")
        console.flush()
    if code != 0:
        raise RuntimeError(f"{command[2] if len(command) > 2 else command[0]} failed with exit status {code} "
                           f"(log: {log})")


def launch_training(stage: int, recipe: Path, overrides: list[str], launcher: str, env: dict, log: Path,
                    num_gpus: int = 1) -> None:
    """One training stage through the recipe code path a GPU run uses: `scripts/pretrain.sh` (stage 1) or
    `scripts/finetune.sh` (stage 2) with NUM_GPUS and RECIPE (launcher "scripts"), or `python -m mlcd_vl.train`
    (launcher "module", one process: an installed package has no scripts/)."""
    script = REPO / "scripts" / ("pretrain.sh" if stage == 1 else "finetune.sh")
    if launcher == "scripts":
        if not script.is_file():
            raise RuntimeError(f"--launcher scripts: {script} not found (an installed package has no scripts/)")
        command = ["bash", str(script), *overrides]
        env = dict(env, NUM_GPUS=str(num_gpus), RECIPE=str(recipe), PYTHON=sys.executable)
        if "MASTER_PORT" not in os.environ and int(env.get("NNODES", "1")) == 1:
            import socket

            with socket.socket() as probe:  # a free rendezvous port: other runs may hold torchrun's default
                probe.bind(("127.0.0.1", 0))
                env["MASTER_PORT"] = str(probe.getsockname()[1])
    else:
        command = [sys.executable, "-m", "mlcd_vl.train", str(recipe), *overrides]
    run_logged(command, env, log, cwd=REPO if launcher == "scripts" else None)


def default_launcher(launcher: str) -> str:
    """`auto` -> "scripts" in a repository checkout (scripts/pretrain.sh and finetune.sh present), else "module"."""
    if launcher != "auto":
        return launcher
    have_scripts = all((REPO / "scripts" / name).is_file() for name in ("pretrain.sh", "finetune.sh"))
    return "scripts" if have_scripts else "module"


def train_stage(stage: int, workdir: Path, overrides: list[str], launcher: str, env: dict) -> Path:
    """One training stage of the demo with its recipe (`recipes/demo_stage<N>.yaml`); returns its output folder."""
    out = workdir / f"stage{stage}"
    launch_training(stage, RECIPES / f"demo_stage{stage}.yaml", [*overrides, f"output_dir={out}"], launcher, env,
                    workdir / "logs" / f"stage{stage}.log")
    print(f"(on GPUs: NUM_GPUS=8 RECIPE=configs/recipes/mlcd_bigG448_stage{stage}.yaml "
          f"scripts/{'pretrain.sh' if stage == 1 else 'finetune.sh'} data.train=... runs the same code)")
    return out


DEMO_METRICS = ("relaxed_overall", "relaxed_human_split")  # every held-out item is a "human_test" one


def write_tasks(heldout: dict[str, Path], out: Path) -> list[str]:
    """One lmms-eval task per skill: ChartQA's settings (prompt, generation, relaxed accuracy) over its parquet,
    without ChartQA's augmented-split metric, which the demo's data never produces."""
    from mlcd_vl.eval.tasks import Benchmark, task_yaml

    out.mkdir(parents=True, exist_ok=True)
    names = []
    for skill, path in heldout.items():
        name = f"{LMMS_TASK_PREFIX}{skill}"
        benchmark = Benchmark(f"demo {skill}", "chartqa", name, "chartqa", "test", "relaxed_overall", 100, "%",
                              0)
        (out / f"{name}.yaml").write_text(task_yaml(benchmark, [str(path.resolve())], metrics=DEMO_METRICS))
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
    print(f"(lmms-eval's own log: {workdir / 'logs' / 'eval.log'})", flush=True)
    run_logged(command, env, workdir / "logs" / "eval.log", show=lambda text: text.startswith(b"Model Responding"))
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

    from mlcd_vl.demo.playground import QUESTIONS, SHORT
    from mlcd_vl.serve.engine import Engine
    from mlcd_vl.serve.requests import GenerationSettings, Request

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
