"""`mlcd-vl data check` on a mixed good/bad JSONL dataset: every planted problem is reported by record id (on the
console with its detail, and in report.json), the statistics count the usable records and print as a table, the PNG
histogram and JSON report are written, and the exit code says so. A forgotten --image-folder gets a hint."""

from __future__ import annotations

import argparse
import json

from test_data_common import record, write_image

from mlcd_vl.data import check
from mlcd_vl.data.dataset import LengthTable


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
        "blank": ("empty_answer", record("blank", "<image>\nQ?", "  ", image="good.png")),
        "dangling": ("ends_on_user_turn", record("dangling", "<image>\nQ?", "A.", "And?", image="good.png")),
        "good0": ("duplicate_record", dict(good[0])),
    }
    same_id_other_answer = record("good1", "<image>\nWhat colour?", "Another answer.", image="good.png")
    lines = [json.dumps(r) for r in good + [data for _, data in planted.values()] + [same_id_other_answer]]
    lines += ["{not json"]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return good, planted


def test_data_check_reports_every_planted_problem(tmp_path, capsys):
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
    usable = len(good) + 1  # the record that shares good1's id with another answer is a different sample: kept
    assert report["usable"] == usable and report["records"] == usable + len(planted) + 1
    assert report["modalities"] == {"image": usable - 1, "text": 1}
    assert report["visual_tokens_per_image"]["count"] == usable  # 6 single, 1 text-only, 1 with two images
    assert report["sequence_tokens"]["max"] <= 150
    assert report["shared_ids"] == {"count": 1, "records": 2, "examples": {"good1": 2}}
    assert (out / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = LengthTable.load(str(out / "lengths.npz"))  # the table `mlcd-vl plan --lengths` reads
    assert report["length_table"] == str(out / "lengths.npz")
    assert len(table.valid) == report["usable"] and table.lengths.max() == report["sequence_tokens"]["max"]
    assert int(table.has_image.sum()) == report["modalities"]["image"]
    assert int(table.supervised.sum()) == report["supervised_tokens"]["total"]

    console = capsys.readouterr().out
    for line in ("image_missing: 1 record(s)", f"  lost: {tmp_path / 'lost.png'}: image file not found",
                 "  blank: gpt turn 1 of 1 is empty or whitespace",
                 "  dangling: the last turn is a human turn without an answer",
                 "  good0: the same id and content as record data.jsonl#0, which is kept"):
        assert line in console.splitlines(), (line, console)
    assert "note: 1 id(s) are shared by 2 records" in console and "{'count'" not in console
    header = next(line for line in console.splitlines() if line.startswith("usable records"))
    assert header.split() == ["usable", "records", "count", "min", "p50", "mean", "p90", "p99", "max"]
    assert "hint:" not in console


def test_data_check_hints_at_a_forgotten_image_folder(tmp_path, capsys, monkeypatch):
    _write_dataset(tmp_path)
    monkeypatch.chdir(tmp_path / "..")
    code = _run(["check", str(tmp_path / "data.jsonl"), "--tiny", "--tiny-dir", str(tmp_path / "tiny"),
                 "--max-length", "150"])
    assert code == 1
    console = capsys.readouterr().out
    assert "hint: every image is missing and no --image-folder was given" in console
    assert (tmp_path / ".." / "runs" / "data-check" / "report.json").is_file()  # the default --out, git-ignored


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
