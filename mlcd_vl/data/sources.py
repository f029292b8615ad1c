"""Where records come from: LLaVA JSON / JSONL, Hugging Face datasets (on disk or parquet), YAML mixtures, presets.

Every source is a random-access sequence of `SourceRecord`s (the record dict, the image folder its relative paths
are resolved against, and where it came from). Sources are cheap to pickle into DataLoader workers: JSON / JSONL
files are memory-mapped and parsed record by record through a byte-offset index (`json_index`, cached on disk when
given a cache folder), Hugging Face datasets are memory-mapped Arrow tables.

`open_source(spec, ...)` accepts a file (`.json`, `.jsonl`, `.parquet`, `.yaml`), a brace list
(`/data/{a,b}.json`), a `datasets.save_to_disk` folder, or a preset name (`DATASET_PRESETS`: LCS-558K
`liuhaotian/LLaVA-Pretrain`, `lmms-lab/LLaVA-NeXT-Data`; downloaded on demand, or read from a local folder).
YAML mixtures follow upstream (`datasets: - json_path: X  sampling_strategy: all | first:N | end:N | random:N |
random:P%`), but `random` subsets are drawn from a generator seeded by (seed, entry), so every rank and every
resume draws the same records (upstream shuffled with the unseeded global `random`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlcd_vl.data.problems import DataFileNotFound, SkippedRecord


@dataclass(frozen=True)
class SourceRecord:
    record: dict
    image_folder: str | None
    origin: str  # "file.json#12": for messages when the record has no id


class RecordSource:
    """A random-access sequence of records."""

    image_folder: str | None = None
    name: str = ""
    load_problems: list[SkippedRecord]

    def __len__(self) -> int:
        raise NotImplementedError

    def record(self, index: int) -> dict:
        raise NotImplementedError

    def __getitem__(self, index: int) -> SourceRecord:
        return SourceRecord(self.record(index), self.image_folder, f"{self.name}#{index}")


class JsonRecords(RecordSource):
    """LLaVA records from a JSON list or a JSONL file, parsed lazily from the memory-mapped file (`json_index`).

    With `cache_dir` the byte-offset index is built once and shared through `<cache_dir>/records/`; without it the
    index is built in memory. Pickles small: the file and the index are mapped again in the receiving process.
    """

    def __init__(self, path: str | os.PathLike, image_folder: str | None = None,
                 cache_dir: str | os.PathLike | None = None):
        from mlcd_vl.data.json_index import cached_index

        self.path, self.name, self.image_folder = str(path), Path(path).name, image_folder
        self.paths = [self.path]
        self.index = cached_index(path, cache_dir)
        self.ranges, self.load_problems = self.index.ranges, self.index.problems
        self._bytes: np.ndarray | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_bytes"] = None  # mapped again on first access
        return state

    def __len__(self) -> int:
        return len(self.ranges)

    def record(self, index: int) -> dict:
        if self._bytes is None:
            empty = os.path.getsize(self.path) == 0
            self._bytes = np.zeros(0, np.uint8) if empty else np.memmap(self.path, dtype=np.uint8, mode="r")
        start, end = self.ranges[index]
        return json.loads(self._bytes[start:end].tobytes().decode("utf-8"))


class HFRecords(RecordSource):
    """A `datasets.Dataset` (LLaVA-NeXT-Data layout: id, conversations, data_source, image); images stay encoded."""

    def __init__(self, dataset, name: str, image_folder: str | None = None):
        from datasets import Image as ImageFeature

        if "image" in dataset.column_names and isinstance(dataset.features["image"], ImageFeature):
            dataset = dataset.cast_column("image", ImageFeature(decode=False))
        self.dataset, self.name, self.image_folder = dataset, name, image_folder
        self.load_problems = []
        self.paths: list[str] = []  # the files it was read from (for the data manifest)

    @classmethod
    def from_disk(cls, folder: str, image_folder: str | None = None) -> "HFRecords":
        from datasets import load_from_disk

        source = cls(load_from_disk(folder), Path(folder).name, image_folder)
        source.paths = [folder]
        return source

    @classmethod
    def from_parquet(cls, files: list[str], image_folder: str | None = None) -> "HFRecords":
        from datasets import Dataset

        dataset = Dataset.from_parquet(sorted(files) if len(files) > 1 else files[0])
        source = cls(dataset, Path(files[0]).parent.name if len(files) > 1 else Path(files[0]).name, image_folder)
        source.paths = sorted(files)
        return source

    def __len__(self) -> int:
        return len(self.dataset)

    def record(self, index: int) -> dict:
        return self.dataset[int(index)]


class SubsetRecords(RecordSource):
    """Selected indices of another source (a mixture entry, drawn by `strategy`)."""

    def __init__(self, source: RecordSource, indices: np.ndarray, image_folder: str | None = None,
                 strategy: str = ""):
        self.source, self.indices, self.strategy = source, np.asarray(indices, dtype=np.int64), strategy
        self.image_folder = image_folder if image_folder is not None else source.image_folder
        self.name, self.load_problems = source.name, source.load_problems

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> SourceRecord:
        inner = int(self.indices[index])
        return SourceRecord(self.source.record(inner), self.image_folder, f"{self.name}#{inner}")


class ConcatRecords(RecordSource):
    """Several sources one after another."""

    def __init__(self, parts: list[RecordSource], name: str = "mixture"):
        self.parts, self.name = parts, name
        self.starts = np.cumsum([0] + [len(p) for p in parts], dtype=np.int64)
        self.load_problems = [p for part in parts for p in part.load_problems]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> SourceRecord:
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.parts[part][index - int(self.starts[part])]


def sample_indices(strategy: str, size: int, seed: int, key: str) -> np.ndarray:
    """Indices chosen by an upstream `sampling_strategy`; `random` is seeded by (seed, key), sorted afterwards."""
    strategy = (strategy or "all").strip()
    if strategy == "all":
        return np.arange(size)
    match = re.fullmatch(r"(first|end|random):(\d+(?:\.\d+)?)(%?)", strategy)
    if not match:
        raise ValueError(f"unknown sampling_strategy {strategy!r}; use all, first:N, end:N, random:N or random:P%")
    kind, number, percent = match.groups()
    count = math.ceil(float(number) * size / 100) if percent else int(float(number))
    count = min(count, size)
    if kind == "first":
        return np.arange(count)
    if kind == "end":
        return np.arange(size - count, size)
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return np.sort(rng.permutation(size)[:count])


def expand_braces(spec: str) -> list[str]:
    """Upstream's `/path/{a,b,c}.json` form; anything else is returned as is."""
    match = re.search(r"\{([^{}]*,[^{}]*)\}", spec)
    if not match:
        return [spec]
    return [spec[: match.start()] + part + spec[match.end():] for part in match.group(1).split(",")]


def open_file(path: str, image_folder: str | None, cache_dir: str | os.PathLike | None = None) -> RecordSource:
    """One file or folder: JSON / JSONL, parquet (file or folder of parquet files), or a save_to_disk folder.

    `cache_dir`: where JSON / JSONL byte-offset indices are cached (`json_index`); None builds them in memory.
    """
    target = Path(path)
    if target.is_dir():
        if (target / "dataset_info.json").is_file() or (target / "dataset_dict.json").is_file():
            return HFRecords.from_disk(str(target), image_folder)
        parquet = sorted(str(p) for p in target.rglob("*.parquet"))
        if parquet:
            return HFRecords.from_parquet(parquet, image_folder)
        raise ValueError(f"{path}: folder holds neither a saved dataset nor parquet files")
    if not target.is_file():
        raise DataFileNotFound(f"{path}: data file not found")
    if target.suffix == ".parquet":
        return HFRecords.from_parquet([str(target)], image_folder)
    if target.suffix in (".yaml", ".yml"):
        raise ValueError(f"{path}: nested YAML mixtures are not supported")
    return JsonRecords(target, image_folder, cache_dir)


def open_mixture(path: str, image_folder: str | None, seed: int,
                 cache_dir: str | os.PathLike | None = None) -> RecordSource:
    """An upstream YAML mixture; entry paths are taken relative to the YAML's folder when they exist there."""
    import yaml

    spec = yaml.safe_load(Path(path).read_text())
    entries = spec.get("datasets") if isinstance(spec, dict) else None
    if not entries:
        raise ValueError(f"{path}: a mixture needs a `datasets:` list")
    parts = []
    for number, entry in enumerate(entries):
        data_path = entry.get("json_path") or entry.get("path")
        if not data_path:
            raise ValueError(f"{path}: entry {number} has no json_path")
        beside = Path(path).parent / data_path
        resolved = str(beside) if not os.path.isabs(data_path) and beside.exists() else data_path
        source = open_file(resolved, entry.get("image_folder", image_folder), cache_dir)
        strategy = entry.get("sampling_strategy", "all")
        indices = sample_indices(strategy, len(source), seed, f"{number}:{data_path}")
        parts.append(SubsetRecords(source, indices, strategy=str(strategy)))
    return ConcatRecords(parts, Path(path).name)


@dataclass(frozen=True)
class DatasetPreset:
    """A recipe dataset on the Hub: which files make it and how to read them."""

    name: str
    repo_id: str
    patterns: tuple[str, ...]  # files to download (huggingface_hub allow_patterns)
    records: str  # the JSON file or the parquet folder, relative to the snapshot
    images_zip: str | None = None  # extracted once into `images/` beside it


DATASET_PRESETS = {p.name: p for p in (
    DatasetPreset("lcs-558k", "liuhaotian/LLaVA-Pretrain", ("blip_laion_cc_sbu_558k.json", "images.zip"),
                  "blip_laion_cc_sbu_558k.json", images_zip="images.zip"),
    DatasetPreset("llava-next-780k", "lmms-lab/LLaVA-NeXT-Data", ("data/*.parquet",), "data"),
)}


def find_preset(spec: str) -> DatasetPreset | None:
    key = spec.removeprefix("hf://")
    return DATASET_PRESETS.get(key) or next((p for p in DATASET_PRESETS.values() if p.repo_id == key), None)


def open_preset(spec: str, local_dir: str | None = None, cache_dir: str | os.PathLike | None = None) -> RecordSource:
    """A preset from `local_dir` when it holds the files, else downloaded on demand with huggingface_hub."""
    preset = find_preset(spec)
    if preset is None:
        raise KeyError(f"unknown dataset preset {spec!r}; known: {', '.join(DATASET_PRESETS)}")
    root = Path(local_dir) if local_dir else None
    if root is None or not (root / preset.records).exists():
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(preset.repo_id, repo_type="dataset", allow_patterns=list(preset.patterns),
                                      local_dir=local_dir))
    image_folder = None
    if preset.images_zip:
        image_folder = str(root / "images")
        if not (root / "images").is_dir():
            import zipfile

            with zipfile.ZipFile(root / preset.images_zip) as archive:
                archive.extractall(root / "images.partial")
            os.replace(root / "images.partial", root / "images")
    return open_file(str(root / preset.records), image_folder, cache_dir)


def open_source(spec: str, image_folder: str | None = None, *, seed: int = 0, preset_dir: str | None = None,
                cache_dir: str | os.PathLike | None = None) -> RecordSource:
    """Records for a data spec: file, folder, brace list, YAML mixture or preset name (see module docstring).

    `cache_dir` (a resolved folder, see `data.cache`): where JSON / JSONL indices are cached; None: in memory.
    """
    if not os.path.exists(spec) and find_preset(spec) is not None:
        return open_preset(spec, local_dir=preset_dir, cache_dir=cache_dir)
    paths = expand_braces(spec)
    if len(paths) > 1:
        return ConcatRecords([open_file(p, image_folder, cache_dir) for p in paths], Path(spec).name)
    if Path(spec).suffix in (".yaml", ".yml"):
        return open_mixture(spec, image_folder, seed, cache_dir)
    return open_file(spec, image_folder, cache_dir)
