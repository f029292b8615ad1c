"""The `mlcd-vl` command: help, demo, build and ask (subprocesses with the venv's python, plus in-process errors)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlcd_vl import cli
from mlcd_vl.assets import DEMO_IMAGE
from mlcd_vl.model import build_command
from mlcd_vl.serve import ask

REPO_ROOT = Path(__file__).resolve().parents[1]


def mlcd_vl(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "mlcd_vl.cli", *args], cwd=REPO_ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


def parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.configure_parser(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """`mlcd-vl build --tiny OUT` (in process: the subprocess tests cover the command line itself)."""
    out = tmp_path_factory.mktemp("cli") / "tiny-vlm"
    argv = ["--tiny", "--image-mode", "anyres", "--merge", "spatial_unpad", str(out)]
    assert build_command.run(parse(build_command, argv)) == 0
    return out


def test_build_tiny_prints_a_summary(tiny_model, capsys):
    from mlcd_vl.model.checkpoint import read_settings

    settings = read_settings(tiny_model)
    assert (settings.image_mode, settings.merge_type, settings.llm) == ("anyres", "spatial_unpad", "tiny")
    assert len(settings.pinpoints) == 5
    out = tiny_model.parent / "square"
    assert build_command.run(parse(build_command, ["--tiny", "--image-mode", "square", "--merge", "flat",
                                                   "--template", "plain", str(out)])) == 0
    assert "LlavaForConditionalGeneration" in capsys.readouterr().out
    assert read_settings(out).template == "plain"


def test_help_lists_every_command():
    done = mlcd_vl("--help")
    assert done.returncode == 0, done.stderr
    for name in cli.COMMANDS:
        assert name in done.stdout


def test_demo_help_names_its_options():
    """The demo itself (it trains for minutes) runs in tests/test_demo.py."""
    done = mlcd_vl("demo", "--help")
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout and "--workdir" in done.stdout and "runs/demo" in done.stdout


def test_ask_on_a_built_tiny_model(tiny_model):
    assert (tiny_model / "config.json").is_file() and (tiny_model / "model.safetensors").is_file()
    done = mlcd_vl("ask", "--model", str(tiny_model), "--image", str(DEMO_IMAGE), "--max-new-tokens", "8",
                   "--usage", "What colour is the circle?")
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("\n")
    assert "prompt tokens" in done.stderr and "Traceback" not in done.stderr


def test_ask_in_process_matches_the_engine(tiny_model, capsys):
    from mlcd_vl.serve.engine import Engine
    from mlcd_vl.serve.requests import GenerationSettings, Request

    argv = ["--model", str(tiny_model), "--image", str(DEMO_IMAGE), "--image", str(DEMO_IMAGE),
            "--max-new-tokens", "6", "Compare the pictures."]
    assert ask.run(parse(ask, argv)) == 0
    printed = capsys.readouterr().out
    engine = Engine.from_pretrained(tiny_model)
    expected = engine.generate([Request([{"role": "user", "content": "Compare the pictures."}],
                                        [str(DEMO_IMAGE)] * 2)], GenerationSettings(max_new_tokens=6))[0]
    assert printed == expected.text + "\n"
    assert ask.run(parse(ask, argv + ["--stream"])) == 0
    assert capsys.readouterr().out == printed


def test_ask_reports_missing_inputs(tiny_model, tmp_path, capsys):
    assert cli.main(["ask", "--model", str(tiny_model), "--image", str(tmp_path / "nope.png"), "q"]) == 2
    assert "nope.png" in capsys.readouterr().err
    assert cli.main(["ask", "--model", str(tmp_path), "q"]) == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [
    (["--tower", "mlcd-vit-huge"], "mlcd-vit-huge"),
    (["--llm", "qwen-9000"], "qwen-9000"),
    (["--tower", "/no/such/tower"], "/no/such/tower"),
    (["--tower", "./missing-tower"], "./missing-tower"),
    (["--image-mode", "tiles"], "tiles"),
    (["--pinpoints", "[(448,"], "[(448,"),
    (["--tower", "some/local-like", "--llm", "qwen2.5-7b-instruct", "--template", "vicuna"], "vicuna"),
])
def test_build_errors_name_the_value(tmp_path, capsys, argv, named):
    code = cli.main(["build", *argv, str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_build_refuses_to_overwrite(tiny_model, capsys):
    assert cli.main(["build", "--tiny", str(tiny_model)]) == 2
    assert "--force" in capsys.readouterr().err
