"""The batcher's worker loop for continuous (iteration-level) batching.

Between two decode steps of the running batch the loop

1. takes queued jobs while the batch has room (`max_batch_size` rows; when nothing runs, the first job waits
   `batch_wait_s` for company), prepares each on its own (a bad request fails alone with its 400), and prefills the
   good ones together into the running batch;
2. drops the rows of jobs whose client left (a closed stream, an abandoned request);
3. runs one step: every row gets its next token; streaming jobs get their new text piece at once, finished jobs
   their result, and their rows leave the batch.

So a request that finds room never waits for another one to finish: it joins at the next step, streaming and
seeded requests included (a seeded row samples from its own generator, see `running_batch.py`). Jobs that do not
fit stay in the bounded queue, which answers 429 when full. A long prompt's prefill does pause the running rows for
its duration (no chunked prefill). Rows always decode with the KV cache (`use_cache=False` is for the engine's own
checks). If a step fails, the running jobs get the error and the loop goes on with an empty batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from mlcd_vl.serve.engine import EngineError
from mlcd_vl.serve.running_batch import RunningBatch, Sequence, Update

if TYPE_CHECKING:
    from mlcd_vl.serve.batcher import Batcher, Job

log = logging.getLogger("mlcd_vl.serve")


class ContinuousLoop:
    """Owns the running batch; `run` until the batcher stops."""

    def __init__(self, batcher: "Batcher"):
        self.batcher = batcher
        self.batch = RunningBatch(batcher.engine)

    def run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            try:
                self._iterate()
            except Exception as error:  # noqa: BLE001 - the running rows fail; the worker goes on
                log.exception("decode step failed")
                self._fail_running(error)

    def _iterate(self) -> None:
        self._admit(self._take())
        self._drop_cancelled()
        if self.batch:
            rows = len(self.batch)
            updates = self.batch.step()
            self.batcher._count_step(rows, len(self.batch))
            self._deliver(updates)

    def _take(self) -> list["Job"]:
        """Queued jobs that fit in the batch: without waiting while rows are running."""
        options, jobs = self.batcher.options, []
        room = options.max_batch_size - len(self.batch)
        source = self.batcher._queue
        if room <= 0:
            return jobs
        if not self.batch:
            try:
                jobs.append(source.get(timeout=0.2))
            except queue.Empty:
                return jobs
            deadline = time.monotonic() + options.batch_wait_s
            while len(jobs) < room:
                try:
                    jobs.append(source.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
        while len(jobs) < room:
            try:
                jobs.append(source.get_nowait())
            except queue.Empty:
                break
        return jobs

    def _admit(self, jobs: list["Job"]) -> None:
        batcher, sequences = self.batcher, []
        for job in jobs:
            if job.cancelled.is_set():
                batcher._count_cancelled()
                continue
            try:
                prompt = batcher._prepare(job)
                settings = replace(job.settings, max_new_tokens=job.max_new_tokens)
                sequences.append(self.batch.sequence(job, prompt, settings, show=job.stream))
            except Exception as error:  # noqa: BLE001 - a request that cannot be prepared fails alone
                if not isinstance(error, EngineError):
                    log.exception("preparing a request failed")
                batcher._fail(job, error)
                continue
            if job.stream:
                batcher._count_stream()
                job.emit("start")
        if not sequences:
            return
        rows = len(self.batch) + len(sequences)
        try:
            updates = self.batch.join(sequences)
        except Exception as error:  # noqa: BLE001 - only the joining jobs fail; the running batch is untouched
            log.exception("prefill failed")
            for sequence in sequences:
                batcher._fail(sequence.key, error)
            return
        batcher._count_join(rows, len(self.batch))
        log.info("%d request(s) joined; %d running", len(sequences), len(self.batch))
        self._deliver(updates)

    def _deliver(self, updates: list[Update]) -> None:
        for update in updates:
            job = update.sequence.key
            if job.stream and update.piece:
                job.emit("piece", update.piece)
            if update.result is not None:
                self.batcher._done(job, update.result)

    def _drop_cancelled(self) -> None:
        gone = [s.key for s in self.batch.sequences if s.key.cancelled.is_set()]
        if gone:
            self.batch.leave(gone)
            self.batcher._set_running(len(self.batch))
            for _ in gone:
                self.batcher._count_cancelled()

    def _fail_running(self, error: Exception) -> None:
        running: list[Sequence] = self.batch.sequences
        self.batch = RunningBatch(self.batcher.engine)  # a fresh batch: the failed one's state is unknown
        self.batcher._set_running(0)
        for sequence in running:
            self.batcher._fail(sequence.key, error)
