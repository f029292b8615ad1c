"""One worker thread that owns the engine and serves queued jobs, batching concurrent ones.

The HTTP handlers never touch the engine: they put a `Job` on a bounded queue (a full queue is refused at once with
`QueueFull`) and await its events ("start" for a stream, "piece"s, then "done" or "error"). Both ways to batch run
the one decode loop (`decode.RunningBatch`):

- `continuous` (the default): iteration-level batching. Between two decode steps the worker takes queued jobs while
  the batch has room (`max_batch_size` rows; when nothing runs, the first job waits `batch_wait_s` for company),
  prepares each on its own, prefills the good ones together into the running batch, drops the rows whose client
  left, and runs one step: streaming jobs get their new text piece at once, finished jobs their result, and their
  rows leave. Every job keeps its own `max_tokens`, stop strings, temperature / top-p and seed (a seeded row samples
  from its own generator), and greedy answers equal the job run alone. A long prompt's prefill pauses the running
  rows for its duration (no chunked prefill). If a step fails, the running jobs get the error and the worker goes
  on with an empty batch.
- `static`: continuous scheduling without joins. The worker gathers waiting jobs as above and groups them:
  non-streaming jobs with the same decoding settings share one `Engine.generate` call (a batch joined once and run
  to its end; each job's own `max_tokens` is honoured by cutting its row), streaming jobs and jobs with a `seed`
  run alone. It is the fallback for models whose KV cache cannot be spliced row by row (sliding-window or
  quantized caches), and what `max_batch_size` 1 runs.

Each job is prepared on its own first (render, tokenize, images), so one bad request fails alone, with an
`EngineError` that the server answers as a 400; the others go on.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from mlcd_vl.serve.decode import RunningBatch, Update, supported
from mlcd_vl.serve.engine import Engine
from mlcd_vl.serve.requests import EngineError, GenerationSettings, Prompt, Request, Result

SCHEDULING = ("continuous", "static")

log = logging.getLogger("mlcd_vl.serve")


class QueueFull(Exception):
    """The queue holds `max_queue` waiting jobs already."""


class ContextLengthError(EngineError):
    """Prompt plus requested completion do not fit in the model's context."""


@dataclass
class Job:
    """One chat completion to run; results come back as events ("start" | "piece" | "done" | "error", payload)."""

    request: Request
    settings: GenerationSettings
    max_tokens: int | None
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    max_new_tokens: int = 0  # resolved by the worker from max_tokens and the prompt length
    finished: bool = False  # "done" or "error" was emitted

    def emit(self, kind: str, payload: Any = None) -> None:
        """Thread-safe: hand an event to the handler's event loop (dropped if that loop is gone)."""
        self.finished = self.finished or kind in ("done", "error")
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the server is shutting down
            self.cancelled.set()

    def batch_key(self) -> tuple | None:
        """Static batching: jobs with equal keys may share a generate call; None runs alone."""
        if self.stream or self.settings.seed is not None:
            return None
        return tuple(vars(replace(self.settings, max_new_tokens=1)).items())


@dataclass
class BatcherOptions:
    max_batch_size: int = 8
    max_queue: int = 64
    batch_wait_s: float = 0.005  # how long the first job waits for company (when nothing is running)
    default_max_tokens: int = 512  # used when a request gives no max_tokens (capped by the context)
    scheduling: str = "continuous"  # or "static" (see the module docstring)

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.scheduling not in SCHEDULING:
            raise ValueError(f"scheduling must be one of {SCHEDULING}, got {self.scheduling!r}")


@dataclass
class BatcherStats:
    """Counters for `/metrics`. Batch counts mean engine calls under static batching; under continuous batching
    `generate_calls` counts prefills (each admits a group of jobs into the running batch), `batch_sizes` counts
    decode steps by their number of rows, and `largest_batch` is the most rows that ran together."""

    scheduling: str = "continuous"
    requests: int = 0
    completed: int = 0
    failed: int = 0
    rejected_queue_full: int = 0
    cancelled: int = 0  # the client left before its answer was complete
    generate_calls: int = 0
    streams: int = 0
    largest_batch: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    decode_steps: int = 0  # continuous batching only
    running: int = 0  # rows in the running batch now (continuous batching)


def cut_to_limit(result: Result, limit: int, decode: Callable[[list[int]], str]) -> Result:
    """The result a job would get alone with `max_new_tokens=limit`, from a row generated with a larger limit."""
    if result.completion_tokens <= limit:
        return result
    ids = result.token_ids[:limit]
    return Result(decode(ids), result.prompt_tokens, limit, "length", ids)


class Batcher:
    """The queue, the worker thread and its counters (`snapshot()` is what `/metrics` shows)."""

    def __init__(self, engine: Engine, options: BatcherOptions | None = None):
        self.engine, self.options = engine, options or BatcherOptions()
        options = self.options
        self.stats = BatcherStats(scheduling=options.scheduling)
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=options.max_queue)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._work, name="mlcd-vl-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._count(rejected_queue_full=1)
            raise QueueFull(f"the server queue is full ({self.options.max_queue} waiting requests); "
                            "retry shortly") from None
        self._count(requests=1)

    def snapshot(self) -> dict:
        with self._lock:
            stats = dict(vars(self.stats), batch_sizes=dict(self.stats.batch_sizes))
        return dict(stats, queue_depth=self._queue.qsize(), max_batch_size=self.options.max_batch_size,
                    max_queue=self.options.max_queue)

    # ---------------------------------------------------------------- the worker

    def _continuous(self) -> bool:
        """Whether the worker runs continuous batching (asked on its start: it looks at the model's cache)."""
        if self.options.scheduling != "continuous" or self.options.max_batch_size == 1:
            return False
        if not supported(self.engine):
            log.warning("this model's KV cache cannot be spliced row by row; serving with static batching")
            return False
        return True

    def _work(self) -> None:
        if not self._continuous():
            with self._lock:
                self.stats.scheduling = "static"
            while not self._stopping.is_set():
                self._serve_static(self._take(self.options.max_batch_size, wait=True))
            return
        batch = RunningBatch(self.engine)
        while not self._stopping.is_set():
            try:
                self._admit(batch, self._take(self.options.max_batch_size - len(batch), wait=not batch))
                self._drop_cancelled(batch)
                if batch:
                    rows = len(batch)
                    updates = batch.step()
                    self._count(rows=rows, sized=True, running=len(batch), decode_steps=1)
                    self._deliver(updates)
            except Exception as error:  # noqa: BLE001 - the running rows fail; the worker goes on
                log.exception("decode step failed")
                running, batch = batch.sequences, RunningBatch(self.engine)  # the failed batch's state is unknown
                self._count(running=0)
                for sequence in running:
                    self._fail(sequence.key, error)

    def _take(self, room: int, wait: bool) -> list[Job]:
        """Up to `room` queued jobs; with `wait`, the first is waited for and gets `batch_wait_s` of company."""
        jobs: list[Job] = []
        if room <= 0:
            return jobs
        if wait:
            try:
                jobs.append(self._queue.get(timeout=0.2))
            except queue.Empty:
                return jobs
            deadline = time.monotonic() + self.options.batch_wait_s
            while len(jobs) < room:
                try:
                    jobs.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
        while len(jobs) < room:
            try:
                jobs.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return jobs

    def _prepare(self, job: Job) -> Prompt:
        prompt = self.engine.prepare(job.request)
        context, used = self.engine.max_positions, len(prompt.input_ids)
        if job.max_tokens is None:
            job.max_new_tokens = self.options.default_max_tokens if not context else \
                min(self.options.default_max_tokens, context - used)
        elif context and used + job.max_tokens > context:
            raise ContextLengthError(
                f"this model's maximum context length is {context} tokens; the request has {used} prompt tokens "
                f"(images included) and asks for {job.max_tokens} completion tokens")
        else:
            job.max_new_tokens = job.max_tokens
        return prompt

    def _fail(self, job: Job, error: Exception) -> None:
        self._count(failed=1)
        job.emit("error", error)

    def _done(self, job: Job, result: Result) -> None:
        self._count(completed=1)
        job.emit("done", result)

    def _count(self, *, rows: int | None = None, sized: bool = False, running: int | None = None,
               **increments: int) -> None:
        """Add to counters; `rows`: a batch of that many rows ran (`sized`: count it by size); `running`: rows now."""
        with self._lock:
            for name, amount in increments.items():
                setattr(self.stats, name, getattr(self.stats, name) + amount)
            if rows is not None:
                self.stats.largest_batch = max(self.stats.largest_batch, rows)
                if sized:
                    self.stats.batch_sizes[rows] = self.stats.batch_sizes.get(rows, 0) + 1
            if running is not None:
                self.stats.running = running

    # ---------------------------------------------------------------- continuous: join, deliver, leave

    def _admit(self, batch: RunningBatch, jobs: list[Job]) -> None:
        """Prepare each job on its own (a bad one fails alone), then prefill the good ones into the batch."""
        sequences = []
        for job in jobs:
            if job.cancelled.is_set():
                self._count(cancelled=1)
                continue
            try:
                prompt = self._prepare(job)
                settings = replace(job.settings, max_new_tokens=job.max_new_tokens)
                sequences.append(batch.sequence(job, prompt, settings, show=job.stream))
            except Exception as error:  # noqa: BLE001 - a request that cannot be prepared fails alone
                if not isinstance(error, EngineError):
                    log.exception("preparing a request failed")
                self._fail(job, error)
                continue
            if job.stream:
                self._count(streams=1)
                job.emit("start")
        if not sequences:
            return
        rows = len(batch) + len(sequences)
        try:
            updates = batch.join(sequences)
        except Exception as error:  # noqa: BLE001 - only the joining jobs fail; the running batch is untouched
            log.exception("prefill failed")
            for sequence in sequences:
                self._fail(sequence.key, error)
            return
        self._count(rows=rows, running=len(batch), generate_calls=1)
        log.info("%d request(s) joined; %d running", len(sequences), len(batch))
        self._deliver(updates)

    def _deliver(self, updates: list[Update]) -> None:
        for update in updates:
            job = update.sequence.key
            if job.stream and update.piece:
                job.emit("piece", update.piece)
            if update.result is not None:
                self._done(job, update.result)

    def _drop_cancelled(self, batch: RunningBatch) -> None:
        gone = [s.key for s in batch.sequences if s.key.cancelled.is_set()]
        if gone:
            batch.leave(gone)
            self._count(running=len(batch), cancelled=len(gone))

    # ---------------------------------------------------------------- static: groups through Engine.generate

    def _serve_static(self, jobs: list[Job]) -> None:
        for group in self._groups(jobs):
            try:
                self._run_stream(group[0]) if group[0].stream else self._run_batch(group)
            except Exception as error:  # noqa: BLE001 - a failed job must not stop the worker
                log.exception("generation failed")
                for job in group:
                    if not job.finished:
                        self._fail(job, error)

    @staticmethod
    def _groups(jobs: list[Job]) -> list[list[Job]]:
        groups: dict[Any, list[Job]] = {}
        for index, job in enumerate(jobs):
            key = job.batch_key()
            groups.setdefault(("alone", index) if key is None else key, []).append(job)
        return list(groups.values())

    def _run_batch(self, jobs: list[Job]) -> None:
        ready: list[tuple[Job, Prompt]] = []
        for job in jobs:
            if job.cancelled.is_set():
                self._count(cancelled=1)
                continue
            try:
                ready.append((job, self._prepare(job)))
            except EngineError as error:
                self._fail(job, error)
        if not ready:
            return
        settings = replace(ready[0][0].settings, max_new_tokens=max(job.max_new_tokens for job, _ in ready))
        results = self.engine.generate([prompt for _, prompt in ready], settings)
        self._count(rows=len(ready), sized=True, generate_calls=1)
        log.info("batch of %d request(s), up to %d new tokens", len(ready), settings.max_new_tokens)
        for (job, _), result in zip(ready, results):
            self._done(job, cut_to_limit(result, job.max_new_tokens, self.engine.detokenize))

    def _run_stream(self, job: Job) -> None:
        """One streaming answer; a client that leaves is noticed at the next text piece."""
        if job.cancelled.is_set():
            self._count(cancelled=1)
            return
        try:
            prompt = self._prepare(job)
        except EngineError as error:
            self._fail(job, error)
            return
        self._count(streams=1)
        job.emit("start")
        stream = self.engine.stream(prompt, replace(job.settings, max_new_tokens=job.max_new_tokens))
        for piece in stream:
            if job.cancelled.is_set():
                self._count(cancelled=1)
                return
            job.emit("piece", piece)
        self._done(job, stream.result)
