"""One worker thread that owns the engine and serves queued jobs, batching concurrent ones into one `generate`.

The HTTP handlers never touch the engine: they put a `Job` on a bounded queue (a full queue is refused at once with
`QueueFull`) and await its events. The worker takes the first waiting job, gathers whatever else arrives within a
few milliseconds up to `max_batch_size`, and groups the gathered jobs:

- non-streaming jobs with the same decoding settings (temperature, top-p, stop strings ...) share one left-padded
  `Engine.generate` call; each job's own `max_tokens` is honoured by cutting its row (greedy rows equal batch-1 rows,
  so the cut row is exactly what the job alone would get);
- streaming jobs, and jobs with a `seed` (whose sampling must not depend on their neighbours), run alone.

Each job is prepared on its own first (render, tokenize, images), so one bad request fails alone, with an
`EngineError` that the server answers as a 400; the others of its batch go on.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from mlcd_vl.serve.engine import Engine, EngineError, GenerationSettings, Prompt, Request, Result

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
        """Jobs with equal keys may share a generate call; None runs alone."""
        if self.stream or self.settings.seed is not None:
            return None
        return tuple(vars(replace(self.settings, max_new_tokens=1)).items())


@dataclass
class BatcherOptions:
    max_batch_size: int = 8
    max_queue: int = 64
    batch_wait_s: float = 0.005  # how long the first job waits for company
    default_max_tokens: int = 512  # used when a request gives no max_tokens (capped by the context)

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class BatcherStats:
    requests: int = 0
    completed: int = 0
    failed: int = 0
    rejected_queue_full: int = 0
    cancelled: int = 0  # the client left before its answer was complete
    generate_calls: int = 0
    streams: int = 0
    largest_batch: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)


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
        self.stats = BatcherStats()
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
        with self._lock:
            self.stats.streams += 1
        job.emit("start")
        stream = self.engine.stream(prompt, replace(job.settings, max_new_tokens=job.max_new_tokens))
        for piece in stream:
            if job.cancelled.is_set():
                self._count_cancelled()
                return
            job.emit("piece", piece)
        self._done(job, stream.result)
