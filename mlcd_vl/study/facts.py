"""What a study reports per tower, measured from a stage's run folder when it finishes (kept in its stamp) or read
from the evaluation's results files:

* training tokens/s of each stage: real tokens over wall seconds of every logged window in `metrics.jsonl`
  (sum of tokens_per_s x step_seconds over the sum of step_seconds: a token-weighted mean over the run);
* visual tokens per sample of each stage: the mean over the records the run trained on (the valid records of its
  length table `lengths.npz`) of the `<image>` tokens training's own label builder gives them (`measure`: image
  headers, `anyres.image_layout`), over all of them or a seeded sample of `sample` records (stated in the table);
* the data manifest's hash (`data_manifest.json`, written by training), and the manifests' differences between
  towers (`data.manifest.diff`);
* the records of each optimizer step (`step_membership_sha256`): the same for every tower when the data and seed
  are, whatever each tower's token counts;
* the scores, read by `eval.summarize`: the MLCD benchmarks in the paper's units, the CPU study's demo skills (tasks
  outside the MLCD table) as their recorded `relaxed_overall` x100.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEMO_METRIC = "relaxed_overall"


@dataclass
class VisualTokens:
    mean: float
    measured: int  # records measured
    records: int  # records the run trained on
    unreadable: int = 0  # records of the run that fail to load now (left out of the mean, named in the table)

    def describe(self) -> str:
        text = f"{self.mean:.0f}" + ("" if self.measured == self.records else f" ({self.measured} of {self.records})")
        return text + (f", {self.unreadable} unreadable now" if self.unreadable else "")


@dataclass
class StageFacts:
    manifest_hash: str
    tokens_per_s: float | None
    visual_tokens: VisualTokens | None
    wall_seconds: float
    steps_sha256: str | None = None  # `step_membership_sha256`; None: packed rows


@dataclass
class TowerFacts:
    key: str
    label: str
    stages: dict[int, StageFacts]
    eval_seconds: float
    scores: dict[str, float]  # column -> value (paper units; demo skills in %)
    documents: dict[str, int] = field(default_factory=dict)
    results_files: list[Path] = field(default_factory=list)

    @property
    def wall_seconds(self) -> float:
        return sum(s.wall_seconds for s in self.stages.values()) + self.eval_seconds


def training_tokens_per_s(metrics_file: Path) -> float | None:
    """Real (non-padding) tokens per second over the whole run, from its metrics.jsonl."""
    tokens = seconds = 0.0
    for line in Path(metrics_file).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        rate, spent = record.get("tokens_per_s"), record.get("step_seconds")
        if isinstance(rate, (int, float)) and isinstance(spent, (int, float)) and math.isfinite(rate):
            tokens, seconds = tokens + rate * spent, seconds + spent
    return tokens / seconds if seconds else None


def manifest_hash(stage_folder: Path) -> str:
    from mlcd_vl.data.manifest import Manifest

    return Manifest.load(Path(stage_folder) / "data_manifest.json").hash


def manifest_differences(first: Path, second: Path) -> list[str]:
    """`data.manifest.diff` of two stage folders' manifests (empty: the same data)."""
    from mlcd_vl.data.manifest import Manifest, diff

    return diff(Manifest.load(Path(first) / "data_manifest.json"), Manifest.load(Path(second) / "data_manifest.json"))


def visual_tokens_per_sample(stage_folder: Path, launch_dir: Path, sample: int = 2000, seed: int = 0) -> VisualTokens:
    """Mean `<image>` tokens per trained record of a finished stage (see the module docstring). `launch_dir`: the
    folder the stage was launched from, which relative data paths in its recipe are relative to."""
    from transformers import AutoTokenizer

    from mlcd_vl.data.dataset import LENGTHS_FILE, LengthTable, SupervisedDataset
    from mlcd_vl.data.samples import SampleStats
    from mlcd_vl.model.build import prepare_tokenizer
    from mlcd_vl.model.checkpoint import read_settings
    from mlcd_vl.train.config import RESOLVED_CONFIG_FILE, load_config

    folder = Path(stage_folder).resolve()
    config = load_config(folder / RESOLVED_CONFIG_FILE)
    settings = read_settings(folder)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(folder), config.model.template)
    valid = LengthTable.load(str(folder / LENGTHS_FILE)).valid
    chosen = valid if len(valid) <= sample else np.sort(np.random.default_rng(seed).choice(valid, sample, False))
    with contextlib.chdir(launch_dir):
        dataset = SupervisedDataset.from_config(config.data, tokenizer, settings, seed=config.seed)
        measured = [dataset.measure(int(index)) for index in chosen]
    counts = [sum(stats.visual_tokens) for stats in measured if isinstance(stats, SampleStats)]
    return VisualTokens(float(np.mean(counts)) if counts else 0.0, len(counts), len(valid), len(chosen) - len(counts))


def step_membership_sha256(stage_folder: Path, world_size: int) -> str | None:
    """sha256 over the records of each optimizer step of the run (epoch 0, sorted within a step), from its resolved
    recipe and length table: equal between towers when every step trained on the same records. Length grouping
    (the recipes' sampler) draws each step's records from the seed alone (a megabatch of one global batch of the
    seeded permutation) and sorts them by each tower's own lengths only inside the step; an order file replays the
    same steps by construction. None for packing, whose rows follow each tower's own lengths."""
    from mlcd_vl.data.cache import digest
    from mlcd_vl.data.dataset import LENGTHS_FILE, LengthTable
    from mlcd_vl.data.samplers import LengthGroupedBatchSampler
    from mlcd_vl.train.config import RESOLVED_CONFIG_FILE, load_config

    folder = Path(stage_folder)
    config = load_config(folder / RESOLVED_CONFIG_FILE)
    if config.data.packing:
        return None
    if config.data.order_file:
        return digest({"order_file": Path(config.data.order_file).read_text()})
    table = LengthTable.load(str(folder / LENGTHS_FILE))
    accum = config.batch.grad_accum
    ranks = [LengthGroupedBatchSampler(table.lengths, table.has_image, config.batch.per_device_batch_size,
                                       world_size=world_size, rank=rank, grad_accum=accum,
                                       group_by_modality=config.data.group_by_modality, seed=config.seed,
                                       drop_last=config.data.drop_last).rank_batches() for rank in range(world_size)]
    steps = -(-len(ranks[0]) // accum)
    if config.optim.max_steps:
        steps = min(steps, config.optim.max_steps)
    return digest([sorted(index for batches in ranks for batch in batches[step * accum:(step + 1) * accum]
                          for index in batch) for step in range(steps)])


def scores_of(eval_folder: Path, results_files: list[Path]) -> tuple[dict[str, float], dict[str, int], list[str]]:
    """(column -> score, column -> documents, summarize's warnings) from a tower's evaluation, read by
    `eval.summarize` (its files merged as one row): MLCD benchmarks in the paper's units, the demo's skills (tasks
    outside the MLCD table, with every metric as recorded) as relaxed accuracy x100."""
    from mlcd_vl.demo.stages import LMMS_TASK_PREFIX
    from mlcd_vl.eval.summarize import merge_runs, read_run

    warnings: list[str] = []
    run = merge_runs(Path(eval_folder), [read_run(Path(p), warnings) for p in results_files], warnings)
    scores = {column: score.value for column, score in run.scores.items() if score.value is not None}
    documents = {column: run.scores[column].documents or 0 for column in scores}
    for task, other in run.other_scores.items():
        if task.startswith(LMMS_TASK_PREFIX) and DEMO_METRIC in other.metrics:
            skill = task[len(LMMS_TASK_PREFIX):]
            scores[skill] = 100.0 * other.metrics[DEMO_METRIC]
            documents[skill] = other.documents or 0
    return scores, documents, warnings
