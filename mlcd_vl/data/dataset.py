"""The torch Dataset over records, and the length scan that samplers and `data check` use.

`SupervisedDataset` is picklable and cheap to send to DataLoader workers: it holds the record source, the model's
`VLMSettings`, the `DataConfig` and the tokenizer (or the folder to load it from); the `SampleBuilder` (and a
tokenizer given as a folder) is created lazily, once per worker process, never per sample.

`__getitem__` returns a `Sample`, or a `SkippedRecord` for a bad record (the collators carry skips to the main
process inside the batch, where a `ProblemLog` counts them); with `strict=True` it raises `DataError` instead.

`scan` measures every record without pixel work (image headers only, unless `decode_images`), in worker processes
with a progress bar: exact token lengths for length grouping and packing, and the records to leave out up front,
among them every repeat of an earlier record (same id and content; the first copy is kept).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from mlcd_vl.data.problems import DataError, Problem, ProblemLog, RecordProblem, SkippedRecord
from mlcd_vl.data.config import DataConfig
from mlcd_vl.data.samples import Sample, SampleBuilder, SampleStats, record_id_of
from mlcd_vl.data.sources import RecordSource, open_source
from mlcd_vl.model.build import VLMSettings


class SupervisedDataset(torch.utils.data.Dataset):
    """Records -> `Sample`s for one model; see the module docstring."""

    def __init__(self, records: RecordSource, tokenizer, settings: VLMSettings, config: DataConfig):
        self.records, self.settings, self.config = records, settings, config
        self._tokenizer = tokenizer  # a tokenizer, or a folder loaded lazily with model.build.load_tokenizer
        self._builder: SampleBuilder | None = None
        if config.strict and self.load_problems:  # e.g. a malformed JSONL line: never dropped silently
            raise DataError(self.load_problems[0])

    @classmethod
    def from_config(cls, config: DataConfig, tokenizer, settings: VLMSettings, seed: int = 0) -> "SupervisedDataset":
        """Over `config.train`; `seed` draws mixture subsets (the same on every rank and resume)."""
        from mlcd_vl.data.cache import resolve_cache_dir

        records = open_source(config.train, config.image_folder, seed=seed, preset_dir=config.preset_dir,
                              cache_dir=resolve_cache_dir(config.cache_dir))
        return cls(records, tokenizer, settings, config)

    @property
    def load_problems(self) -> list[SkippedRecord]:
        """Records lost while reading the source itself (e.g. malformed JSONL lines)."""
        return list(getattr(self.records, "load_problems", []))

    @property
    def builder(self) -> SampleBuilder:
        if self._builder is None:
            tokenizer = self._tokenizer
            if isinstance(tokenizer, (str, os.PathLike)):
                from mlcd_vl.model.build import load_tokenizer

                tokenizer = load_tokenizer(str(tokenizer), self.config.template or self.settings.template)
            self._builder = SampleBuilder(tokenizer, self.settings, self.config)
        return self._builder

    @property
    def tokenizer(self):
        return self.builder.tokenizer

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_builder"] = None
        return state

    def __len__(self) -> int:
        return len(self.records)

    def _skip(self, index: int, problem: RecordProblem) -> SkippedRecord:
        skipped = SkippedRecord(record_id_of(self.records[index]), problem.problem, problem.detail)
        if self.config.strict:
            raise DataError(skipped)
        return skipped

    def __getitem__(self, index: int) -> Sample | SkippedRecord:
        try:
            return self.builder.build(self.records[index])
        except RecordProblem as problem:
            return self._skip(index, problem)

    def measure(self, index: int, *, decode_images: bool = False) -> SampleStats | SkippedRecord:
        try:
            return self.builder.measure(self.records[index], decode_images=decode_images)
        except RecordProblem as problem:
            return self._skip(index, problem)


LENGTHS_FILE = "lengths.npz"  # a length table's name in a run's output folder and in `mlcd-vl data check --out`


@dataclass
class LengthTable:
    """Per record: token length after <image> expansion (0 = skipped), whether it has images and its supervised
    tokens. Training writes one into its output folder, `mlcd-vl data check` into its report folder; `mlcd-vl plan
    --lengths` reads it."""

    lengths: np.ndarray
    has_image: np.ndarray
    skipped: list[SkippedRecord] = field(default_factory=list)
    stats: list[SampleStats | None] | None = None  # kept when `scan(keep_stats=True)`
    supervised: np.ndarray | None = None  # None in tables written before it was recorded

    @property
    def valid(self) -> np.ndarray:
        return np.flatnonzero(self.lengths > 0)

    def modality_lengths(self) -> np.ndarray:
        """Upstream's signed lengths: positive for records with images, negative for text-only (0 = skipped)."""
        return np.where(self.has_image, self.lengths, -self.lengths)

    def save(self, path: str) -> None:
        skipped = json.dumps([[s.record_id, s.problem.value, s.detail] for s in self.skipped], ensure_ascii=False)
        columns = {"lengths": self.lengths, "has_image": self.has_image, "skipped": np.array(skipped)}
        if self.supervised is not None:
            columns["supervised"] = self.supervised
        with open(path, "wb") as file:  # a file object: np.savez would append ".npz" to any other name
            np.savez(file, **columns)

    @classmethod
    def load(cls, path: str) -> "LengthTable":
        data = np.load(path)
        skipped = [SkippedRecord(record_id, Problem(problem), detail)
                   for record_id, problem, detail in json.loads(str(data["skipped"]))] if "skipped" in data else []
        return cls(data["lengths"], data["has_image"], skipped,
                   supervised=data["supervised"] if "supervised" in data.files else None)


def repeated_records(dataset: SupervisedDataset, fingerprints: np.ndarray, usable: np.ndarray) -> list[tuple[int, int]]:
    """(index, index of the first copy) for every usable record that repeats an earlier one: the same id and content
    (`record_fingerprint`, confirmed record by record) at another place in the data. The same place drawn twice (a
    mixture that lists a file twice to up-weight it) is not a repeat."""
    candidates = np.flatnonzero(usable)
    values, counts = np.unique(fingerprints[candidates], return_counts=True)
    repeats = []
    for value in values[counts > 1]:
        members = candidates[fingerprints[candidates] == value]  # in dataset order
        kept: list = []  # (index, source record) of the distinct records seen so far
        for index in members.tolist():
            source = dataset.records[index]
            first = next((i for i, other in kept if other.record == source.record), None)
            if first is None:
                kept.append((index, source))
            elif dataset.records[first].origin != source.origin:
                repeats.append((index, first))
    return sorted(repeats)


_WORKER_DATASET: SupervisedDataset | None = None


def _init_worker(dataset: SupervisedDataset) -> None:
    global _WORKER_DATASET
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    _WORKER_DATASET = dataset


def _measure_chunk(args: tuple[int, int, bool]) -> list[tuple[int, SampleStats | SkippedRecord]]:
    start, stop, decode = args
    return [(i, _WORKER_DATASET.measure(i, decode_images=decode)) for i in range(start, stop)]


def scan(dataset: SupervisedDataset, *, workers: int = 0, decode_images: bool = False, keep_stats: bool = False,
         progress: bool = False, log: ProblemLog | None = None, chunk: int = 64) -> LengthTable:
    """Measure every record (in `workers` processes when > 0); skipped records are added to `log` if given."""
    total = len(dataset)
    lengths, has_image = np.zeros(total, dtype=np.int64), np.zeros(total, dtype=bool)
    fingerprints = np.zeros(total, dtype=np.int64)
    supervised = np.zeros(total, dtype=np.int64)
    stats: list[SampleStats | None] = [None] * total
    skipped: list[SkippedRecord] = list(dataset.load_problems)
    if workers > 0:
        chunk = max(1, min(chunk, -(-total // (workers * 4))))  # several chunks per worker, even for small data
    tasks = [(start, min(start + chunk, total), decode_images) for start in range(0, total, chunk)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="scanning records", unit="rec")

    def consume(results):
        for index, result in results:
            if isinstance(result, SkippedRecord):
                skipped.append(result)
            else:
                lengths[index], has_image[index] = result.length, bool(result.visual_tokens)
                fingerprints[index] = result.fingerprint
                supervised[index] = result.supervised_tokens
                if keep_stats:
                    stats[index] = result
        if bar is not None:
            bar.update(len(results))

    if workers > 0 and len(tasks) > 1:
        with multiprocessing.get_context().Pool(workers, initializer=_init_worker, initargs=(dataset,)) as pool:
            for results in pool.imap_unordered(_measure_chunk, tasks):
                consume(results)
    else:
        for start, stop, decode in tasks:
            consume([(i, dataset.measure(i, decode_images=decode)) for i in range(start, stop)])
    if bar is not None:
        bar.close()
    for index, first in repeated_records(dataset, fingerprints, lengths > 0):
        duplicate = SkippedRecord(record_id_of(dataset.records[index]), Problem.DUPLICATE_RECORD,
                                  f"the same id and content as record {dataset.records[first].origin}, which is kept")
        if dataset.config.strict:
            raise DataError(duplicate)
        lengths[index], has_image[index], supervised[index], stats[index] = 0, False, 0, None
        skipped.append(duplicate)
    if log is not None:
        log.extend(skipped)
    return LengthTable(lengths, has_image, skipped, stats if keep_stats else None, supervised)
