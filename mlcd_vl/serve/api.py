"""`mlcd-vl serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the serving engine.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions` (images as `image_url` parts holding base64 `data:` URLs;
`stream: true` answers with server-sent `chat.completion.chunk` events ending in `data: [DONE]`), `GET /metrics`
(queue and batching counters, JSON) and `GET /health`. Example:

    mlcd-vl serve --model runs/finetune --port 8000
    openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").chat.completions.create(...)

The server binds 127.0.0.1 unless told otherwise. With `--api-key` (or `MLCD_VL_API_KEY`) every `/v1` and
`/metrics` request must carry `Authorization: Bearer <key>` (what OpenAI clients send); `/health` stays open.
Concurrent requests, streaming or not, share the model through continuous batching (`batcher.py`: rows join and
leave the running batch between decode steps); a full queue answers 429. Images: base64 `data:` URLs; remote
`http(s)` URLs only with `--allow-remote-urls`, and then public hosts only, no redirects, a size limit and a
deadline (`intake.py`); local paths and `file://` URLs are always refused. Every bad request gets a 4xx with an
OpenAI-style error body (unknown paths and methods too), its reason goes to the server log, and the server goes on
serving. The port is bound before the model loads, so a busy port fails at once, before any "serving" line.
"""

import argparse
import asyncio
import hmac
import json
import logging
import os
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mlcd_vl.serve.api_schema import APIError, as_api_error, read_body
from mlcd_vl.serve.intake import IntakeOptions, resolve_images

if TYPE_CHECKING:
    from mlcd_vl.serve.batcher import BatcherOptions

log = logging.getLogger("mlcd_vl.serve")


@dataclass
class ServerOptions(IntakeOptions):
    """What the HTTP layer needs; the image intake settings come from `IntakeOptions` (keyword-only)."""

    served_model_name: str
    max_request_bytes: int = 64 * 1024 * 1024
    api_key: str | None = None  # None: no authentication (loopback binding is the protection)
    batcher: "BatcherOptions | None" = None  # None: the batcher's defaults (imported late: it loads torch)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF-native model folder or hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="the `model` clients send (default: folder name)")
    parser.add_argument("--api-key", default=os.environ.get("MLCD_VL_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 and /metrics (default: $MLCD_VL_API_KEY; "
                             "unset: no authentication)")
    parser.add_argument("--allow-remote-urls", action="store_true", help="fetch http(s) image URLs (public hosts)")
    parser.add_argument("--allow-private-urls", action="store_true",
                        help="with --allow-remote-urls: also loopback, private and link-local addresses")
    parser.add_argument("--max-batch-size", type=int, default=8, help="rows in the running batch")
    parser.add_argument("--scheduling", choices=("continuous", "static"), default="continuous",
                        help="continuous: requests join the running batch between decode steps; static: one "
                             "generate call per group of waiting requests")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a request waits for company")
    parser.add_argument("--default-max-tokens", type=int, default=512, help="when a request sets no max_tokens")
    parser.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="largest width*height accepted")
    parser.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024, help="largest image file")
    parser.add_argument("--remote-timeout", type=float, default=10.0, help="seconds to fetch a remote image")
    parser.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


# ------------------------------------------------------------------------------------------------ app

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def create_app(engine, options: ServerOptions):
    """The FastAPI app; its batcher thread starts and stops with the app's lifespan."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import ValidationError
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from mlcd_vl.serve import api_schema as schema
    from mlcd_vl.serve.batcher import Batcher, Job, QueueFull
    from mlcd_vl.serve.requests import EngineError, GenerationSettings
    from mlcd_vl.serve.requests import Request as EngineRequest

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

    def answer(http: Request, error: APIError) -> JSONResponse:
        if error.status < 500:  # the client's mistake: the operator still sees why it was refused
            log.info("%s %s -> %d %s", http.method, http.url.path, error.status, error.message)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def api_error(http: Request, error: APIError):
        return answer(http, error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(http: Request, error: StarletteHTTPException):  # unknown path (404), wrong method (405)
        if error.status_code == 404:
            message = (f"no endpoint {http.url.path}; this server has /v1/models, /v1/chat/completions, /metrics "
                       "and /health")
        elif error.status_code == 405:
            message = f"{http.method} is not allowed on {http.url.path}"
        else:
            message = str(error.detail)
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return answer(http, APIError(error.status_code, message, kind=kind, code=_HTTP_CODES.get(error.status_code),
                                     headers=dict(error.headers or {})))

    @app.middleware("http")
    async def authenticate(http: Request, call_next):
        if options.api_key and http.url.path != "/health":
            scheme, _, given = http.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                      options.api_key.encode()):
                error = APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return answer(http, error)
        return await call_next(http)

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
    from mlcd_vl.errors import UsageError
    from mlcd_vl.model.sources import model_source
    from mlcd_vl.serve.ports import bind

    model_source(args.model, "--model")  # a mistyped folder is answered before torch and transformers load
    sock = bind(args.host, args.port)  # and a busy port before the model loads

    import uvicorn
    from transformers.utils import logging as hf_logging

    from mlcd_vl.serve.batcher import BatcherOptions
    from mlcd_vl.serve.engine import Engine

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        try:
            batcher = BatcherOptions(args.max_batch_size, args.max_queue, args.batch_wait_ms / 1000,
                                     args.default_max_tokens, scheduling=args.scheduling)
        except ValueError as error:  # a batching option out of range
            raise UsageError(str(error)) from None
        options = ServerOptions(
            served_model_name=args.served_model_name or Path(args.model).resolve().name,
            allow_remote_urls=args.allow_remote_urls, allow_private_urls=args.allow_private_urls,
            api_key=args.api_key or None, max_image_pixels=args.max_image_pixels,
            max_image_bytes=args.max_image_bytes, remote_timeout_s=args.remote_timeout,
            max_request_bytes=max(64 * 1024 * 1024, 2 * args.max_image_bytes),  # room for base64 images
            batcher=batcher)
        engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    except BaseException:  # the port is let go whatever stopped the start
        sock.close()
        raise
    if args.host not in ("127.0.0.1", "localhost", "::1") and not options.api_key:
        log.warning("binding %s without --api-key: anyone who can reach the port can use the model", args.host)
    log.info("serving %s as %r on http://%s:%d/v1", args.model, options.served_model_name, args.host, args.port)
    config = uvicorn.Config(create_app(engine, options), host=args.host, port=args.port, log_level=args.log_level)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="mlcd-vl serve", description=__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_parser(_parser)
    from mlcd_vl.errors import run_reporting

    _args = _parser.parse_args()
    sys.exit(run_reporting("mlcd-vl serve", lambda: run(_args)))
