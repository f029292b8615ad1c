"""One worker thread that owns the engine and serves queued jobs, batching concurrent ones.

The HTTP handlers never touch the engine: they put a `Job` on a bounded queue (a full queue is refused at once with
`QueueFull`) and await its events ("start" for a stream, "piece"s, then "done" or "error"). Two ways to batch:

- `continuous` (the default): iteration-level batching (`continuous.py`, `running_batch.py`). Jobs join a running
  batch between decode steps and leave it the moment they finish or their client goes; every job keeps its own
  `max_tokens`, stop strings, temperature / top-p and seed, streaming jobs get each piece as it is decoded, and
  greedy answers equal the job run alone.
- `static`: the worker takes the first waiting job, gathers whatever else arrives within `batch_wait_s` up to
  `max_batch_size`, and groups them: non-streaming jobs with the same decoding settings share one left-padded
  `Engine.generate` call (each job's own `max_tokens` is honoured by cutting its row); streaming jobs and jobs with
  a `seed` run alone. The others of a group wait until its longest answer is done. It uses only transformers'
  public `generate`, so it is also the fallback for models whose KV cache the running batch cannot splice
  (sliding-window or quantized caches), and what `max_batch_size` 1 runs (nothing to batch: the engine's own
  `generate` / `stream` per job).

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

from mlcd_vl.serve import running_batch
from mlcd_vl.serve.continuous import ContinuousLoop
from mlcd_vl.serve.engine import Engine, EngineError, GenerationSettings, Prompt, Request, Result

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

    def _continuous(self) -> bool:
        """Whether the worker runs continuous batching (asked on its start: it looks at the model's cache)."""
        if self.options.scheduling != "continuous" or self.options.max_batch_size == 1:
            return False
        if not running_batch.supported(self.engine):
            log.warning("this model's KV cache cannot be spliced row by row; serving with static batching")
            return False
        return True

    def close(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._lock:
                self.stats.rejected_queue_full += 1
            raise QueueFull(f"the server queue is full ({self.options.max_queue} waiting requests); "
                            "retry shortly") from None
        with self._lock:
            self.stats.requests += 1

    def snapshot(self) -> dict:
        with self._lock:
            stats = dict(vars(self.stats), batch_sizes=dict(self.stats.batch_sizes))
        return dict(stats, queue_depth=self._queue.qsize(), max_batch_size=self.options.max_batch_size,
                    max_queue=self.options.max_queue)

    # ---------------------------------------------------------------- worker

    def _work(self) -> None:
        if self._continuous():
            ContinuousLoop(self).run(self._stopping)
            return
        with self._lock:
            self.stats.scheduling = "static"
        while not self._stopping.is_set():
            try:
                jobs = [self._queue.get(timeout=0.2)]
            except queue.Empty:
                continue
            deadline = time.monotonic() + self.options.batch_wait_s
            while len(jobs) < self.options.max_batch_size:
                try:
                    jobs.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
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
        with self._lock:
            self.stats.failed += 1
        job.emit("error", error)

    def _done(self, job: Job, result: Result) -> None:
        with self._lock:
            self.stats.completed += 1
        job.emit("done", result)

    def _run_batch(self, jobs: list[Job]) -> None:
        ready: list[tuple[Job, Prompt]] = []
        for job in jobs:
            if job.cancelled.is_set():
                self._count_cancelled()
                continue
            try:
                ready.append((job, self._prepare(job)))
            except EngineError as error:
                self._fail(job, error)
        if not ready:
            return
        settings = replace(ready[0][0].settings, max_new_tokens=max(job.max_new_tokens for job, _ in ready))
        results = self.engine.generate([prompt for _, prompt in ready], settings)
        with self._lock:
            self.stats.generate_calls += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(ready))
            self.stats.batch_sizes[len(ready)] = self.stats.batch_sizes.get(len(ready), 0) + 1
        log.info("batch of %d request(s), up to %d new tokens", len(ready), settings.max_new_tokens)
        decode = self.engine._text
        for (job, _), result in zip(ready, results):
            self._done(job, cut_to_limit(result, job.max_new_tokens, decode))

    def _count_cancelled(self) -> None:
        with self._lock:
            self.stats.cancelled += 1

    def _count_stream(self) -> None:
        with self._lock:
            self.stats.streams += 1

    def _count_join(self, rows: int, running: int) -> None:
        """A prefill brought the running batch to `rows` rows; `running` of them go on (the others finished)."""
        with self._lock:
            self.stats.generate_calls += 1
            self.stats.largest_batch = max(self.stats.largest_batch, rows)
            self.stats.running = running

    def _count_step(self, rows: int, running: int) -> None:
        with self._lock:
            self.stats.decode_steps += 1
            self.stats.largest_batch = max(self.stats.largest_batch, rows)
            self.stats.batch_sizes[rows] = self.stats.batch_sizes.get(rows, 0) + 1
            self.stats.running = running

    def _set_running(self, rows: int) -> None:
        with self._lock:
            self.stats.running = rows

    def _run_stream(self, job: Job) -> None:
        """One streaming answer; a client that leaves is noticed at the next text piece."""
        if job.cancelled.is_set():
            self._count_cancelled()
            return
        try:
            prompt = self._prepare(job)
        except EngineError as error:
            self._fail(job, error)
            return
        self._count_stream()
        job.emit("start")
        stream = self.engine.stream(prompt, replace(job.settings, max_new_tokens=job.max_new_tokens))
        for piece in stream:
            if job.cancelled.is_set():
                self._count_cancelled()
                return
            job.emit("piece", piece)
        self._done(job, stream.result)
