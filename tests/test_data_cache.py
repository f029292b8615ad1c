"""Data that starts once: lazily parsed JSON / JSONL records (same ids, order, content and load problems as reading
the whole file), their byte-offset index and the length table cached on disk and rebuilt exactly when an input
changes (counted in scanned records), one builder among concurrent processes, and training's restart reading the
table back without a scan."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_data_check import _write_dataset
from test_data_common import five_pinpoints, record, tiny_settings, tiny_tokenizer, write_image

from mlcd_vl.data import json_index, startup
from mlcd_vl.data.dataset import SupervisedDataset, scan
from mlcd_vl.data.problems import DataError, Problem, ProblemLog
from mlcd_vl.data.config import DataConfig
from mlcd_vl.data.sources import JsonRecords, open_source


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tiny"))


def _eager(path):
    """What the reader did before the index: the whole file parsed at once (JSON list, else one record per line)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl" and text.lstrip().startswith("["):
        return json.loads(text), []
    records, bad = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                bad.append((f"{path.name}:line {number}", f"malformed JSON ({error.msg})"))
    return records, bad


def _data_files(root):
    """The data-check test's mixed JSONL (planted bad records and a malformed line) and JSON arrays of it."""
    root.mkdir(parents=True, exist_ok=True)
    _write_dataset(root)
    good = [json.loads(line) for line in (root / "data.jsonl").read_text().splitlines() if line.startswith("{\"")]
    (root / "compact.json").write_text(json.dumps(good))
    (root / "pretty.json").write_text(json.dumps(good, indent=2, ensure_ascii=False) + "\n")
    (root / "unicode.jsonl").write_text("\n".join(json.dumps(record(f"u{i}", "Ça va ✓ " * i, "Très bien."),
                                                             ensure_ascii=False) for i in range(30)) + "\n\n")
    return [root / name for name in ("data.jsonl", "compact.json", "pretty.json", "unicode.jsonl")]


@pytest.mark.parametrize("cached", [False, True])
def test_lazy_records_equal_the_whole_file_read(tmp_path, cached):
    cache_dir = tmp_path / "cache" if cached else None
    malformed = {}
    for path in _data_files(tmp_path / "data"):
        expected, bad = _eager(path)
        malformed[path.name] = len(bad)
        for _ in range(2):  # the second open reads the cached index
            source = JsonRecords(path, str(path.parent), cache_dir=cache_dir)
            assert [source.record(i) for i in range(len(source))] == expected, path.name
            assert [(p.record_id, p.detail) for p in source.load_problems] == bad
            assert all(p.problem == Problem.BAD_RECORD for p in source.load_problems)
            copy = pickle.loads(pickle.dumps(source))  # what a DataLoader / scan worker receives
            assert [copy[i].record for i in range(len(copy))] == expected
    assert malformed == {"data.jsonl": 1, "compact.json": 0, "pretty.json": 0, "unicode.jsonl": 0}


def test_small_window_json_array(tmp_path, monkeypatch):
    monkeypatch.setattr(json_index, "WINDOW", 256)  # many window refills and drops, elements across boundaries
    path = _data_files(tmp_path)[2]
    source = JsonRecords(path)
    assert [source.record(i) for i in range(len(source))] == _eager(path)[0]


@pytest.mark.parametrize("text, message", [("[{\"id\": 1}, {\"id\": 2}", "not closed"),
                                           ("[{\"id\": 1} {\"id\": 2}]", "expected ','"),
                                           ("[{\"id\": 1},]", "Expecting value"),
                                           ("[{\"id\": 1}] []", "extra data")])
def test_malformed_json_list_names_the_byte(tmp_path, text, message):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(ValueError, match=f"bad.json: malformed JSON list at byte \\d+: .*{message}"):
        JsonRecords(tmp_path / "bad.json")


def test_strict_mode_raises_on_a_malformed_line(tmp_path, tokenizer):
    _write_dataset(tmp_path)
    line = (tmp_path / "data.jsonl").read_text().splitlines().index("{not json") + 1
    config = DataConfig(train=str(tmp_path / "data.jsonl"), image_folder=str(tmp_path), strict=True)
    with pytest.raises(DataError, match=f"line {line}.*malformed JSON"):
        SupervisedDataset.from_config(config, tokenizer, tiny_settings())


def test_index_is_built_once_and_again_when_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(record(f"r{i}", "Q?", "A.")) for i in range(5)))
    builds = []
    original = json_index.build_index
    monkeypatch.setattr(json_index, "build_index", lambda p: builds.append(p) or original(p))
    for _ in range(3):
        assert len(JsonRecords(path, cache_dir=tmp_path / "cache")) == 5
    assert len(builds) == 1
    with path.open("a") as handle:
        handle.write("\n" + json.dumps(record("r5", "Q?", "A.")))
    assert len(JsonRecords(path, cache_dir=tmp_path / "cache")) == 6 and len(builds) == 2


_BUILDER = """
import sys, time
from pathlib import Path
from mlcd_vl.data.cache import build_once

entry, log = Path(sys.argv[1]), Path(sys.argv[2])

def build(folder):
    with open(log, "a") as handle:
        handle.write("built\\n")
    time.sleep(1.0)  # long enough for the others to find the lock taken
    (folder / "value.txt").write_text("42")

build_once(entry, build)
assert (entry / "value.txt").read_text() == "42"
"""


def test_concurrent_processes_build_an_entry_once(tmp_path):
    entry, log = tmp_path / "cache" / "entry", tmp_path / "builds.log"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    processes = [subprocess.Popen([sys.executable, "-c", _BUILDER, str(entry), str(log)], env=env)
                 for _ in range(3)]
    assert [process.wait(120) for process in processes] == [0, 0, 0]
    assert log.read_text() == "built\n" and sorted(p.name for p in entry.parent.iterdir()) == ["entry", "entry.lock"]


# ----------------------------------------------------------------------------------------------------------------
# The length table cache
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def counted(monkeypatch):
    """How many records the scan measured (workers=0: measured in this process)."""
    calls = []
    original = SupervisedDataset.measure
    monkeypatch.setattr(SupervisedDataset, "measure", lambda self, i, **kw: calls.append(i) or original(self, i, **kw))
    return calls


def _scan_data(root):
    root.mkdir(parents=True, exist_ok=True)
    write_image(root / "wide.png", (150, 50))
    write_image(root / "tall.png", (50, 150))
    rows = [record(f"r{i}", "<image>\nWhat is it?", "A shape. " * (i + 1), image="wide.png" if i % 2 else "tall.png")
            for i in range(6)] + [record("text", "Hi?", "Hello."), {"id": "robot", "conversations": []}]
    (root / "d.json").write_text(json.dumps(rows))
    return root / "d.json"


def _start(path, tokenizer, settings, cache_dir, **config):
    config = DataConfig(train=str(path), image_folder=str(path.parent), cache_dir=str(cache_dir), **config)
    log = ProblemLog(log_first=0)
    return startup.prepare(SupervisedDataset.from_config(config, tokenizer, settings), 0, log=log), log


def test_length_table_is_reused_and_equals_a_fresh_scan(tmp_path, tokenizer, counted):
    path = _scan_data(tmp_path / "data")
    first, log = _start(path, tokenizer, tiny_settings(), tmp_path / "cache")
    assert first.scanned and len(counted) == 8
    again, again_log = _start(path, tokenizer, tiny_settings(), tmp_path / "cache")
    assert not again.scanned and len(counted) == 8  # nothing changed: no record scanned
    fresh = scan(SupervisedDataset(open_source(str(path), str(path.parent)), tokenizer, tiny_settings(), DataConfig()))
    for table in (first.table, again.table):
        assert np.array_equal(table.lengths, fresh.lengths) and np.array_equal(table.has_image, fresh.has_image)
        assert table.skipped == fresh.skipped and table.skipped[0].problem == Problem.BAD_CONVERSATION
    assert again_log.to_dict() == log.to_dict() and log.total == 1  # the cached skips are reported again
    assert again.manifest.hash == first.manifest.hash


def test_each_changed_input_rescans(tmp_path, tokenizer, counted):
    path = _scan_data(tmp_path / "data")
    cache_dir = tmp_path / "cache"

    def rescans(settings=None, tok=None, **config) -> bool:
        before = len(counted)
        start, _ = _start(path, tok or tokenizer, settings or tiny_settings(), cache_dir, **config)
        assert start.scanned == (len(counted) > before)
        return start.scanned

    assert rescans()
    assert not rescans()
    assert rescans(tiny_settings(template="plain"))  # another template (through the model's settings)
    assert rescans(tiny_settings(pinpoints=five_pinpoints()[:3]))
    assert rescans(tiny_settings(image_mode="square"))
    assert rescans(max_length=64)
    assert rescans(label_mode="upstream")
    other = tiny_tokenizer(tmp_path / "other-tiny")
    other.add_tokens(["<extra>"])
    assert rescans(tok=other)
    rows = json.loads(path.read_text())
    rows[0]["conversations"][1]["value"] = "Another answer."
    path.write_text(json.dumps(rows))
    assert rescans()
    write_image(path.parent / "wide.png", (300, 50))  # a different image (size) under the same name
    assert rescans()
    assert not rescans()
