"""The data manifest: written by `data manifest`, verified by `data check --manifest` on the same data (exit 0, also
when the data was copied elsewhere), and every kind of change named (a changed file, a changed record count, a
changed mixture draw, a changed image folder, changed image contents with --deep), exit 1. The draws it records are
the ones the run reads; training writes it into the run folder and its hash into the saved config."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
from test_data_common import record, write_image

from mlcd_vl.data import check
from mlcd_vl.data.manifest import Manifest, build_manifest, diff
from mlcd_vl.data.samples import record_id_of
from mlcd_vl.data.sources import open_source


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    check.configure_parser(parser)
    return check.run(parser.parse_args(argv))


def _write_data(root):
    (root / "images").mkdir(parents=True)
    for name, size in (("a.png", (40, 30)), ("b.png", (30, 40))):
        write_image(root / "images" / name, size)
    for name in ("alpha", "beta"):
        rows = [record(f"{name}{i}", "<image>\nQ?", f"A {i}.", image="a.png" if i % 2 else "b.png")
                for i in range(20)]
        (root / f"{name}.json").write_text(json.dumps(rows))
    (root / "mix.yaml").write_text("datasets:\n"
                                   "  - json_path: alpha.json\n    sampling_strategy: random:5\n"
                                   "  - json_path: beta.json\n    sampling_strategy: first:3\n"
                                   "  - json_path: alpha.json\n    sampling_strategy: random:25%\n")
    return root / "mix.yaml"


@pytest.fixture
def data(tmp_path):
    return _write_data(tmp_path / "data")


def _manifest(spec, seed=7, deep=False, image_folder=None):
    folder = image_folder or str(spec.parent / "images")
    return build_manifest(str(spec), folder, seed=seed, deep=deep)


def test_manifest_records_the_draws_the_run_reads(data):
    manifest = _manifest(data)
    records = open_source(str(data), str(data.parent / "images"), seed=7)
    read = [record_id_of(records[i]) for i in range(len(records))]
    assert [i for entry in manifest.entries for i in entry.ids] == read
    assert [(e.strategy, e.count) for e in manifest.entries] == [("random:5", 5), ("first:3", 3), ("random:25%", 5)]
    assert [s.name for s in manifest.sources] == ["alpha.json", "beta.json"]  # alpha counted once
    assert manifest.sources[0].records == 20 and len(manifest.sources[0].sha256) == 64
    assert manifest.seed == 7 and manifest.image_folders[0].files == 2
    assert _manifest(data, seed=8).hash != manifest.hash  # another seed draws other records


def test_manifest_round_trip_and_copy_elsewhere(data, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert _cli(["manifest", str(data), "--image-folder", str(data.parent / "images"), "--seed", "7",
                 "--out", str(out)]) == 0
    saved = Manifest.load(out)
    assert saved.hash == _manifest(data).hash == json.loads(out.read_text())["hash"]
    assert _cli(["check", "--manifest", str(out)]) == 0  # data and image folder as recorded
    assert "data matches manifest" in capsys.readouterr().out
    copy = shutil.copytree(data.parent, tmp_path / "elsewhere")  # "another machine": other paths, same data
    assert _cli(["check", str(copy / "mix.yaml"), "--manifest", str(out), "--image-folder",
                 str(copy / "images")]) == 0
    assert _manifest(copy / "mix.yaml", deep=True).hash == saved.hash  # --deep adds, but does not change the hash


def test_changed_file_is_named(data, tmp_path, capsys):
    out = tmp_path / "m.json"
    _cli(["manifest", str(data), "--image-folder", str(data.parent / "images"), "--seed", "7", "--out", str(out)])
    rows = json.loads((data.parent / "beta.json").read_text())
    rows[10]["conversations"][1]["value"] = "A changed answer."  # not among the drawn records (first:3)
    (data.parent / "beta.json").write_text(json.dumps(rows))
    assert _cli(["check", "--manifest", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "source 1 (beta.json): file changed" in printed
    assert "mixture draw" not in printed and "record count" not in printed


def test_changed_mixture_draw_and_record_count_are_named(data):
    before = _manifest(data)
    mix = data.read_text().replace("random:25%", "end:5")
    data.write_text(mix)
    strategy, draw = diff(before, _manifest(data))
    assert strategy == "mixture entry 2 (alpha.json, random:25%): strategy random:25% -> end:5"
    assert draw.startswith("mixture entry 2 (alpha.json, random:25%): mixture draw changed: ")
    rows = json.loads((data.parent / "alpha.json").read_text())
    (data.parent / "alpha.json").write_text(json.dumps(rows + [record("alpha20", "Q?", "A.")]))
    lines = diff(before, _manifest(data))
    assert "source 0 (alpha.json): record count 20 -> 21" in lines
    assert any(line.startswith("mixture entry 0 (alpha.json, random:5): mixture draw changed: ") for line in lines)
    data.write_text(data.read_text().replace("end:5", "random:25%"))
    (data.parent / "alpha.json").write_text(json.dumps(rows))
    assert diff(before, _manifest(data)) == []  # back as it was
    reseeded = diff(before, _manifest(data, seed=8))
    assert reseeded and all("mixture draw changed" in line and line.endswith("(seed 7 -> 8)") for line in reseeded)


def test_changed_image_folder_is_named_and_deep_sees_contents(data):
    before, before_deep = _manifest(data), _manifest(data, deep=True)
    images = data.parent / "images"
    original = (images / "a.png").read_bytes()
    flipped = bytes([original[0]]) + bytes([original[1] ^ 1]) + original[2:]  # same name and size
    (images / "a.png").write_bytes(flipped)
    assert diff(before, _manifest(data)) == []  # names and sizes unchanged: only --deep can see it
    lines = diff(before_deep, _manifest(data, deep=True))
    assert len(lines) == 1 and "image contents changed" in lines[0]
    write_image(images / "c.png", (10, 10))
    lines = diff(before, _manifest(data))
    assert len(lines) == 1 and "image folder changed: 2 -> 3 files" in lines[0]


def test_edited_manifest_is_refused(data, tmp_path):
    path = _manifest(data).save(tmp_path / "m.json")
    content = json.loads(path.read_text())
    content["entries"][0]["ids"][0] = "someone-else"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="edited"):
        Manifest.load(path)


def test_plain_file_and_brace_list(tmp_path):
    root = tmp_path / "d"
    _write_data(root)
    single = build_manifest(str(root / "alpha.json"))
    assert [(e.strategy, e.count) for e in single.entries] == [("all", 20)] and single.image_folders == []
    both = build_manifest(str(root / "{alpha,beta}.json"))
    assert [s.name for s in both.sources] == ["alpha.json", "beta.json"]
    assert both.entries[1].ids[0] == "beta0"


def test_training_writes_the_manifest_and_its_hash(tmp_path, capsys):
    import train_helpers as H

    from mlcd_vl.train.config import load_config
    from mlcd_vl.train.run import MANIFEST_FILE, train

    paths = H.write_dataset(tmp_path / "ws")
    with H.in_process_training(paths["tiny"]):
        runs = []
        for name in ("first", "again"):
            config = load_config(H.RECIPES / "tiny_stage1.yaml", [
                f"data.train={paths['captions']}", f"data.image_folder={paths['images']}",
                f"output_dir={tmp_path / name}", "optim.max_steps=1", "batch.per_device_batch_size=2",
                "batch.grad_accum=1"])
            runs.append(train(config))
    printed = capsys.readouterr().out
    expected = build_manifest(paths["captions"], paths["images"], seed=42)
    for result in runs:
        written = Manifest.load(result.output_dir / MANIFEST_FILE)
        saved = json.loads((result.output_dir / "config.json").read_text())["mlcd_vl"]
        assert written.hash == saved["data_manifest"] == expected.hash
    assert "length table scanned" in printed and "length table read from the cache" in printed
