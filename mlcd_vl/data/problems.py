"""Bad records: the reasons a record is skipped, the error strict mode raises, and the log that counts them.

Nothing in the data path substitutes another record for a bad one (upstream retried the next index and let PIL
fill truncated images). A record that cannot become an exact training sample is skipped with one of the
`Problem` reasons below; `strict=True` turns the skip into a `DataError` naming the record.

Counting across processes: DataLoader workers and `data check` pool workers never share a counter. They hand
their `SkippedRecord`s back as data (inside batches, or as scan results) and the owning process adds them to a
`ProblemLog`, whose methods are thread-safe. `ProblemLog.gather()` sums the logs of all distributed ranks.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

from mlcd_vl.errors import UsageError, UserError

logger = logging.getLogger("mlcd_vl.data")


class Problem(str, Enum):
    """Why a record was skipped (the value is what reports print)."""

    IMAGE_MISSING = "image_missing"
    IMAGE_EMPTY = "image_empty"
    IMAGE_UNREADABLE = "image_unreadable"  # truncated, corrupt, not an image
    IMAGE_TOO_LARGE = "image_too_large"  # pixel-count guard
    IMAGE_COUNT_MISMATCH = "image_count_mismatch"  # number of <image> placeholders != number of images
    BAD_CONVERSATION = "bad_conversation"  # no user/assistant turns, unknown roles, template cannot render it
    EMPTY_ANSWER = "empty_answer"  # an assistant turn that is empty or only whitespace (nothing to learn but the end)
    ENDS_ON_USER_TURN = "ends_on_user_turn"  # the last turn is a question with no answer (often a cut record)
    DUPLICATE_RECORD = "duplicate_record"  # same id and same content as an earlier record, which is kept
    BAD_RECORD = "bad_record"  # not a record at all (malformed JSON line, missing conversations)
    TRUNCATION_CUTS_IMAGE = "truncation_cuts_image"  # max_length falls inside an image block
    NO_SUPERVISED_TOKENS = "no_supervised_tokens"  # nothing left to train on (often after truncation)


@dataclass(frozen=True)
class SkippedRecord:
    """A record that was skipped: which one, why, and the detail (file name, counts, ...)."""

    record_id: str
    problem: Problem
    detail: str

    def __str__(self) -> str:
        return f"record {self.record_id!r}: {self.problem.value}: {self.detail}"


class DataError(UserError, ValueError):
    """Raised instead of skipping when `strict=True`; the message names the record and the reason."""

    def __init__(self, skipped: SkippedRecord):
        super().__init__(str(skipped))
        self.skipped = skipped


class DataFileNotFound(UsageError, FileNotFoundError):
    """A data file or folder a recipe or `data check` names does not exist."""


class RecordProblem(Exception):
    """Internal: raised inside sample building, turned into a `SkippedRecord` by the caller."""

    def __init__(self, problem: Problem, detail: str):
        super().__init__(detail)
        self.problem = problem
        self.detail = detail


@dataclass
class ProblemLog:
    """Counts skipped records by reason, keeps a few example ids each, logs the first `log_first` in full."""

    log_first: int = 10
    examples_per_problem: int = 5
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _logged: int = 0

    def add(self, skipped: SkippedRecord) -> None:
        with self._lock:
            key = skipped.problem.value
            self.counts[key] += 1
            ids = self.examples.setdefault(key, [])
            if len(ids) < self.examples_per_problem:
                ids.append(skipped.record_id)
            self._logged += 1
            log_it = self._logged <= self.log_first
        if log_it:
            logger.warning("skipped %s", skipped)
            if self._logged == self.log_first:
                logger.warning("further skipped records are only counted; see the end-of-epoch summary")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def extend(self, skipped: list[SkippedRecord]) -> None:
        for item in skipped:
            self.add(item)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge_counts(self, counts: dict[str, int], examples: dict[str, list[str]]) -> None:
        with self._lock:
            self.counts.update(counts)
            for key, ids in examples.items():
                kept = self.examples.setdefault(key, [])
                kept.extend(ids[: max(0, self.examples_per_problem - len(kept))])

    def to_dict(self) -> dict:
        with self._lock:
            return {"total": sum(self.counts.values()), "counts": dict(sorted(self.counts.items())),
                    "examples": {k: list(v) for k, v in sorted(self.examples.items())}}

    def summary(self, title: str = "skipped records") -> str:
        data = self.to_dict()
        if not data["total"]:
            return f"{title}: none"
        lines = [f"{title}: {data['total']}"]
        for key, count in data["counts"].items():
            lines.append(f"  {key}: {count} (e.g. {', '.join(data['examples'].get(key, []))})")
        return "\n".join(lines)

    def log_summary(self, title: str = "skipped records") -> None:
        (logger.warning if self.total else logger.info)(self.summary(title))

    def end_epoch(self, epoch: int) -> str:
        """Log (and return) the summary over all ranks at the end of an epoch."""
        text = self.gather().summary(f"epoch {epoch}: skipped records")
        (logger.warning if self.total else logger.info)(text)
        return text

    def gather(self) -> "ProblemLog":
        """The sum over all ranks when torch.distributed is initialised, else a copy of this log."""
        merged = ProblemLog(self.log_first, self.examples_per_problem)
        data = self.to_dict()
        try:
            import torch.distributed as dist

            ready = dist.is_available() and dist.is_initialized()
        except ImportError:
            ready = False
        parts = [data]
        if ready:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, data)
        for part in parts:
            merged.merge_counts(part["counts"], part["examples"])
        return merged
