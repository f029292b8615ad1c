"""One rule for where a model comes from (`model.sources`): a path that does not exist is answered at once and never
looked up on the hub; a hub id passes through, except offline when it is not cached; `convert` takes hub ids."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mlcd_vl import cli
from mlcd_vl.errors import UsageError, UserError
from mlcd_vl.model import sources
from mlcd_vl.train.config import load_config
from mlcd_vl.train.inputs import check_inputs

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = REPO_ROOT / "configs" / "recipes"


@pytest.fixture
def no_hub(monkeypatch):
    """Any hub lookup fails the test; the process is online (HF_HUB_OFFLINE unset) so nothing else stops one."""
    import huggingface_hub
    from huggingface_hub import constants

    def looked_up(*args, **kwargs):
        raise AssertionError(f"hub lookup for {args} {kwargs}")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", looked_up)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A working directory with a `runs/` folder, as after a first training run."""
    (tmp_path / "runs" / "stage1").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("value", ["runs/stage2", "./model", "../model", "/no/such/model", "~/no-such-model-mlcd",
                                   "a/b/c", "bare-name", "C:\\models\\x"])
def test_a_missing_path_is_answered_at_once(workdir, no_hub, value):
    with pytest.raises(UsageError, match=f"^--model: no such folder: {re.escape(value)}$") as raised:
        sources.model_source(value, "--model")
    assert raised.value.exit_code == 2


def test_existing_paths_and_hub_ids_pass_through(workdir, no_hub):
    assert sources.model_source("runs/stage1") == "runs/stage1"
    assert sources.model_source(Path("~").expanduser()) == str(Path("~").expanduser())
    assert sources.model_source("DeepGlint-AI/llava-mlcd-qwen2.5-7b") == "DeepGlint-AI/llava-mlcd-qwen2.5-7b"
    assert not sources.looks_like_path("Qwen/Qwen2.5-7B-Instruct")
    assert sources.looks_like_path("runs/stage9")  # its first component exists here


def _fake_cache(cache: Path, repo_id: str, files_from: Path | None = None) -> Path:
    """The Hugging Face cache layout for `repo_id` at one revision (refs/main -> snapshots/<commit>)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    if files_from is not None:
        shutil.copytree(files_from, snapshot)
    else:
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    return snapshot


def test_offline_hub_ids_must_be_cached(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = _fake_cache(tmp_path / "hub", "someone/cached")
    assert sources.model_source("someone/cached") == "someone/cached"
    assert sources.local_folder("someone/cached") == snapshot
    with pytest.raises(UserError, match="someone/missing is not in the local Hugging Face cache, and "
                                        "HF_HUB_OFFLINE=1") as raised:
        sources.model_source("someone/missing", "model.llm")
    assert raised.value.exit_code == 1 and not isinstance(raised.value, UsageError)


@pytest.mark.parametrize("override, message", [
    ("model.llm=./no-llm", "model.llm: no such folder: ./no-llm"),
    ("model.tower=runs/no-tower", "model.tower: no such folder: runs/no-tower"),
    ("model.init_from=runs/no-stage1", "model.init_from: no such file or folder: runs/no-stage1"),
    ("model.checkpoint=/no/checkpoint", "model.checkpoint: no such folder: /no/checkpoint"),
])
def test_recipe_model_keys_follow_the_rule(workdir, no_hub, override, message):
    data = workdir / "data.json"
    data.write_text("[]")
    extra = ["model.init_from=null"] if override.startswith("model.checkpoint") else []
    config = load_config(RECIPES / "tiny_stage2.yaml", [f"data.train={data}", "data.image_folder=null", *extra,
                                                         override])
    with pytest.raises(UsageError, match=f"^{message}$"):
        check_inputs(config)


def test_recipe_data_is_checked_with_a_hint_for_the_tiny_recipes(workdir, no_hub):
    config = load_config(RECIPES / "tiny_stage1.yaml")  # reads playground/tiny/data, not written here
    with pytest.raises(UsageError, match=r"data.train: data file not found: playground/tiny/data/captions.json "
                                         r"\(the tiny recipes' data: write it with `python -m mlcd_vl.demo.playground"):
        check_inputs(config)
    (workdir / "data.json").write_text("[]")
    config = load_config(RECIPES / "tiny_stage1.yaml", ["data.train=data.json", "data.image_folder=no-images"])
    with pytest.raises(UsageError, match="^data.image_folder: no such folder: no-images$"):
        check_inputs(config)


def test_commands_answer_a_mistyped_model_folder_in_one_line(workdir, no_hub, capsys):
    for argv in (["ask", "--model", "runs/stage2", "q"], ["chat", "--model", "runs/stage2"],
                 ["web", "--model", "runs/stage2"], ["serve", "--model", "runs/stage2"],
                 ["data", "check", "x.json", "--model", "runs/stage2"]):
        assert cli.main(argv) == 2, argv
        assert capsys.readouterr().err == f"mlcd-vl {argv[0]}: error: --model: no such folder: runs/stage2\n"
    assert cli.main(["convert", "runs/stage2", "out"]) == 2
    assert capsys.readouterr().err == "mlcd-vl convert: error: SRC: no such folder: runs/stage2\n"


def test_ask_with_a_mistyped_folder_never_reaches_the_network(tmp_path):
    """As a user would run it, online with an unreachable hub: no retries, no 'check your internet connection'."""
    (tmp_path / "runs").mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0",
               HF_ENDPOINT="http://127.0.0.1:9")
    done = subprocess.run([sys.executable, "-m", "mlcd_vl.cli", "ask", "--model", "runs/stage2", "Hello?"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (2, "mlcd-vl ask: error: --model: no such folder: runs/stage2\n")


def test_convert_takes_a_hub_id_and_reads_the_offline_cache(tiny_vlm_dir, tmp_path):
    from mlcd_vl.model.convert import convert

    upstream = convert(tiny_vlm_dir, tmp_path / "upstream", log=lambda message: None)
    _fake_cache(tmp_path / "hub", "someone/tiny-llava", files_from=upstream)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))

    def mlcd_vl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mlcd_vl.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    done = mlcd_vl("convert", "someone/tiny-llava", "from-hub")
    assert done.returncode == 0, done.stderr[-3000:]
    direct = convert(upstream, tmp_path / "direct", log=lambda message: None)
    expected, actual = load_file(str(direct / "model.safetensors")), load_file(str(tmp_path / "from-hub" /
                                                                                    "model.safetensors"))
    assert expected.keys() == actual.keys() and all(actual[k].equal(v) for k, v in expected.items())
    done = mlcd_vl("convert", "someone/not-cached", "nothing")
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "someone/not-cached is not in the local Hugging Face cache" in done.stderr
