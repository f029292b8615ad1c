"""The recipe's data: dataset, exact length scan, sampler (length-grouped, packed or a replayed order file),
collator and DataLoader.

The samplers shard the data themselves (every rank computes the same global plan and takes its share), so the
DataLoader is NOT passed to `accelerator.prepare` (it would shard a second time).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mlcd_vl.data import startup
from mlcd_vl.data.collate import PaddingCollator
from mlcd_vl.data.dataset import LengthTable, SupervisedDataset
from mlcd_vl.data.order_file import FixedOrderBatchSampler
from mlcd_vl.data.packing import PackingCollator
from mlcd_vl.data.problems import ProblemLog
from mlcd_vl.data.samplers import LengthGroupedBatchSampler, PackedBatchSampler
from mlcd_vl.model.build import VLMSettings
from mlcd_vl.train.config import TrainConfig


@dataclass
class Data:
    dataset: SupervisedDataset
    table: LengthTable
    sampler: LengthGroupedBatchSampler | PackedBatchSampler | FixedOrderBatchSampler
    loader: torch.utils.data.DataLoader
    scan_log: ProblemLog
    start: startup.DataStart | None = None  # the scanning process: manifest, cache hit or scan, timings


def build_data(config: TrainConfig, tokenizer, settings: VLMSettings, *, rank: int, world_size: int,
               progress: bool, table_path: Path | None = None, scan: bool = True) -> Data:
    """Dataset, exact lengths (records that fail the scan are left out up front), sampler and DataLoader.

    With `scan=False` the lengths are read from `table_path`, which the scanning process wrote (so only the main
    process of a distributed run reads every image header). The scanning process takes the table from the data
    cache when its inputs are unchanged (`data.startup`), else scans with `data.num_workers` x the node's processes
    (the others wait for it).
    """
    dataset = SupervisedDataset.from_config(config.data, tokenizer, settings, seed=config.seed)
    scan_log, start = ProblemLog(), None
    if scan:
        scan_workers = config.data.num_workers * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        start = startup.prepare(dataset, config.seed, workers=scan_workers, progress=progress, log=scan_log)
        table = start.table
        if table_path is not None:
            table_path.parent.mkdir(parents=True, exist_ok=True)
            table.save(str(table_path))
    else:
        table = LengthTable.load(str(table_path))
    if not len(table.valid):
        raise ValueError(f"{config.data.train}: no usable record ({scan_log.summary()})")
    if config.data.order_file:
        sampler = FixedOrderBatchSampler.from_file(config.data.order_file, dataset.records, world_size=world_size,
                                                   rank=rank, seed=config.seed, drop_last=config.data.drop_last)
    else:
        sampler = make_sampler(config, table.lengths, table.has_image, world_size=world_size, rank=rank)
    if config.data.packing:  # never with an order file (it replays padded micro-batches; DataConfig says so)
        collator = PackingCollator.for_model(tokenizer, build_4d_mask=config.packed_4d_mask)
    else:
        collator = PaddingCollator.for_model(tokenizer)
    workers = config.data.num_workers
    # Its own generator: starting an iterator draws a base seed, which must not come from the global RNG (a run
    # resumed mid-epoch starts one more iterator than the uninterrupted run, so dropout masks would differ).
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=workers,
                                         persistent_workers=False, prefetch_factor=2 if workers else None,
                                         generator=torch.Generator().manual_seed(config.seed))
    return Data(dataset, table, sampler, loader, scan_log, start)


def make_sampler(config: TrainConfig, lengths, has_image, *, world_size: int,
                 rank: int) -> LengthGroupedBatchSampler | PackedBatchSampler:
    """The recipe's batch sampler over a length table's columns: packed rows of `data.token_budget`, or
    length-grouped padded batches (also what `mlcd-vl plan` replays to find the largest micro-batch)."""
    if config.data.packing:
        return PackedBatchSampler(lengths, config.data.token_budget, world_size=world_size, rank=rank,
                                  seed=config.seed, drop_last=config.data.drop_last)
    return LengthGroupedBatchSampler(lengths, has_image, config.batch.per_device_batch_size, world_size=world_size,
                                     rank=rank, grad_accum=config.batch.grad_accum,
                                     group_by_modality=config.data.group_by_modality, seed=config.seed,
                                     drop_last=config.data.drop_last)


def micro_batch_groups(loader, grad_accum: int):
    """The loader's batches in lists of `grad_accum` (the last one of an epoch may be shorter)."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == grad_accum:
            yield group
            group = []
    if group:
        yield group
