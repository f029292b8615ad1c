"""The launcher scripts on CPU and a training run that is killed and resumed.

* `scripts/pretrain.sh` / `scripts/finetune.sh` run unchanged with NUM_GPUS=1 and a tiny RECIPE (torchrun with one
  gloo process), print the effective global batch, and pass overrides through; a recipe whose
  `batch.global_batch_size` does not fit the launch stops before torchrun.
* Kill and resume: a run is SIGKILLed once a checkpoint exists, started again with the same command
  (`resume: latest`), and ends with the weights of an uninterrupted run. A `checkpoint-N.tmp` folder (a crash in
  the middle of a save) is never resumed from.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import train_helpers as H
from safetensors.torch import load_file

from mlcd_vl.train import checkpointing, optim

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return H.write_dataset(tmp_path_factory.mktemp("launch"))


def script(name: str, data: dict, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(H.REPO / "scripts" / name), *args], env=H.env_for(data, **env), cwd=H.REPO,
                          capture_output=True, text=True, timeout=240, check=False)


def test_pretrain_then_finetune_scripts_on_cpu(data):
    stage1, stage2 = data["root"] / "script-stage1", data["root"] / "script-stage2"
    done = script("pretrain.sh", data, f"data.train={data['captions']}", f"data.image_folder={data['images']}",
                  f"output_dir={stage1}", "optim.max_steps=2", NUM_GPUS="1", MASTER_PORT="29531",
                  RECIPE="configs/recipes/tiny_stage1.yaml")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "effective global batch 8 = 4 per device x 1 process(es) x 2 accumulation step(s)" in done.stdout
    assert done.stdout.count("global batch") == 1, done.stdout  # once per stage: the run says it, not the script
    assert "Setting accelerator to CPU" not in done.stdout + done.stderr  # DeepSpeed's notice, when it is unused
    assert [r["step"] for r in H.metrics(stage1)] == [1, 2]
    assert (stage1 / optim.PROJECTOR_FILE).is_file()

    done = script("finetune.sh", data, f"data.train={data['chat']}", f"data.image_folder={data['images']}",
                  f"output_dir={stage2}", f"model.init_from={stage1}", "optim.max_steps=1",
                  "batch.per_device_batch_size=1", NUM_GPUS="1", MASTER_PORT="29532",
                  RECIPE="configs/recipes/tiny_stage2.yaml")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "effective global batch 2 = 1 per device x 1 process(es) x 2 accumulation step(s)" in done.stdout
    assert (stage2 / "model.safetensors").is_file()


def test_scripts_default_to_the_mlcd_recipes_and_check_the_global_batch(data):
    """The bigG-448 recipes expect global batch 128 = 16 x 8 x 1 (stage 1) and 2 x 8 x 8 (stage 2): with one GPU
    the launch stops with the config's message before torchrun starts (nothing is downloaded). With 8 GPUs the batch
    fits; offline, the launch check then stops at the hub model that is not cached, in one line."""
    local = ["model.llm=tiny", "model.tower=tiny", "model.init_from=null", f"data.train={data['captions']}",
             f"data.image_folder={data['images']}"]  # the same recipes with inputs that exist here
    for name, recipe in (("pretrain.sh", "mlcd_bigG448_stage1.yaml"), ("finetune.sh", "mlcd_bigG448_stage2.yaml")):
        done = script(name, data, NUM_GPUS="1")
        assert done.returncode == 2 and "batch.global_batch_size" in done.stderr, done.stderr[-2000:]
        for overrides, code in (([], 1), (local, 0)):
            done = subprocess.run([sys.executable, "-m", "mlcd_vl.train.launch", str(H.RECIPES / recipe),
                                   "--world-size", "8", *overrides], capture_output=True, text=True, cwd=H.REPO,
                                  env=H.env_for(data, HF_HUB_CACHE=str(data["root"] / "empty-hub-cache")),
                                  timeout=60, check=False)
            assert done.returncode == code, done.stderr[-2000:]
            if code:
                assert done.stderr == ("mlcd-vl train: error: model.llm: Qwen/Qwen2.5-7B-Instruct is not in the local "
                                       "Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it (unset "
                                       "HF_HUB_OFFLINE, or give a local folder)\n")
            else:
                assert "effective global batch 128" in done.stdout


def _start(data, out: Path) -> subprocess.Popen:
    overrides = [f"data.train={data['captions']}", f"data.image_folder={data['images']}", f"output_dir={out}",
                 "batch.per_device_batch_size=1", "batch.grad_accum=1", "optim.lr=1e-2", "optim.max_steps=25",
                 "save_steps=5", "save_total_limit=2"]
    return subprocess.Popen(H.train_command("tiny_stage1.yaml", overrides), env=H.env_for(data), cwd=H.REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_killed_run_resumes_to_the_same_weights(data):
    full_dir, killed_dir = data["root"] / "uninterrupted", data["root"] / "killed"
    full = _start(data, full_dir)  # the reference runs alongside (one thread each)
    victim = _start(data, killed_dir)
    deadline = time.monotonic() + 180
    while not checkpointing.checkpoints(killed_dir):
        assert victim.poll() is None, victim.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert not (killed_dir / "model.safetensors").exists()  # it died before the end
    at_kill = checkpointing.checkpoints(killed_dir)[-1]
    # a save that crashed halfway: newer than every real checkpoint, never picked
    (killed_dir / "checkpoint-999.tmp").mkdir()
    (killed_dir / "checkpoint-999.tmp" / checkpointing.STATE_FILE).write_text("{}")
    assert checkpointing.find_resume("latest", killed_dir) == checkpointing.checkpoints(killed_dir)[-1]

    resumed = _start(data, killed_dir)  # same command: resume latest
    assert resumed.wait(timeout=240) == 0, resumed.stderr.read()[-3000:]
    assert full.wait(timeout=240) == 0, full.stderr.read()[-3000:]
    steps = [r["step"] for r in H.metrics(killed_dir)]
    assert steps == list(range(1, 26)), steps  # the lines up to the checkpoint kept, the rest written again
    assert int(at_kill.name.split("-")[1]) >= 5
    expected = load_file(str(full_dir / optim.PROJECTOR_FILE))
    actual = load_file(str(killed_dir / optim.PROJECTOR_FILE))
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, rtol=0, atol=1e-7, msg=key)
