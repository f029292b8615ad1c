"""Shared by the training tests that launch runs: a tiny LLaVA-JSON dataset and subprocess launches.

The dataset: one-colour images of different sizes with captions (stage 1, plain template) and colour questions
(stage 2), plus text-only records. Launches run `python -m mlcd_vl.train` (or torchrun / a launcher script) with
one torch thread per process and the tiny preset written once into a shared folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "configs" / "recipes"
DEEPSPEED = REPO / "configs" / "deepspeed"
TINY_DIR_ENV = "MLCD_VL_TINY_DIR"
COLOURS = {"red": ((220, 30, 30), (56, 56)), "green": ((30, 200, 40), (112, 56)),
           "blue": ((30, 40, 220), (56, 112)), "yellow": ((230, 220, 30), (84, 70))}


def write_dataset(root: Path) -> dict:
    """Images and three JSON files under root: captions (4 image records), chat (4 image + 1 text-only) and
    mixed (3 image records, then 1 text-only: with 2 ranks x 1 x 2 accumulation its one step puts an image on
    one rank and the text-only record on the other in the same micro-step)."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    captions, chat = [], []
    for name, (rgb, size) in COLOURS.items():
        Image.new("RGB", size, rgb).save(images / f"{name}.png")
        captions.append({"id": f"cap-{name}", "image": f"{name}.png", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"A {name} square."}]})
        chat.append({"id": f"qa-{name}", "image": f"{name}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the picture?"},
            {"from": "gpt", "value": f"It is {name}."}]})
    text = {"id": "text-only", "conversations": [{"from": "human", "value": "How many bars are there?"},
                                                 {"from": "gpt", "value": "There are two bars."}]}
    files = {"captions": captions, "chat": chat + [text], "mixed": chat[:3] + [text]}
    paths = {"root": root, "images": str(images), "tiny": str(root / "tiny")}
    for name, records in files.items():
        (root / f"{name}.json").write_text(json.dumps(records))
        paths[name] = str(root / f"{name}.json")
    return paths


@contextlib.contextmanager
def in_process_training(tiny_dir: str):
    """For runs inside the test process: the shared tiny preset folder and one torch thread, restored after."""
    previous_env, previous_threads = os.environ.get(TINY_DIR_ENV), torch.get_num_threads()
    os.environ[TINY_DIR_ENV] = tiny_dir
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        if previous_env is None:
            os.environ.pop(TINY_DIR_ENV, None)
        else:
            os.environ[TINY_DIR_ENV] = previous_env


def env_for(data: dict, **extra: str) -> dict:
    """The environment of a launched run: one thread, offline, the shared tiny preset."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO), **{TINY_DIR_ENV: data["tiny"]})
    env.update(extra)
    return env


def train_command(recipe: str, overrides: list[str], processes: int = 1, port: int | None = None) -> list[str]:
    """`python -m mlcd_vl.train` for one process, torchrun (gloo on CPU) for several."""
    if processes == 1:
        return [sys.executable, "-m", "mlcd_vl.train", str(RECIPES / recipe), *overrides]
    rendezvous = ["--standalone"] if port is None else ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, "--nproc_per_node", str(processes),
            "-m", "mlcd_vl.train", str(RECIPES / recipe), *overrides]


def launch(command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run to completion; a run that hangs (e.g. a ZeRO-3 collective deadlock) fails at `timeout` seconds."""
    try:
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as error:
        out = (error.stdout or b"")[-3000:]
        raise AssertionError(f"run did not finish in {timeout} s (hang?): {' '.join(command)}\n{out!r}") from None
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


# ---- one process vs DeepSpeed on two: the tiny stage-2 recipe, 3 steps of global batch 4 both ways

FIRST_LAUNCH_TIMEOUT, LAUNCH_TIMEOUT = 480, 240  # the first DeepSpeed launch may JIT-build the shm op


def comparison_overrides(data: dict, out: Path, *extra: str) -> list[str]:
    """The settings every single-vs-ZeRO comparison shares (the mixed data: one micro-step puts an image on one
    rank and a text-only record on the other); `extra` adds the learning rates and anything else."""
    return [f"data.train={data['mixed']}", f"data.image_folder={data['images']}", f"output_dir={out}",
            "model.init_from=null", "optim.max_steps=3", "optim.warmup_ratio=0", "batch.grad_accum=2", *extra]


def run_single(data: dict, overrides: list[str], timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """The one-process reference: 2 per device x 2 accumulation."""
    command = train_command("tiny_stage2.yaml", [*overrides, "batch.per_device_batch_size=2"])
    return launch(command, env_for(data), timeout)


def run_zero(data: dict, config: str, overrides: list[str],
             timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """DeepSpeed `config` (a file of configs/deepspeed) on 2 processes: 1 per device x 2 ranks x 2 accumulation."""
    command = train_command("tiny_stage2.yaml", [*overrides, "batch.per_device_batch_size=1",
                                                 f"deepspeed={DEEPSPEED / config}"], processes=2)
    return launch(command, env_for(data), timeout)


def free_port() -> int:
    """A TCP port free on the loopback now (the OS picks it; never a fixed number)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_two_nodes(data: dict, config: str, overrides: list[str], timeout: float = LAUNCH_TIMEOUT,
                  **env: str) -> None:
    """`scripts/finetune.sh` started twice on this machine as two nodes of one process each (NNODES=2, NODE_RANK 0
    and 1, MASTER_ADDR=127.0.0.1, a free port): the same run as `run_zero`'s one node with two processes. `env` adds
    e.g. HOSTFILE and NO_SSH (the DeepSpeed launcher instead of torchrun)."""
    command = ["bash", str(REPO / "scripts" / "finetune.sh"), *overrides, "batch.per_device_batch_size=1",
               f"deepspeed={DEEPSPEED / config}"]
    node_env = {"RECIPE": str(RECIPES / "tiny_stage2.yaml"), "NNODES": "2", "NUM_GPUS": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **env}
    nodes = [subprocess.Popen(command, env=env_for(data, NODE_RANK=str(rank), **node_env), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=timeout)[0] for node in nodes]
    except subprocess.TimeoutExpired:
        for node in nodes:
            node.kill()
        raise AssertionError(f"two-node run did not finish in {timeout} s (hang?): {' '.join(command)}") from None
    for rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank}: {' '.join(command)}\n{output[-4000:]}"


def assert_same_steps(single: Path, other: Path) -> None:
    """Two runs' logged steps agree: loss and grad norm (rel 1e-4), learning rate; and the run trains."""
    import pytest

    reference, run = metrics(single), metrics(other)
    assert [r["step"] for r in run] == [1, 2, 3]
    for a, b in zip(reference, run):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["lr"] == pytest.approx(a["lr"])
    assert run[-1]["loss"] < run[0]["loss"]  # it trains (the LR schedule is stepped under DeepSpeed)
