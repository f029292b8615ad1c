"""A fixed micro-batch order (`data.order_file`): replay another run's exact data order, e.g. upstream's.

An order file lists micro-batches by record id, in one of two formats:

* JSON: a list of micro-batches, each a list of ids, `[["id7", "id2"], ["id4", "id0"], ...]`, or an object whose
  `micro_batches` key holds that list;
* text (any other file): one micro-batch per line, ids separated by whitespace; blank lines and lines starting with
  `#` are skipped.

Ids are the records' `id` fields (a record without one goes by its origin, `file:line`, as in skip reports). An id
the data does not have, or one that several records share, is a one-line error naming the file and the id.

The list is in global order, as accelerate deals micro-batches to processes: with N processes entry k goes to
rank k % N, and each rank groups its consecutive micro-batches into optimizer steps of `batch.grad_accum`, so step s
takes entries s*A*N ... (s+1)*A*N - 1 (A = grad_accum). A micro-batch holds any number of records
(`batch.per_device_batch_size` plays no part). Every epoch replays the whole list; `optim.max_steps` stops earlier.
As the samplers do, a list that does not divide by N is cut (`data.drop_last`) or padded with its first entries.
A record that fails to load is skipped and counted as always: its micro-batch trains without it.

Resume: the sampler state carries the order's sha256, so a checkpoint resumes only with the same order (and a run
started without an order file never resumes with one, nor the reverse).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from mlcd_vl.data.samplers import ShardedBatchSampler
from mlcd_vl.data.samples import record_id_of
from mlcd_vl.data.sources import RecordSource
from mlcd_vl.errors import UsageError


class OrderFileError(UsageError, ValueError):
    """An order file that cannot be read or names records the data does not have; the message names file and id."""


def read_order_file(path: str | Path) -> list[list[str]]:
    """The micro-batches of an order file (JSON or text, see the module docstring) as lists of ids."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise OrderFileError(f"{path}: cannot read the order file ({error.strerror or error})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise OrderFileError(f"{path}: not valid JSON ({error})") from None
        if isinstance(data, dict):
            data = data.get("micro_batches")
        if not isinstance(data, list) or not all(isinstance(batch, list) for batch in data):
            raise OrderFileError(f"{path}: expected a list of micro-batches (lists of record ids) or an object "
                                 "with one under 'micro_batches'")
        batches = [[str(record_id) for record_id in batch] for batch in data]
    else:
        batches = [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    empty = next((index for index, batch in enumerate(batches) if not batch), None)
    if empty is not None:
        raise OrderFileError(f"{path}: micro-batch {empty} is empty")
    if not batches:
        raise OrderFileError(f"{path}: lists no micro-batch")
    return batches


def record_ids(records: RecordSource) -> list[str]:
    """The id of every record, in source order (what order files and skip reports name)."""
    return [record_id_of(records[index]) for index in range(len(records))]


def resolve_order(batches: list[list[str]], ids: Sequence[str], path: str | Path) -> list[list[int]]:
    """The micro-batches as dataset indices; an unknown or ambiguous id is an `OrderFileError` naming it."""
    index_of: dict[str, int] = {}
    shared: set[str] = set()
    for index, record_id in enumerate(ids):
        if record_id in index_of:
            shared.add(record_id)
        index_of.setdefault(record_id, index)
    resolved = []
    for position, batch in enumerate(batches):
        for record_id in batch:
            if record_id not in index_of:
                raise OrderFileError(f"{path}: micro-batch {position} names record id {record_id!r}, which the "
                                     "training data does not have")
            if record_id in shared:
                raise OrderFileError(f"{path}: micro-batch {position} names record id {record_id!r}, which several "
                                     "records of the training data share")
        resolved.append([index_of[record_id] for record_id in batch])
    return resolved


def order_digest(batches: list[list[str]]) -> str:
    return hashlib.sha256(json.dumps(batches).encode()).hexdigest()


class FixedOrderBatchSampler(ShardedBatchSampler):
    """The order file's micro-batches, dealt round-robin to ranks, every epoch the same; resumable."""

    def __init__(self, batches: list[list[int]], digest: str, *, source: str = "the order", world_size: int = 1,
                 rank: int = 0, seed: int = 0, drop_last: bool = False):
        super().__init__(world_size, rank, seed, drop_last)
        if len(batches) < world_size:
            raise OrderFileError(f"{source}: {len(batches)} micro-batch(es) cannot feed {world_size} processes")
        self.batches, self.order_sha256 = batches, digest

    @classmethod
    def from_file(cls, path: str | Path, records: RecordSource, **kwargs) -> FixedOrderBatchSampler:
        names = read_order_file(path)
        return cls(resolve_order(names, record_ids(records), path), order_digest(names), source=str(path), **kwargs)

    def global_batches(self, generator: torch.Generator) -> list[list[int]]:
        return [list(batch) for batch in self.batches]
