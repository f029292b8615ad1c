"""The CPU demo: the playground generator (formats, determinism, a held-out split unseen in training) and a
shortened `mlcd-vl demo --quick` run end to end (data -> tiny model -> stage 1 -> stage 2 -> lmms-eval -> chat)
that must learn: held-out colour accuracy well above chance."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlcd_vl.demo.playground import ANSWERS, SKILLS, chance, write_playground

REPO = Path(__file__).resolve().parents[1]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in (".png", ".json", ".txt")}


def test_playground_is_deterministic_in_the_real_formats_with_an_unseen_heldout_split(tmp_path):
    from PIL import Image

    first = write_playground(tmp_path / "a", train_images=60, heldout_per_skill=5, seed=3)
    second = write_playground(tmp_path / "b", train_images=60, heldout_per_skill=5, seed=3)
    assert _digest(first.root) == _digest(second.root)
    other = write_playground(tmp_path / "c", train_images=60, heldout_per_skill=5, seed=4)
    assert _digest(other.root) != _digest(first.root)

    captions, chat = json.loads(first.captions.read_text()), json.loads(first.chat.read_text())
    assert len(captions) == len(chat) == 60
    for record in captions:  # stage 1: image + caption, plain template
        assert (first.images / record["image"]).is_file()
        assert [t["from"] for t in record["conversations"]] == ["human", "gpt"]
        assert record["conversations"][0]["value"] == "<image>"
    turns = [len(r["conversations"]) // 2 for r in chat]
    assert min(turns) == 1 and max(turns) >= 2  # single and multi-turn
    for record in chat:
        values = [t["value"] for t in record["conversations"]]
        assert values[0].startswith("<image>\n") and sum(v.count("<image>") for v in values) == 1

    import pyarrow.parquet as pq

    held = json.loads(first.heldout_json.read_text())
    train_pixels = {hashlib.sha1(Image.open(first.images / r["image"]).tobytes()).hexdigest() for r in captions}
    assert set(first.heldout) == set(SKILLS)
    for skill, path in first.heldout.items():
        table = pq.read_table(path)
        assert table.column_names == ["type", "question", "answer", "image"] and table.num_rows == 5
        assert set(table.column("answer").to_pylist()) <= set(ANSWERS[skill])
        assert 0 < chance(skill) < 0.5
    for record in held:
        assert hashlib.sha1(Image.open(first.images / record["image"]).tobytes()).hexdigest() not in train_pixels
    assert not {r["image"] for r in held} & {r["image"] for r in captions}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_demo_trains_evaluates_and_chats(tmp_path):
    workdir = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    done = subprocess.run([sys.executable, "-m", "mlcd_vl.cli", "demo", "--quick", "--workdir", str(workdir)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=880, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = done.stdout
    for banner in ("synthetic data", "stage 1", "stage 2", "lmms-eval", "chat about a held-out image"):
        assert banner in out, banner
    assert "| skill | held-out accuracy | chance |" in out and "assistant:" in out
    # quiet logs: lmms-eval's INFO lines and its own table stay in its log; DeepSpeed's CPU notice is gone; the batch
    # is said once per stage; every step line fits 100 columns
    assert "INFO" not in out and "|Tasks|" not in out.replace(" ", "") and "Setting accelerator" not in out
    assert "|Tasks|" in (workdir / "logs" / "eval.log").read_text().replace(" ", "")
    assert out.count("effective global batch") == 2
    steps = [line for line in out.replace("\r", "\n").splitlines() if line.startswith("step ")]
    assert steps and max(map(len, steps)) <= 100
    # what to do next: the exact commands, and they work (ask answers the taught question about a held-out picture)
    tail = out[out.rindex("Try the trained model"):]
    ask = next(line for line in tail.splitlines() if " ask --model " in line)
    assert "--model demo/stage2 --image demo/data/images/heldout/colour_" in ask  # relative to where it ran
    for command in (" chat --model ", " web --model ", " serve --model "):
        assert command in tail, command
    from mlcd_vl.assets import DEMO_IMAGE, DEMO_QUESTION

    # the held-out picture the block names, and the web demo's bundled example: a colour word each
    for image in (ask.split("--image ")[1].split()[0], str(DEMO_IMAGE)):
        answered = subprocess.run([sys.executable, "-m", "mlcd_vl.cli", "ask", "--model", str(workdir / "stage2"),
                                   "--image", image, DEMO_QUESTION], cwd=tmp_path, env=env, capture_output=True,
                                  text=True, timeout=300, check=False)
        assert answered.returncode == 0 and answered.stdout.strip() in ANSWERS["colour"], answered
    summary = subprocess.run([sys.executable, "-m", "mlcd_vl.cli", "eval", "summarize", str(workdir / "eval"),
                              "--require", ",".join(f"mlcd_demo_{skill}" for skill in SKILLS)],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert summary.returncode == 0, summary.stderr
    assert "| mlcd_demo_colour | relaxed_overall |" in summary.stdout

    results = json.loads((workdir / "results.json").read_text())
    scores = results["scores"]
    assert set(scores) == set(SKILLS)
    assert all(s["n"] == results["plan"]["heldout_per_skill"] for s in scores.values())
    # it learns: colour (6 answers, chance 16.7%) far above chance on images it never saw
    assert scores["colour"]["accuracy"] >= chance("colour") + 0.3, scores

    for stage in ("stage1", "stage2"):
        folder = workdir / stage
        for name in ("train_config.yaml", "loss_curve.png", "metrics.jsonl", "config.json", "model.safetensors"):
            assert (folder / name).is_file(), (stage, name)
    assert (workdir / "stage1" / "projector.safetensors").is_file()
    losses = [json.loads(line)["loss"] for line in (workdir / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] / 2
    assert sorted((workdir / "eval").rglob("*_results.json"))
    report = (workdir / "report.md").read_text()
    for link in ("stage1/loss_curve.png", "stage2/loss_curve.png", "stage2/train_config.yaml", "_results.json"):
        assert link in report, link


def test_demo_tasks_keep_only_the_metrics_their_data_produces(tmp_path):
    """Every held-out item is a ChartQA "human_test" item: the augmented-split metric would never get a value, so
    the demo's tasks leave it out (and `eval summarize --require` can pass on them)."""
    import yaml

    from mlcd_vl.demo.stages import DEMO_METRICS, write_tasks

    (tmp_path / "colour.parquet").write_bytes(b"")
    (name,) = write_tasks({"colour": tmp_path / "colour.parquet"}, tmp_path / "tasks")
    text = (tmp_path / "tasks" / f"{name}.yaml").read_text().replace("!function", "")
    metrics = [entry["metric"] for entry in yaml.safe_load(text)["metric_list"]]
    assert metrics == list(DEMO_METRICS) == ["relaxed_overall", "relaxed_human_split"]


def test_web_example_is_a_picture_and_question_the_demo_model_was_taught():
    """The web demo's bundled example comes from the demo's distribution: one large shape of one colour on a playground
    background (a size `shape_item` draws), asked in the taught form (question + ChartQA's short-answer line)."""
    from PIL import Image

    from mlcd_vl.assets import DEMO_ANSWER, DEMO_IMAGE, DEMO_QUESTION, draw_demo_image
    from mlcd_vl.demo.playground import BACKGROUNDS, COLOURS, QUESTIONS, SHORT

    image = Image.open(DEMO_IMAGE).convert("RGB")
    assert image.tobytes() == draw_demo_image().tobytes()
    assert image.size in {(112, 112), (112, 84), (84, 112), (96, 96)}
    assert {colour for _, colour in image.getcolors()} == {BACKGROUNDS[0], COLOURS[DEMO_ANSWER]}
    assert image.getpixel((image.width // 2, image.height // 2)) == COLOURS[DEMO_ANSWER]
    assert DEMO_QUESTION == QUESTIONS["colour"] + SHORT


def test_a_stage_log_keeps_everything_while_the_console_shows_what_is_asked(tmp_path, capsysbinary):
    from mlcd_vl.demo.stages import run_logged

    script = ("import sys\n"
              "print('INFO lmms_eval chatter', flush=True)\n"
              "for n in (0, 50, 100):\n"
              "    sys.stderr.write(f'\\rModel Responding: {n}%'); sys.stderr.flush()\n"
              "sys.stderr.write('\\n')\n"
              "print('|Tasks|Metric|Value|')\n")
    (tmp_path / "stage.py").write_text(script)
    log = tmp_path / "stage.log"
    run_logged([sys.executable, str(tmp_path / "stage.py")], dict(os.environ), log,
               show=lambda text: text.startswith(b"Model Responding"))
    console = capsysbinary.readouterr().out
    assert b"chatter" not in console and b"|Tasks|" not in console
    assert b"\rModel Responding: 0%\rModel Responding: 50%\rModel Responding: 100%\n" in console
    assert b"chatter" in log.read_bytes() and b"|Tasks|" in log.read_bytes()
