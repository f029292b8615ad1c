"""Continuous batching on the tiny random model (float32): rows that join and leave a running batch between decode
steps give exactly the answers their requests get alone, streams come piece by piece while batched with others,
a cancelled row frees its place, bad requests fail alone, and a full queue still answers 429."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from PIL import Image, ImageDraw

from mlcd_vl.assets import DEMO_IMAGE
from mlcd_vl.serve.batcher import Batcher, BatcherOptions, ContextLengthError, Job
from mlcd_vl.serve.engine import Engine
from mlcd_vl.serve.requests import EngineError, GenerationSettings, Request, Result
from mlcd_vl.serve.decode import RunningBatch


pytestmark = pytest.mark.timeout(300)  # a scheduling bug must fail a test, never hang the suite


@pytest.fixture(scope="module")
def engine(tiny_vlm_dir) -> Engine:
    return Engine.from_pretrained(tiny_vlm_dir, device="cpu")


def picture(width: int, height: int, colour: str) -> Image.Image:
    image = Image.new("RGB", (width, height), colour)
    ImageDraw.Draw(image).ellipse((width // 6, height // 6, width // 2, height // 2), fill=(20, 40, 220))
    return image


def ask(text: str, *images) -> Request:
    return Request([{"role": "user", "content": "<image>\n" * len(images) + text}], list(images))


REQUESTS = [ask("What colour is the circle?", Image.open(DEMO_IMAGE)), ask("Hello there"),
            ask("How many bars are there in this chart? Write a short answer.", picture(40, 120, "green")),
            ask("Describe the picture.", picture(200, 50, "yellow"), picture(100, 100, "white")),
            ask("Which shape is largest? Answer in one word, then explain.")]


def alone(engine: Engine, request: Request, settings: GenerationSettings) -> Result:
    return engine.generate([request], settings)[0]


def a_stop_in(text: str) -> str:
    """Two letters from the middle of an answer: a stop string that really occurs in it."""
    return next(text[i:i + 2] for i in range(len(text) // 2, len(text) - 1) if text[i:i + 2].isalpha())


def run_to_the_end(batch: RunningBatch, schedule: dict[int, list[tuple]]) -> dict:
    """Step the batch; at step n the entries of schedule[n] join. Returns {key: (result, pieces)}."""
    results, pieces = {}, {}
    step = 0
    while len(batch) or any(n >= step for n in schedule):
        joining = [batch.sequence(key, batch.engine.prepare(request), settings, show=True)
                   for key, request, settings in schedule.get(step, [])]
        updates = batch.join(joining) + batch.step() if joining else batch.step()
        for update in updates:
            pieces.setdefault(update.sequence.key, []).append(update.piece)
            if update.result is not None:
                results[update.sequence.key] = update.result
        step += 1
    assert batch.cache is None and batch.width == 0  # every row left and took its cache with it
    return {key: (results[key], "".join(pieces[key])) for key in results}


def test_rows_joining_at_different_steps_equal_each_request_alone(engine):
    settings = [GenerationSettings(max_new_tokens=n) for n in (20, 31, 9, 26, 14)]
    full = alone(engine, REQUESTS[1], settings[1])
    settings[1] = GenerationSettings(max_new_tokens=31, stop=[a_stop_in(full.text)])  # a stop string, per row
    settings[4] = GenerationSettings(max_new_tokens=14, repetition_penalty=1.4)  # greedy with its own penalty
    expected = [alone(engine, request, s) for request, s in zip(REQUESTS, settings)]
    assert expected[1].finish_reason == "stop" and expected[1].text == full.text[:full.text.find(settings[1].stop[0])]
    assert expected[0].finish_reason == "length"

    schedule = {0: [(0, REQUESTS[0], settings[0])], 3: [(1, REQUESTS[1], settings[1]), (2, REQUESTS[2], settings[2])],
                7: [(3, REQUESTS[3], settings[3])], 12: [(4, REQUESTS[4], settings[4])]}
    got = run_to_the_end(RunningBatch(engine), schedule)
    for key, want in enumerate(expected):
        result, streamed = got[key]
        assert result.token_ids == want.token_ids, key
        assert (result.text, result.finish_reason, result.completion_tokens, result.prompt_tokens) == \
               (want.text, want.finish_reason, want.completion_tokens, want.prompt_tokens), key
        assert streamed == want.text, key  # the pieces of every row concatenate to its answer


def test_a_leaving_row_frees_its_cache_and_the_others_continue(engine):
    settings = GenerationSettings(max_new_tokens=16)
    batch = RunningBatch(engine)
    keys = ["short", "images", "text"]
    requests = [REQUESTS[1], REQUESTS[3], REQUESTS[4]]
    batch.join([batch.sequence(k, engine.prepare(r), settings, show=False) for k, r in zip(keys, requests)])
    batch.step()
    widest = batch.width
    assert widest == max(len(engine.prepare(r).input_ids) for r in requests) + 1
    batch.leave(["images"])  # the longest prompt leaves: its padding columns go with it
    assert len(batch) == 2 and batch.cache.layers[0].keys.shape[0] == 2
    assert batch.width == max(len(engine.prepare(r).input_ids) for r in (requests[0], requests[2])) + 1 < widest
    results = {}
    while len(batch):
        results.update({u.sequence.key: u.result for u in batch.step() if u.result is not None})
    assert set(results) == {"short", "text"}
    for key, request in (("short", requests[0]), ("text", requests[2])):
        assert results[key].token_ids == alone(engine, request, settings).token_ids


def test_a_seeded_row_samples_the_same_whatever_its_neighbours(engine):
    seeded = GenerationSettings(max_new_tokens=18, temperature=1.0, top_p=0.9, seed=7)
    want = alone(engine, REQUESTS[0], seeded)
    greedy = GenerationSettings(max_new_tokens=12)
    others = GenerationSettings(max_new_tokens=20, temperature=0.8)  # unseeded sampling beside it
    state = torch.random.get_rng_state()
    schedule = {0: [("greedy", REQUESTS[2], greedy), ("other", REQUESTS[4], others)],
                2: [("seeded", REQUESTS[0], seeded), ("other2", REQUESTS[1], others)]}
    got = run_to_the_end(RunningBatch(engine), schedule)
    assert got["seeded"][0].token_ids == want.token_ids  # its own generator draws what seed 7 alone draws
    assert got["greedy"][0].token_ids == alone(engine, REQUESTS[2], greedy).token_ids
    torch.random.set_rng_state(state)


# ------------------------------------------------------------------------------------------------ the worker


def job(request: Request, max_tokens: int | None, stream: bool = False, **settings) -> Job:
    return Job(request, GenerationSettings(**settings), max_tokens, stream, asyncio.get_running_loop())


async def answer(job: Job) -> tuple[list[str], Result | Exception]:
    pieces = []
    while True:
        kind, payload = await job.events.get()
        if kind == "piece":
            pieces.append(payload)
        elif kind in ("done", "error"):
            return pieces, payload


async def until(condition, timeout: float = 60.0) -> None:
    """Wait for a condition on the worker's metrics; fail instead of hanging."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def serve(engine: Engine, scenario, **options) -> dict:
    """Run an async scenario against a started batcher; returns its metrics at the end."""
    batcher = Batcher(engine, BatcherOptions(**options))
    batcher.start()
    try:
        asyncio.run(scenario(batcher))
        return batcher.snapshot()
    finally:
        batcher.close()


def test_streams_batch_with_other_requests_and_each_keeps_its_limits(engine):
    stop = a_stop_in(alone(engine, REQUESTS[4], GenerationSettings(max_new_tokens=24)).text)
    plan = [(REQUESTS[0], 12, True, {}), (REQUESTS[1], 20, False, {}), (REQUESTS[2], 7, True, {}),
            (REQUESTS[3], 15, False, {"stop": ["zz"]}), (REQUESTS[4], 24, True, {"stop": [stop]})]
    replies = {}

    async def scenario(batcher):
        jobs = [job(request, limit, stream, **extra) for request, limit, stream, extra in plan]
        for one in jobs:
            batcher.submit(one)
        replies.update(enumerate(await asyncio.gather(*(answer(one) for one in jobs))))

    metrics = serve(engine, scenario, max_batch_size=8, batch_wait_s=0.2)
    assert metrics["scheduling"] == "continuous" and metrics["streams"] == 3
    assert metrics["largest_batch"] == 5 and metrics["completed"] == 5 and metrics["running"] == 0
    for index, (request, limit, stream, extra) in enumerate(plan):
        want = alone(engine, request, GenerationSettings(max_new_tokens=limit, **extra))
        pieces, result = replies[index]
        assert result.token_ids == want.token_ids and result.finish_reason == want.finish_reason, index
        assert result.text == want.text
        if stream:
            assert "".join(pieces) == want.text and len(pieces) > 1, index
        else:
            assert pieces == []
    assert replies[4][1].finish_reason == "stop"  # its own stop string ended it, not its neighbours'


def test_requests_join_a_batch_that_is_already_running(engine):
    replies = {}
    limits = {"first": 40, "second": 10, "third": 25}

    async def scenario(batcher):
        first = job(REQUESTS[1], limits["first"], stream=True)
        batcher.submit(first)
        assert (await first.events.get())[0] == "start"
        assert (await first.events.get())[0] == "piece"  # it is decoding now
        later = {name: job(REQUESTS[i], limits[name]) for name, i in (("second", 0), ("third", 3))}
        for one in later.values():
            batcher.submit(one)
        done = await asyncio.gather(answer(first), *(answer(one) for one in later.values()))
        replies.update(zip(["first", *later], done))

    metrics = serve(engine, scenario, max_batch_size=4, batch_wait_s=0.0)
    assert metrics["generate_calls"] >= 2 and metrics["largest_batch"] >= 2, metrics  # joined, not queued behind
    assert replies["first"][1].completion_tokens == limits["first"]
    for name, index in (("first", 1), ("second", 0), ("third", 3)):
        want = alone(engine, REQUESTS[index], GenerationSettings(max_new_tokens=limits[name]))
        assert replies[name][1].token_ids == want.token_ids, name


def test_a_cancelled_request_frees_its_row_and_the_others_finish(engine):
    replies = {}

    async def scenario(batcher):
        endless = job(REQUESTS[1], 3000, stream=True)
        others = [job(REQUESTS[0], 30), job(REQUESTS[2], 30, stream=True)]
        for one in (endless, *others):
            batcher.submit(one)
        assert (await endless.events.get())[0] == "start"
        assert (await endless.events.get())[0] == "piece"
        endless.cancelled.set()  # what the API does when a client goes away
        replies.update(enumerate(await asyncio.gather(*(answer(one) for one in others))))
        await until(lambda: batcher.snapshot()["running"] == 0 and batcher.snapshot()["cancelled"] == 1)
        assert not endless.finished

    metrics = serve(engine, scenario, max_batch_size=8, batch_wait_s=0.2)
    assert metrics["cancelled"] == 1 and metrics["completed"] == 2 and metrics["running"] == 0
    assert metrics["decode_steps"] < 500  # it did not keep decoding for the client that left
    for index, request in ((0, REQUESTS[0]), (1, REQUESTS[2])):
        assert replies[index][1].token_ids == alone(engine, request, GenerationSettings(max_new_tokens=30)).token_ids


def test_a_bad_request_fails_alone(engine):
    replies = {}

    async def scenario(batcher):
        jobs = [job(REQUESTS[0], 8), job(Request([{"role": "user", "content": "<image>\nno image given"}]), 8),
                job(REQUESTS[2], 40000), job(REQUESTS[4], 8, stream=True)]
        for one in jobs:
            batcher.submit(one)
        replies.update(enumerate(await asyncio.gather(*(answer(one) for one in jobs))))

    metrics = serve(engine, scenario, max_batch_size=8, batch_wait_s=0.2)
    assert isinstance(replies[1][1], EngineError) and isinstance(replies[2][1], ContextLengthError)
    assert metrics["failed"] == 2 and metrics["completed"] == 2
    for index, request in ((0, REQUESTS[0]), (3, REQUESTS[4])):
        assert replies[index][1].token_ids == alone(engine, request, GenerationSettings(max_new_tokens=8)).token_ids


def test_a_full_queue_answers_429_while_the_batch_is_full(engine):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from mlcd_vl.serve.api import ServerOptions, create_app

    app = create_app(engine, ServerOptions("m", batcher=BatcherOptions(max_batch_size=2, max_queue=1,
                                                                       batch_wait_s=0.0)))
    batcher: Batcher = app.state.batcher
    batcher.start()

    def body(text: str, max_tokens: int) -> dict:
        return {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                "temperature": 0}

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            endless = []
            for rows, text in enumerate(("Hello there", "Describe the picture."), start=1):
                # one at a time: with max_queue 1 a second request sent before the worker took the first is a 429
                endless.append(asyncio.create_task(client.post("/v1/chat/completions", json=body(text, 5000))))
                await until(lambda: batcher.snapshot()["running"] == rows)  # noqa: B023 - awaited at once
            # both rows decode (they stay until their clients leave): the batch is full
            waiting = asyncio.create_task(client.post("/v1/chat/completions", json=body("one more", 4)))
            await until(lambda: batcher.snapshot()["queue_depth"] == 1)
            refused = await client.post("/v1/chat/completions", json=body("and another", 4))
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
            for task in endless:  # their clients give up: the rows leave and the waiting request gets its turn
                task.cancel()
            await asyncio.gather(*endless, return_exceptions=True)
            reply = await asyncio.wait_for(waiting, 60)
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4

    try:
        asyncio.run(scenario())
    finally:
        batcher.close()
    metrics = batcher.snapshot()
    assert metrics["rejected_queue_full"] == 1 and metrics["cancelled"] == 2 and metrics["completed"] == 1
    assert metrics["largest_batch"] == 2 and metrics["decode_steps"] < 4000


def test_a_failing_step_fails_the_running_jobs_and_the_worker_goes_on(engine, monkeypatch):
    real_step, calls = RunningBatch.step, []

    def step_that_fails_once(self):
        calls.append(len(self))
        if len(calls) == 3:
            raise RuntimeError("out of memory, say")
        return real_step(self)

    monkeypatch.setattr(RunningBatch, "step", step_that_fails_once)
    replies = []

    async def scenario(batcher):
        first = [job(REQUESTS[1], 20), job(REQUESTS[2], 20, stream=True)]
        for one in first:
            batcher.submit(one)
        replies.extend(await asyncio.gather(*(answer(one) for one in first)))
        after = job(REQUESTS[4], 5)
        batcher.submit(after)
        replies.append(await answer(after))

    metrics = serve(engine, scenario, max_batch_size=8, batch_wait_s=0.2)
    assert [type(r[1]) for r in replies[:2]] == [RuntimeError, RuntimeError]
    assert replies[2][1].token_ids == alone(engine, REQUESTS[4], GenerationSettings(max_new_tokens=5)).token_ids
    assert metrics["failed"] == 2 and metrics["completed"] == 1 and metrics["running"] == 0


@pytest.mark.parametrize("options", [{"scheduling": "static"}, {"max_batch_size": 1}])
def test_static_batching_remains_for_one_row_or_on_request(engine, options):
    replies = []

    async def scenario(batcher):
        one = job(REQUESTS[2], 6)
        batcher.submit(one)
        replies.append(await answer(one))

    metrics = serve(engine, scenario, **options)
    assert metrics["scheduling"] == "static" and metrics["decode_steps"] == 0
    assert replies[0][1].token_ids == alone(engine, REQUESTS[2], GenerationSettings(max_new_tokens=6)).token_ids
