"""Record sources: LLaVA JSON / JSONL, HF datasets on disk and parquet with embedded images, YAML mixtures (seeded
subsets identical across ranks and resumes), brace lists, and the dataset presets resolved from local folders or
downloaded through huggingface_hub (mocked here: tests stay offline)."""

from __future__ import annotations

import io
import json
import pickle
import zipfile

import datasets
import huggingface_hub
import pytest
from PIL import Image
from test_data_common import record, tiny_settings, tiny_tokenizer, write_image

from mlcd_vl.data.dataset import SupervisedDataset
from mlcd_vl.data.config import DataConfig
from mlcd_vl.data.samples import Sample
from mlcd_vl.data.sources import open_source, sample_indices

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tiny"))


def _png_bytes(size, seed) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (seed * 40 % 256, 90, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def _hf_dataset():
    features = datasets.Features({
        "id": datasets.Value("string"),
        "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
        "data_source": datasets.Value("string"),
        "image": datasets.Image(),
    })
    rows = [record(f"hf{i}", "<image>\nWhat is shown?", f"Picture {i}.") for i in range(3)]
    rows.append(record("hf_text", "Say hi.", "Hi."))
    images = [{"bytes": _png_bytes((60 + 10 * i, 50), i), "path": None} for i in range(3)] + [None]
    return datasets.Dataset.from_dict({
        "id": [r["id"] for r in rows], "conversations": [r["conversations"] for r in rows],
        "data_source": ["synthetic"] * 4, "image": images}, features=features)


def _build_all(source, tokenizer):
    dataset = SupervisedDataset(source, tokenizer, tiny_settings(), DataConfig())
    return [dataset[i] for i in range(len(dataset))]


def test_json_and_jsonl_with_image_folder(tokenizer, tmp_path):
    write_image(tmp_path / "a.png", (64, 48))
    rows = [record("one", "<image>\nQ?", "A.", image="a.png"), record("text", "Q?", "A."),
            record("multi", "<image> <image>", "Two.", image=["a.png", "a.png"])]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("d.json", "d.jsonl"):
        source = open_source(str(tmp_path / name), str(tmp_path))
        samples = _build_all(source, tokenizer)
        assert [s.record_id for s in samples] == ["one", "text", "multi"]
        assert [len(s.images) for s in samples] == [1, 0, 2]
        assert pickle.loads(pickle.dumps(source))[2].record == rows[2]


def test_dataset_pickles_small_and_loads_tokenizer_lazily(tokenizer, tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([record("one", "Q?", "A.")]))
    dataset = SupervisedDataset(open_source(str(tmp_path / "d.json")), tokenizer.name_or_path, tiny_settings(),
                                DataConfig())
    copy = pickle.loads(pickle.dumps(dataset))  # what a DataLoader worker receives
    assert copy._builder is None and isinstance(copy[0], Sample)
    assert copy.tokenizer.convert_tokens_to_ids("<image>") == tokenizer.convert_tokens_to_ids("<image>")
    assert copy[0].input_ids.tolist() == SupervisedDataset(dataset.records, tokenizer, tiny_settings(),
                                                           DataConfig())[0].input_ids.tolist()


def test_hf_dataset_on_disk_and_parquet_with_embedded_images(tokenizer, tmp_path):
    dataset = _hf_dataset()
    dataset.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "pq").mkdir()
    dataset.to_parquet(str(tmp_path / "pq" / "train-00000-of-00001.parquet"))
    for spec in (tmp_path / "saved", tmp_path / "pq", tmp_path / "pq" / "train-00000-of-00001.parquet"):
        samples = _build_all(open_source(str(spec)), tokenizer)
        assert all(isinstance(s, Sample) for s in samples), samples
        assert [s.record_id for s in samples] == ["hf0", "hf1", "hf2", "hf_text"]
        assert [s.images[0].size for s in samples[:3]] == [(60, 50), (70, 50), (80, 50)]
        assert samples[3].images == []


def _mixture(tmp_path, strategies):
    for name in ("a", "b"):
        rows = [record(f"{name}{i}", "Q?", f"A {i}.") for i in range(20)]
        (tmp_path / f"{name}.json").write_text(json.dumps(rows))
    lines = ["datasets:"] + [f"  - json_path: {path}\n    sampling_strategy: {strategy}"
                             for path, strategy in strategies]
    (tmp_path / "mix.yaml").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "mix.yaml")


def _ids(source):
    return [source[i].record["id"] for i in range(len(source))]


def test_yaml_mixture_strategies(tmp_path):
    spec = _mixture(tmp_path, [("a.json", "first:3"), ("b.json", "end:2"), ("a.json", "random:4"),
                               ("b.json", "random:25%"), ("a.json", "all")])
    ids = _ids(open_source(spec, seed=1))
    assert ids[:3] == ["a0", "a1", "a2"] and ids[3:5] == ["b18", "b19"]
    assert len(ids) == 3 + 2 + 4 + 5 + 20
    assert sample_indices("random:12.5%", 20, 0, "k").size == 3  # ceil(2.5)
    with pytest.raises(ValueError, match="sampling_strategy"):
        sample_indices("sometimes:3", 20, 0, "k")


def test_mixture_identical_across_ranks_and_resume(tmp_path):
    spec = _mixture(tmp_path, [("a.json", "random:5"), ("b.json", "random:30%")])
    rank0, rank1 = _ids(open_source(spec, seed=7)), _ids(open_source(spec, seed=7))
    resumed = _ids(pickle.loads(pickle.dumps(open_source(spec, seed=7))))
    assert rank0 == rank1 == resumed
    others = {tuple(_ids(open_source(spec, seed=s))) for s in range(8, 12)}
    assert len(others | {tuple(rank0)}) > 1  # the seed matters


def test_brace_list(tmp_path):
    _mixture(tmp_path, [])
    ids = _ids(open_source(str(tmp_path / "{a,b}.json")))
    assert len(ids) == 40 and ids[0] == "a0" and ids[20] == "b0"


def test_presets_from_local_folders(tokenizer, tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise AssertionError("a local preset folder must not be downloaded")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    pretrain = tmp_path / "LLaVA-Pretrain"
    pretrain.mkdir()
    write_image(tmp_path / "cap.png", (90, 70))
    with zipfile.ZipFile(pretrain / "images.zip", "w") as archive:
        archive.write(tmp_path / "cap.png", "00000/000000001.png")
    rows = [record("000000001", "Describe the image briefly.\n<image>", "A red box.", image="00000/000000001.png")]
    (pretrain / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(rows))
    for name in ("lcs-558k", "liuhaotian/LLaVA-Pretrain"):
        source = open_source(name, preset_dir=str(pretrain))
        assert (pretrain / "images" / "00000" / "000000001.png").is_file()
        dataset = SupervisedDataset(source, tokenizer, tiny_settings("square", "plain"), DataConfig())
        assert isinstance(dataset[0], Sample) and dataset[0].images[0].size == (90, 70)
    next_data = tmp_path / "LLaVA-NeXT-Data"
    (next_data / "data").mkdir(parents=True)
    _hf_dataset().to_parquet(str(next_data / "data" / "train-00000-of-00001.parquet"))
    assert _ids(open_source("lmms-lab/LLaVA-NeXT-Data", preset_dir=str(next_data)))[-1] == "hf_text"


def test_preset_downloads_on_demand(tmp_path, monkeypatch):
    calls = []

    def fake_snapshot(repo_id, repo_type, allow_patterns, local_dir=None):
        calls.append((repo_id, repo_type, tuple(allow_patterns)))
        folder = tmp_path / "snapshot"
        (folder / "data").mkdir(parents=True)
        _hf_dataset().to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert len(open_source("llava-next-780k")) == 4
    assert calls == [("lmms-lab/LLaVA-NeXT-Data", "dataset", ("data/*.parquet",))]
