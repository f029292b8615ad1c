"""Serving latency and throughput of the OpenAI-compatible API, measured through the `openai` client.

    python bench/serve_latency.py                      # the tiny model (built in a temporary folder), CPU or GPU
    python bench/serve_latency.py --model runs/finetune --max-tokens 256
    python bench/serve_latency.py --quick              # code-path check: 8 tokens, 1 repeat

Starts `mlcd_vl.serve.api` in this process (uvicorn in a thread, a free loopback port) and measures, for one
question about the bundled picture:

- one streaming request at a time: time to first token (TTFT) and decode tokens/s after the first token
  (median of `--repeats` runs);
- `--concurrency` requests at once (non-streaming, greedy): aggregate completion tokens/s, next to the same
  requests sent one after another, and how the server batched them (from `/metrics`).

Writes `bench/results/serve_latency_<machine>_<YYYY-MM-DD>.md`. Timings, never assertions.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import common  # bench/ is on sys.path: the script's own folder

RESULTS = common.RESULTS


@dataclass
class StreamTiming:
    ttft_s: float
    decode_tokens_per_s: float
    prompt_tokens: int
    completion_tokens: int


@dataclass
class LoadTiming:
    wall_s: float
    completion_tokens: int
    batches: int
    largest_batch: int

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s


def start_server(engine, name: str, max_batch_size: int):
    """uvicorn in a daemon thread; returns (base_url, server)."""
    import uvicorn

    from mlcd_vl.serve.api import ServerOptions, create_app
    from mlcd_vl.serve.batcher import BatcherOptions

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(engine, ServerOptions(name, batcher=BatcherOptions(max_batch_size=max_batch_size)))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def messages_about_demo_image(question: str) -> list[dict]:
    from mlcd_vl.assets import DEMO_IMAGE

    url = "data:image/png;base64," + base64.b64encode(DEMO_IMAGE.read_bytes()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def time_stream(client, name: str, messages: list[dict], max_tokens: int) -> StreamTiming:
    start = time.perf_counter()
    first = last = None
    usage = None
    for chunk in client.chat.completions.create(model=name, messages=messages, max_tokens=max_tokens, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
        if chunk.usage:
            usage = chunk.usage
    tokens = usage.completion_tokens
    first, last = first or time.perf_counter(), last or time.perf_counter()
    decode = (tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan")
    return StreamTiming(first - start, decode, usage.prompt_tokens, tokens)


def time_load(client, base: str, name: str, messages: list[list[dict]], max_tokens: int,
              concurrent: bool) -> LoadTiming:
    import httpx

    before = httpx.get(base + "/metrics").json()

    def ask(conversation):
        return client.chat.completions.create(model=name, messages=conversation, max_tokens=max_tokens,
                                              temperature=0).usage.completion_tokens

    start = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(len(messages)) as pool:
            tokens = sum(pool.map(ask, messages))
    else:
        tokens = sum(ask(conversation) for conversation in messages)
    wall = time.perf_counter() - start
    after = httpx.get(base + "/metrics").json()
    return LoadTiming(wall, tokens, after["generate_calls"] - before["generate_calls"], after["largest_batch"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="HF-native folder (default: build the tiny model)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own; 1 keeps a loaded machine from stalling the "
                             "parallel regions, see bench/README.md)")
    parser.add_argument("--quick", action="store_true", help="8 tokens, 1 repeat: checks the code path only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.max_tokens, args.repeats = min(args.max_tokens, 8), 1

    import openai
    import torch
    from transformers.utils import logging as hf_logging

    from mlcd_vl.model.tiny import build_tiny_vlm
    from mlcd_vl.serve.engine import Engine

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.model or build_tiny_vlm(Path(scratch))
        engine = Engine.from_pretrained(folder, device=args.device)
        name = "bench"
        base, server = start_server(engine, name, max_batch_size=args.concurrency)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
        question = messages_about_demo_image("What shapes and colours are in this picture?")
        time_stream(client, name, question, 4)  # warm-up
        streams = [time_stream(client, name, question, args.max_tokens) for _ in range(args.repeats)]
        batch = [messages_about_demo_image(f"Question {i}: what is in this picture?") for i in range(args.concurrency)]
        sequential = time_load(client, base, name, batch, args.max_tokens, concurrent=False)
        concurrent = time_load(client, base, name, batch, args.max_tokens, concurrent=True)
        server.should_exit = True
        model_label = "tiny (random weights, built by mlcd_vl.model.tiny)" if args.model is None else str(args.model)

    machine = common.machine_name()
    ttft = statistics.median(s.ttft_s for s in streams)
    decode = statistics.median(s.decode_tokens_per_s for s in streams)
    lines = [
        f"# Serving latency: {machine}, {datetime.date.today().isoformat()}", "",
        f"- model: {model_label}; device {engine.device}, dtype {engine.model.dtype}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads",
        f"- request: the bundled 320x240 picture + a question, greedy, max_tokens {args.max_tokens}, "
        f"{streams[0].prompt_tokens} prompt tokens (visual tokens included)",
        f"- through the `openai` client against `mlcd_vl.serve.api` on loopback; {args.repeats} streaming runs "
        f"(median); `{' '.join(['python bench/serve_latency.py', *(sys.argv[1:] if argv is None else argv)])}`",
        f"- {platform.processor() or platform.machine()}, load average before the run {load_before:.2f} "
        "(other work on the machine makes these numbers noisy)", "",
        "| measure | value |", "|---|---|",
        f"| time to first token (1 streaming request) | {ttft * 1000:.1f} ms |",
        f"| decode speed after the first token (1 request) | {decode:.1f} tokens/s |",
        f"| {args.concurrency} requests one after another | {sequential.tokens_per_s:.1f} tokens/s "
        f"({sequential.completion_tokens} tokens in {sequential.wall_s:.2f} s) |",
        f"| {args.concurrency} concurrent requests | {concurrent.tokens_per_s:.1f} tokens/s "
        f"({concurrent.completion_tokens} tokens in {concurrent.wall_s:.2f} s; {concurrent.batches} generate "
        f"call(s), largest batch {concurrent.largest_batch}) |", "",
    ] + (["_--quick: a code-path check; the numbers mean nothing._", ""] if args.quick else [])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serve_latency_{machine}_{datetime.date.today().isoformat()}.md"
    path.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
