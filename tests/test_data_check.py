"""`mlcd-vl data check` on a mixed good/bad JSONL dataset: every planted problem is reported by record id, the
statistics count the usable records, the PNG histogram and JSON report are written, and the exit code says so."""

from __future__ import annotations

import argparse
import json

from test_data_common import record, write_image

from mlcd_vl.data import check


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    check.configure_parser(parser)
    return check.run(parser.parse_args(argv))


def _write_dataset(root):
    write_image(root / "good.png", (90, 60))
    write_image(root / "wide.png", (300, 80), seed=1)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = [record(f"good{i}", "<image>\nWhat colour?", f"Colour {i}.", image="good.png") for i in range(5)]
    good += [record("good_text", "Name a colour.", "Blue."),
             record("good_multi", "<image> and <image>?", "Both.", image=["good.png", "wide.png"])]
    planted = {
        "lost": ("image_missing", record("lost", "<image>\nQ?", "A.", image="lost.png")),
        "broken": ("image_unreadable", record("broken", "<image>\nQ?", "A.", image="broken.png")),
        "counts": ("image_count_mismatch", record("counts", "<image><image>\nQ?", "A.", image="good.png")),
        "robot": ("bad_conversation", {"id": "robot", "conversations": [{"from": "robot", "value": "beep"}]}),
        "long_question": ("no_supervised_tokens", record("long_question", "colour " * 200, "A.")),
        "late_image": ("truncation_cuts_image", record("late_image", "colour " * 100, "Ok.", "<image>\nAnd?", "B.",
                                                       image="wide.png")),
    }
    lines = [json.dumps(r) for r in good + [data for _, data in planted.values()]] + ["{not json"]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return good, planted


def test_data_check_reports_every_planted_problem(tmp_path):
    good, planted = _write_dataset(tmp_path)
    out = tmp_path / "report"
    code = _run(["check", str(tmp_path / "data.jsonl"), "--tiny", "--tiny-dir", str(tmp_path / "tiny"),
                 "--image-folder", str(tmp_path), "--max-length", "150", "--workers", "2", "--out", str(out)])
    assert code == 1
    report = json.loads((out / "report.json").read_text())
    found = {p["id"]: p["problem"] for p in report["problems"]}
    for record_id, (problem, _) in planted.items():
        assert found.get(record_id) == problem, (record_id, found)
    assert any(p["problem"] == "bad_record" and "line" in p["id"] for p in report["problems"])
    assert report["skipped"]["total"] == len(planted) + 1
    assert report["usable"] == len(good) and report["records"] == len(good) + len(planted) + 1
    assert report["modalities"] == {"image": len(good) - 1, "text": 1}
    assert report["visual_tokens_per_image"]["count"] == len(good)  # 5 single, 1 text-only, 1 with two images
    assert report["sequence_tokens"]["max"] <= 150
    assert (out / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_data_check_clean_dataset_exits_zero(tmp_path, capsys):
    write_image(tmp_path / "good.png", (90, 60))
    rows = [record(f"r{i}", "<image>\nWhat?", "Red.", image="good.png") for i in range(3)]
    (tmp_path / "clean.json").write_text(json.dumps(rows))
    code = _run(["check", str(tmp_path / "clean.json"), "--tiny", "--tiny-dir", str(tmp_path / "tiny"),
                 "--image-folder", str(tmp_path), "--image-mode", "square", "--template", "plain",
                 "--out", str(tmp_path / "out")])
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["template"] == "plain" and report["visual_tokens_per_image"]["max"] == 16
    assert "problems: none" in capsys.readouterr().out
