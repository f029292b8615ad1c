"""The API's batcher and image intake in-process: a full queue answers 429, jobs are grouped by settings, rows are
cut to each job's own limit, and remote images are fetched only when allowed (with size limits and timeouts)."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
from dataclasses import replace

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from mlcd_vl.assets import DEMO_IMAGE  # noqa: E402
from mlcd_vl.serve.api import ServerOptions, create_app  # noqa: E402
from mlcd_vl.serve.api_schema import APIError  # noqa: E402
from mlcd_vl.serve.batcher import Batcher, BatcherOptions, Job, cut_to_limit  # noqa: E402
from mlcd_vl.serve.engine import Engine  # noqa: E402
from mlcd_vl.serve.requests import GenerationSettings, Request  # noqa: E402
from mlcd_vl.serve.intake import image_bytes  # noqa: E402




@pytest.fixture(scope="module")
def engine(tiny_vlm_dir) -> Engine:
    return Engine.from_pretrained(tiny_vlm_dir, device="cpu")


class ImageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/slow.png":
            time.sleep(3)
        if self.path == "/redirect.png":
            self.send_response(302)
            self.send_header("Location", "/demo.png")
            self.end_headers()
            return
        if self.path in ("/demo.png", "/slow.png"):
            data = DEMO_IMAGE.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_remote_images_only_when_allowed(image_server):
    url = f"{image_server}/demo.png"
    with pytest.raises(APIError, match="--allow-remote-urls"):
        image_bytes(url, ServerOptions("m"), "messages[0].content[0]")
    public_only = ServerOptions("m", allow_remote_urls=True, remote_timeout_s=1.0)
    with pytest.raises(APIError, match="non-public address 127.0.0.1.*--allow-private-urls"):
        image_bytes(url, public_only, "x")  # the test server is on loopback: refused by default
    for internal in ("http://169.254.169.254/latest/meta-data", "http://10.0.0.1/a.png", "http://[::1]/a.png"):
        with pytest.raises(APIError, match="non-public address"):
            image_bytes(internal, public_only, "x")
    allowed = replace(public_only, allow_private_urls=True)
    assert image_bytes(url, allowed, "x") == DEMO_IMAGE.read_bytes()
    with pytest.raises(APIError, match="redirects are not followed"):
        image_bytes(f"{image_server}/redirect.png", allowed, "x")
    with pytest.raises(APIError, match="larger than 100 bytes"):
        image_bytes(url, replace(allowed, max_image_bytes=100), "x")
    with pytest.raises(APIError, match="cannot fetch"):
        image_bytes(f"{image_server}/missing.png", allowed, "x")
    with pytest.raises(APIError, match="cannot fetch"):
        image_bytes(f"{image_server}/slow.png", replace(allowed, remote_timeout_s=0.3), "x")
    with pytest.raises(APIError, match="data: URL or an http"):
        image_bytes(str(DEMO_IMAGE), allowed, "x")  # server files are never read


def test_cut_to_limit_and_grouping(engine):
    request = Request([{"role": "user", "content": "Describe the picture."}])
    long = engine.generate([request], GenerationSettings(max_new_tokens=12))[0]
    short = engine.generate([request], GenerationSettings(max_new_tokens=5))[0]
    assert cut_to_limit(long, 5, engine.detokenize) == short
    assert cut_to_limit(short, 12, engine.detokenize) is short

    loop = asyncio.new_event_loop()
    try:
        def job(stream=False, **settings) -> Job:
            return Job(request, GenerationSettings(**settings), None, stream, loop, events=None)

        jobs = [job(), job(temperature=0.5), job(max_new_tokens=3), job(seed=1), job(stream=True), job(seed=1),
                job(temperature=0.5, stop=["x"])]
        groups = Batcher._groups(jobs)
    finally:
        loop.close()
    assert [[jobs.index(j) for j in group] for group in groups] == [[0, 2], [1], [3], [4], [5], [6]]


class GatedEngine:
    """The tiny engine, but `generate` waits for the test to open the gate (to fill the queue on purpose)."""

    def __init__(self, engine: Engine):
        self._engine, self.entered, self.gate = engine, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, *args, **kwargs):
        self.entered.set()
        assert self.gate.wait(60)
        return self._engine.generate(*args, **kwargs)


def test_full_queue_answers_429_and_remote_images_flow(engine, image_server):
    gated = GatedEngine(engine)
    gated.gate.set()
    options = ServerOptions("m", allow_remote_urls=True, allow_private_urls=True, max_request_bytes=100_000,
                            batcher=BatcherOptions(max_batch_size=1, max_queue=1, batch_wait_s=0.0))
    app = create_app(gated, options)
    batcher: Batcher = app.state.batcher
    batcher.start()

    def body(content) -> dict:
        return {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 3, "temperature": 0}

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            remote = await client.post("/v1/chat/completions", json=body(
                [{"type": "image_url", "image_url": {"url": f"{image_server}/demo.png"}},
                 {"type": "text", "text": "What is it?"}]))
            assert remote.status_code == 200, remote.text
            local = engine.prepare(Request([{"role": "user", "content": "<image>\nWhat is it?"}], [DEMO_IMAGE]))
            assert remote.json()["usage"]["prompt_tokens"] == len(local.input_ids)

            gated.gate.clear()
            gated.entered.clear()
            first = asyncio.create_task(client.post("/v1/chat/completions", json=body("one")))
            while not gated.entered.is_set():  # the worker holds the first request
                await asyncio.sleep(0.01)
            second = asyncio.create_task(client.post("/v1/chat/completions", json=body("two")))
            while batcher.snapshot()["queue_depth"] < 1:  # the second waits in the queue
                await asyncio.sleep(0.01)
            third = await client.post("/v1/chat/completions", json=body("three"))
            assert third.status_code == 429
            assert third.json()["error"]["code"] == "queue_full" and third.headers["retry-after"] == "1"
            gated.gate.set()
            replies = await asyncio.gather(first, second)
            assert [r.status_code for r in replies] == [200, 200]
            huge = await client.post("/v1/chat/completions", content=b"x" * (options.max_request_bytes + 1))
            assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
            metrics = (await client.get("/metrics")).json()
            assert metrics["rejected_queue_full"] == 1 and metrics["completed"] == 3

    try:
        asyncio.run(scenario())
    finally:
        gated.gate.set()
        batcher.close()


def test_servers_bind_loopback_by_default():
    import argparse

    from mlcd_vl.serve import api, web

    for module in (api, web):
        parser = argparse.ArgumentParser()
        module.configure_parser(parser)
        assert parser.parse_args(["--model", "m"]).host == "127.0.0.1"
    parser = argparse.ArgumentParser()
    api.configure_parser(parser)
    args = parser.parse_args(["--model", "m"])
    assert (args.port, args.max_batch_size, args.max_queue, args.allow_remote_urls) == (8000, 8, 64, False)
    assert (args.allow_private_urls, args.scheduling) == (False, "continuous")


def test_api_key_is_required_when_set(engine):
    options = ServerOptions("m", api_key="s3cret", batcher=BatcherOptions(max_batch_size=2))
    app = create_app(engine, options)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            assert (await client.get("/health")).status_code == 200  # probes need no key
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
                for path in ("/v1/models", "/metrics"):
                    denied = await client.get(path, headers=headers)
                    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
                    assert denied.headers["www-authenticate"] == "Bearer"
            ok = await client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "m"

    asyncio.run(scenario())
