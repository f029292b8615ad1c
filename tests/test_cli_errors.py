"""The CLI's manners: a user's mistake is one line on stderr with exit 2 (usage) or 1 (failure), never a traceback,
unless `--debug` / MLCD_VL_DEBUG=1 asks for it; a launch with a missing input stops before anything is written; and
building the parser (so `--help`) imports neither torch nor transformers, for every subcommand."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlcd_vl import cli
from mlcd_vl.errors import UsageError, UserError, run_reporting

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(REPO_ROOT / "configs" / "recipes" / "tiny_stage1.yaml")


def run(args: list[str], cwd: Path = REPO_ROOT, **env: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env)
    if "MLCD_VL_DEBUG" not in env:
        environment.pop("MLCD_VL_DEBUG", None)
    return subprocess.run(args, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


def mlcd_vl(*args: str, **env: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "mlcd_vl.cli", *args], **env)


def one_line(stderr: str, prefix: str) -> str:
    assert "Traceback" not in stderr and stderr.count("\n") == 1 and stderr.startswith(prefix), stderr[-3000:]
    return stderr


# ------------------------------------------------------------------------------------------ reporting, exit codes


def test_run_reporting_turns_user_errors_into_one_line_and_keeps_bugs_loud(capsys, monkeypatch):
    monkeypatch.delenv("MLCD_VL_DEBUG", raising=False)

    def fail(error: Exception):
        def command():
            raise error
        return command

    assert run_reporting("mlcd-vl x", fail(UsageError("bad --flag"))) == 2
    assert capsys.readouterr().err == "mlcd-vl x: error: bad --flag\n"
    assert run_reporting("mlcd-vl x", fail(UserError("port busy"))) == 1
    assert capsys.readouterr().err == "mlcd-vl x: error: port busy\n"
    assert run_reporting("mlcd-vl x", lambda: None) == 0
    with pytest.raises(RuntimeError):  # a bug is not a user error: its traceback stays
        run_reporting("mlcd-vl x", fail(RuntimeError("bug")))
    with pytest.raises(UsageError):
        run_reporting("mlcd-vl x", fail(UsageError("bad")), debug=True)
    monkeypatch.setenv("MLCD_VL_DEBUG", "1")
    with pytest.raises(UsageError):
        run_reporting("mlcd-vl x", fail(UsageError("bad")))


def test_train_with_a_bad_config_key_is_one_line_and_debug_shows_the_traceback():
    done = mlcd_vl("train", RECIPE, "optim.nope=1")
    assert done.returncode == 2
    assert "unknown config key 'optim.nope'" in one_line(done.stderr, "mlcd-vl train: error: ")
    for debugged in (mlcd_vl("--debug", "train", RECIPE, "optim.nope=1"), mlcd_vl("train", "--debug", RECIPE,
                     "optim.nope=1"), mlcd_vl("train", RECIPE, "optim.nope=1", MLCD_VL_DEBUG="1")):
        assert debugged.returncode == 1 and "Traceback" in debugged.stderr and "ConfigError" in debugged.stderr
    # the process torchrun starts reports the same way
    child = run([sys.executable, "-m", "mlcd_vl.train", RECIPE, "optim.nope=1"])
    assert child.returncode == 2 and "unknown config key" in one_line(child.stderr, "mlcd-vl train: error: ")


def test_missing_training_data_stops_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    done = mlcd_vl("train", RECIPE, f"data.train={tmp_path / 'missing.json'}", f"output_dir={out}")
    assert done.returncode == 2
    assert f"data.train: data file not found: {tmp_path / 'missing.json'}" in one_line(done.stderr, "mlcd-vl train")
    assert not out.exists()


def test_the_launch_script_stops_a_missing_input_before_torchrun(tmp_path):
    out = tmp_path / "run"
    done = run(["bash", "scripts/pretrain.sh", f"data.train={tmp_path / 'missing.json'}", f"output_dir={out}"],
               NUM_GPUS="1", RECIPE="configs/recipes/tiny_stage1.yaml", MLCD_VL_VENV=sys.prefix)
    assert done.returncode == 2 and not out.exists()
    assert "data file not found" in one_line(done.stderr, "mlcd-vl train: error: ")
    assert "[launch] writing" not in done.stdout  # data.train was overridden: no playground data needed


def test_web_on_a_busy_port_names_our_option(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = mlcd_vl("web", "--model", str(tmp_path), "--port", str(port))
    assert done.returncode == 1
    line = one_line(done.stderr, "mlcd-vl web: error: ")
    assert f"cannot serve on 127.0.0.1:{port}: the port is in use (choose another --port)" in line
    assert "GRADIO" not in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_a_cuda_device_without_a_gpu_is_one_line(tiny_vlm_dir, capsys):
    assert cli.main(["ask", "--model", str(tiny_vlm_dir), "--device", "cuda", "What colour?"]) == 2
    assert capsys.readouterr().err.startswith("mlcd-vl ask: error: --device cuda: torch sees no CUDA GPU")
    assert cli.main(["ask", "--model", str(tiny_vlm_dir), "--device", "gpu0", "What colour?"]) == 2
    assert "--device gpu0: not a device" in capsys.readouterr().err


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an MPS device")
def test_a_device_this_torch_cannot_use_is_one_line():
    from mlcd_vl.errors import UsageError
    from mlcd_vl.serve.engine import resolve_device

    with pytest.raises(UsageError, match=r"^--device mps: this torch build or this machine has no mps device"):
        resolve_device("mps")
    assert resolve_device("cpu") == torch.device("cpu")


# ------------------------------------------------------------------------------------------------------ fast CLI


def _imports_after(code: str) -> dict:
    probe = (f"import json, sys\nfrom mlcd_vl import cli\n{code}\n"
             "print(json.dumps(sorted(m for m in ('torch', 'transformers') if m in sys.modules)))")
    done = run([sys.executable, "-c", probe])
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", [None, *cli.COMMANDS])
def test_help_imports_neither_torch_nor_transformers(command):
    argv = [command, "--help"] if command else ["--help"]
    code = f"try:\n    cli.main({argv!r})\nexcept SystemExit as done:\n    assert done.code == 0, done.code"
    assert _imports_after(code) == []


def test_the_whole_parser_imports_neither_torch_nor_transformers():
    assert _imports_after("cli.build_parser()") == []
