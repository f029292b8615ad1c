"""`mlcd-vl chat` in a subprocess fed from a pipe: multi-turn history, images attached on several turns, /reset,
/exit, flags; its answers equal the engine's for the same conversations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from mlcd_vl import cli
from mlcd_vl.assets import DEMO_IMAGE
from mlcd_vl.serve.cli_chat import Conversation
from mlcd_vl.serve.engine import Engine
from mlcd_vl.serve.requests import GenerationSettings, Request




@pytest.fixture(scope="module")
def model_dir(tiny_vlm_dir) -> Path:
    return tiny_vlm_dir


def run_chat(model_dir: Path, script: str, *flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.run([sys.executable, "-m", "mlcd_vl.serve.cli_chat", "--model", str(model_dir), *flags],
                          input=script.encode(), capture_output=True, env=env, timeout=300)


def test_conversation_keeps_images_in_order():
    conversation = Conversation(system="Be brief.")
    conversation.pending_images = [Path("a.png"), Path("b.png")]
    messages, images = conversation.with_question("Compare them.")
    assert messages[-1] == {"role": "user", "content": "<image>\n<image>\nCompare them."}
    conversation.commit(messages, images, "They differ.")
    assert conversation.pending_images == [] and conversation.images == [Path("a.png"), Path("b.png")]
    assert conversation.messages[0] == {"role": "system", "content": "Be brief."}
    conversation.pending_images = [Path("c.png")]
    assert conversation.with_question("Is <image> brighter?")[0][-1]["content"] == "Is <image> brighter?"
    conversation.reset()
    assert conversation.messages == [{"role": "system", "content": "Be brief."}] and conversation.images == []


def test_piped_chat_matches_the_engine(model_dir, tmp_path):
    tall = Image.new("RGB", (60, 150), "white")
    ImageDraw.Draw(tall).rectangle((10, 20, 50, 120), fill=(20, 160, 40))
    tall_path = tmp_path / "tall.png"
    tall.save(tall_path)
    script = (f"/image {DEMO_IMAGE}\nWhat shapes are there?\n"
              f"/image {tmp_path / 'missing.png'}\n"
              f"/image {tall_path}\nAnd in this one?\n"
              "/bogus\n/reset\nHello again\n/exit\nnever asked\n")
    done = run_chat(model_dir, script, "--temperature", "0", "--top-p", "0.9", "--max-new-tokens", "10")
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    assert "missing.png" in stderr and "not found" in stderr  # a bad path is reported, the chat goes on
    assert "unknown command /bogus" in stderr and "[conversation reset]" in stderr

    engine = Engine.from_pretrained(model_dir, device="cpu")
    settings = GenerationSettings(max_new_tokens=10, temperature=0, top_p=0.9)
    first = [{"role": "user", "content": "<image>\nWhat shapes are there?"}]
    answer1 = engine.generate([Request(first, [DEMO_IMAGE])], settings)[0].text
    second = first + [{"role": "assistant", "content": answer1},
                      {"role": "user", "content": "<image>\nAnd in this one?"}]
    answer2 = engine.generate([Request(second, [DEMO_IMAGE, tall_path])], settings)[0].text
    answer3 = engine.generate([Request([{"role": "user", "content": "Hello again"}])], settings)[0].text
    assert done.stdout.decode() == f"{answer1}\n{answer2}\n{answer3}\n"


def test_bad_model_folder_fails_cleanly(tmp_path, capsys):
    assert cli.main(["chat", "--model", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err == f"mlcd-vl chat: error: --model: no such folder: {tmp_path / 'nothing'}\n"
