"""`mlcd-vl serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the serving engine.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions` (images as `image_url` parts holding base64 `data:` URLs;
`stream: true` answers with server-sent `chat.completion.chunk` events ending in `data: [DONE]`), `GET /metrics`
(queue and batching counters, JSON) and `GET /health`. Example:

    mlcd-vl serve --model runs/finetune --port 8000
    openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").chat.completions.create(...)

The server binds 127.0.0.1 unless told otherwise and has no authentication: put a proxy in front of it before
exposing it. Concurrent non-streaming requests are batched into one engine call (see `batcher.py`); a full queue
answers 429. Remote `http(s)` image URLs are refused unless `--allow-remote-urls` (then fetched with a size limit
and a timeout); local paths and `file://` URLs are always refused. Every bad request gets a 4xx with an OpenAI-style
error body, and the server goes on serving.
"""

import argparse
import asyncio
import base64
import binascii
import io
import json
import logging
import sys
import time
import urllib.error
import urllib.request
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mlcd_vl.serve.api_schema import APIError, as_api_error, read_body

if TYPE_CHECKING:
    from mlcd_vl.serve.batcher import BatcherOptions

log = logging.getLogger("mlcd_vl.serve")


@dataclass
class ServerOptions:
    served_model_name: str
    allow_remote_urls: bool = False
    max_image_pixels: int = 4096 * 4096
    max_image_bytes: int = 20 * 1024 * 1024
    remote_timeout_s: float = 10.0
    max_request_bytes: int = 64 * 1024 * 1024
    batcher: "BatcherOptions | None" = None  # None: the batcher's defaults (imported late: it loads torch)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="HF-native model folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="the `model` clients send (default: folder name)")
    parser.add_argument("--allow-remote-urls", action="store_true", help="fetch http(s) image URLs")
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests per engine call")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a request waits for company")
    parser.add_argument("--default-max-tokens", type=int, default=512, help="when a request sets no max_tokens")
    parser.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="largest width*height accepted")
    parser.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024, help="largest image file")
    parser.add_argument("--remote-timeout", type=float, default=10.0, help="seconds to fetch a remote image")
    parser.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


# ------------------------------------------------------------------------------------------------ images

def fetch_remote(url: str, options: ServerOptions) -> bytes:
    """GET an image with a total deadline and a size limit."""
    deadline = time.monotonic() + options.remote_timeout_s
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "mlcd-vl"}),
                                    timeout=options.remote_timeout_s) as response:
            data = bytearray()
            while piece := response.read(65536):
                data += piece
                if len(data) > options.max_image_bytes:
                    raise APIError(400, f"{url}: the image is larger than {options.max_image_bytes} bytes")
                if time.monotonic() > deadline:
                    raise APIError(400, f"{url}: fetching took longer than {options.remote_timeout_s} s")
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise APIError(400, f"cannot fetch {url}: {getattr(error, 'reason', error)}") from error
    return bytes(data)


def image_bytes(url: str, options: ServerOptions, where: str) -> bytes:
    """The checked bytes of one `image_url`: decoded, an image, not too large."""
    from PIL import Image

    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or ";base64" not in header:
            raise APIError(400, f"{where}: image data URLs must be base64 (data:image/png;base64,...)", param=where)
        payload = "".join(payload.split())
        if len(payload) * 3 // 4 > options.max_image_bytes:
            raise APIError(400, f"{where}: the image is larger than {options.max_image_bytes} bytes", param=where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: the image data URL is not valid base64", param=where) from None
    elif url.startswith(("http://", "https://")):
        if not options.allow_remote_urls:
            raise APIError(400, f"{where}: remote image URLs are not fetched by this server; send the image as a "
                                "base64 data URL (data:image/png;base64,...), or start the server with "
                                "--allow-remote-urls", param=where, code="remote_urls_disabled")
        data = fetch_remote(url, options)
    else:
        raise APIError(400, f"{where}: image_url must be a base64 data: URL"
                            + (" or an http(s) URL" if options.allow_remote_urls else ""), param=where)
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        raise APIError(400, f"{where}: the image has too many pixels", param=where, code="image_too_large") from None
    except Exception as error:  # noqa: BLE001 - PIL raises many kinds for garbage input
        raise APIError(400, f"{where}: not a readable image ({error})", param=where, code="invalid_image") from None
    if width * height > options.max_image_pixels:
        raise APIError(400, f"{where}: the image is {width}x{height} pixels; this server accepts at most "
                            f"{options.max_image_pixels} pixels", param=where, code="image_too_large")
    return data


def resolve_images(messages: list[dict], options: ServerOptions) -> list[dict]:
    """Replace every `image_url` part by an `image` part holding checked bytes (runs in a worker thread)."""
    for m, message in enumerate(messages):
        if not isinstance(message["content"], list):
            continue
        for p, part in enumerate(message["content"]):
            if part["type"] == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                where = f"messages[{m}].content[{p}]"
                if not url:
                    raise APIError(400, f"{where}: image_url part without a url", param=where)
                message["content"][p] = {"type": "image", "image": image_bytes(url, options, where)}
    return messages


# ------------------------------------------------------------------------------------------------ app

def create_app(engine, options: ServerOptions):
    """The FastAPI app; its batcher thread starts and stops with the app's lifespan."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import ValidationError
    from starlette.concurrency import run_in_threadpool

    from mlcd_vl.serve import api_schema as schema
    from mlcd_vl.serve.batcher import Batcher, Job, QueueFull
    from mlcd_vl.serve.engine import EngineError, GenerationSettings
    from mlcd_vl.serve.engine import Request as EngineRequest

    batcher = Batcher(engine, options.batcher)
    started = int(time.time())
    name = options.served_model_name

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        await run_in_threadpool(batcher.close)

    app = FastAPI(title="mlcd-vl", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(APIError)
    async def api_error(_request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return batcher.snapshot()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [schema.model_card(name, started)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != name:
            raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return schema.model_card(name, started)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        try:
            body = json.loads(await read_body(http, options.max_request_bytes))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise APIError(400, f"the request body is not valid JSON ({error})") from None
        try:
            request = schema.ChatCompletionRequest.model_validate(body)
        except ValidationError as error:
            first = max(error.errors(), key=lambda e: len(e["loc"]))  # the most specific of a union's errors
            where = ".".join(str(part) for part in first["loc"])
            raise APIError(400, f"{where or 'body'}: {first['msg']}", param=where or None) from None
        if request.model != name:
            raise APIError(404, f"the model {request.model!r} does not exist; this server serves {name!r}",
                           param="model", code="model_not_found")
        if (problem := request.unsupported()) is not None:
            raise problem
        messages = await run_in_threadpool(resolve_images, request.engine_messages(), options)
        try:
            settings = GenerationSettings(
                temperature=1.0 if request.temperature is None else request.temperature,
                top_p=1.0 if request.top_p is None else request.top_p, stop=request.stop_strings, seed=request.seed)
        except EngineError as error:
            raise APIError(400, str(error)) from None
        job = Job(EngineRequest(messages), settings, request.completion_limit, request.stream,
                  asyncio.get_running_loop())
        try:
            batcher.submit(job)
        except QueueFull as error:
            raise APIError(429, str(error), kind="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        try:
            kind, payload = await job.events.get()
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        if kind == "error":
            raise as_api_error(payload)
        ident = schema.completion_id()
        if not request.stream:
            return schema.completion(ident, name, payload)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return StreamingResponse(sse_events(job, ident, include_usage), media_type="text/event-stream")

    async def sse_events(job: Job, ident: str, include_usage: bool):
        created = int(time.time())

        def event(data: dict) -> str:
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        try:
            yield event(schema.chunk(ident, name, created, delta={"role": "assistant", "content": ""}))
            while True:
                kind, payload = await job.events.get()
                if kind == "piece":
                    yield event(schema.chunk(ident, name, created, delta={"content": payload}))
                elif kind == "done":
                    yield event(schema.chunk(ident, name, created, finish_reason=payload.finish_reason))
                    if include_usage:
                        yield event(schema.chunk(ident, name, created, result_usage=schema.usage(payload)))
                    break
                else:
                    yield event(as_api_error(payload).body())
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # the client left, or the answer is complete: either way the worker may stop

    return app


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from transformers.utils import logging as hf_logging

    from mlcd_vl.model.checkpoint import CheckpointError
    from mlcd_vl.serve.batcher import BatcherOptions
    from mlcd_vl.serve.engine import Engine

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        options = ServerOptions(
            served_model_name=args.served_model_name or Path(args.model).resolve().name,
            allow_remote_urls=args.allow_remote_urls, max_image_pixels=args.max_image_pixels,
            max_image_bytes=args.max_image_bytes, remote_timeout_s=args.remote_timeout,
            max_request_bytes=max(64 * 1024 * 1024, 2 * args.max_image_bytes),  # room for base64 images
            batcher=BatcherOptions(args.max_batch_size, args.max_queue, args.batch_wait_ms / 1000,
                                   args.default_max_tokens))
        engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    except (CheckpointError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: this API has no authentication; anyone who can reach the port can use the model",
                    args.host)
    log.info("serving %s as %r on http://%s:%d/v1", args.model, options.served_model_name, args.host, args.port)
    uvicorn.run(create_app(engine, options), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="mlcd-vl serve", description=__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_parser(_parser)
    sys.exit(run(_parser.parse_args()))
