"""`mlcd-vl serve` end to end: a server subprocess on a free loopback port, driven by the official `openai` client.

Answers are compared with the engine run in this process (same checkpoint, greedy), so the server is known to use
the checkpoint's template, the image, the token limits and batching without changing any answer.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from mlcd_vl.assets import DEMO_IMAGE  # noqa: E402
from mlcd_vl.serve.engine import Engine  # noqa: E402
from mlcd_vl.serve.requests import GenerationSettings, Request  # noqa: E402

NAME = "tiny-vlm"
SERVER_LOG: dict[str, Path] = {}  # "path": the module's server log (the server runs at --log-level info)




def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_url(image: Image.Image | bytes, kind: str = "png") -> str:
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format=kind.upper())
        image = buffer.getvalue()
    return f"data:image/{kind};base64," + base64.b64encode(image).decode()


@pytest.fixture(scope="module")
def model_dir(tiny_vlm_dir) -> Path:
    return tiny_vlm_dir


@pytest.fixture(scope="module")
def engine(model_dir) -> Engine:
    return Engine.from_pretrained(model_dir, device="cpu")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve-log") / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "mlcd_vl.serve.api", "--model", str(model_dir), "--port", str(port),
               "--served-model-name", NAME, "--max-batch-size", "8", "--batch-wait-ms", "30",
               "--max-image-pixels", "1000000", "--log-level", "info"]
    SERVER_LOG["path"] = log_path
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not come up:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def user(*parts) -> list[dict]:
    content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image_url", "image_url": {"url": p[0]}}
               for p in parts]
    return [{"role": "user", "content": content}]


def test_models_and_plain_answer(client, engine):
    assert [m.id for m in client.models.list().data] == [NAME]
    reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello there"}],
                                           max_tokens=8, temperature=0)
    expected = engine.generate([Request([{"role": "user", "content": "Hello there"}])],
                               GenerationSettings(max_new_tokens=8))[0]
    assert reply.object == "chat.completion" and reply.model == NAME
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (expected.prompt_tokens,
                                                                          expected.completion_tokens)
    assert reply.usage.total_tokens == expected.total_tokens


def test_image_input_stream_and_usage(client, engine):
    image = Image.open(DEMO_IMAGE)
    messages = user((data_url(image),), "What colour is the circle?")
    reply = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=12, temperature=0)
    expected = engine.generate([Request([{"role": "user", "content": "<image>\nWhat colour is the circle?"}],
                                        [image])], GenerationSettings(max_new_tokens=12))[0]
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == expected.prompt_tokens > 100  # the visual tokens are counted
    assert reply.usage.completion_tokens == expected.completion_tokens

    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].usage.completion_tokens == expected.completion_tokens
    assert chunks[-1].usage.prompt_tokens == expected.prompt_tokens


def test_raw_sse_ends_with_done(server):
    body = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_stop_seed_and_limits(client, engine):
    messages = [{"role": "user", "content": "Describe the picture."}]
    full = engine.generate([Request(messages)], GenerationSettings(max_new_tokens=24))[0]
    stop = next(full.text[i:i + 2] for i in range(1, len(full.text) - 1) if full.text[i:i + 2].isalpha())
    cut = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == full.text[:full.text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model=NAME, messages=messages, max_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    sampled = [client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=1.0,
                                              seed=7).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_a_client_leaving_a_stream_stops_its_generation(client, server):
    body = {"model": NAME, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 2000,
            "temperature": 0, "stream": True}  # about a minute of tokens if nobody stopped it
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert [next(lines) for _ in range(3)][2].startswith("data: ")  # the answer has begun
    deadline = time.monotonic() + 30
    while httpx.get(server + "/metrics").json()["cancelled"] < 1:
        assert time.monotonic() < deadline, "the worker kept generating for a client that left"
        time.sleep(0.1)
    reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.usage.completion_tokens >= 1


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, server):
    big = Image.new("RGB", (1200, 1000), "white")  # 1.2 M pixels > --max-image-pixels 1000000
    cases = {
        "bad base64": user(("data:image/png;base64,@@not-base64@@",), "hi"),
        "not an image": user((data_url(b"this is plain text, not a picture"),), "hi"),
        "oversized image": user((data_url(big, "jpeg"),), "hi"),
        "remote url": user(("https://example.com/cat.png",), "hi"),
        "local path": user(("file:///etc/passwd",), "hi"),
        "unknown role": [{"role": "robot", "content": "hi"}],
        "null content": [{"role": "user", "content": None}],
        "audio part": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": ""}}]}],
        "long prompt": [{"role": "user", "content": "red " * 33000}],
    }
    for label, messages in cases.items():
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=NAME, messages=messages, max_tokens=4)
        error = caught.value.body
        assert error["message"] and error["type"] == "invalid_request_error", (label, error)
        if label == "remote url":
            assert "--allow-remote-urls" in error["message"]
        if label == "oversized image":
            assert error["code"] == "image_too_large"
        if label == "not an image":  # the reason, not a Python object's repr
            assert "not a known image format" in error["message"] and "object at 0x" not in error["message"]
        if label == "null content":
            assert error["param"] == "messages.0.content" and "needs content" in error["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=40000)
    assert caught.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as caught:  # a stream that cannot start is refused before it does
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=40000,
                                       stream=True)
    assert caught.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], n=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], temperature=-1)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "model_not_found"
    for raw in (b'{"model": "tiny-vlm", "messages": [', b"[1, 2]", b'{"model": "tiny-vlm"}'):
        response = httpx.post(server + "/v1/chat/completions", content=raw, timeout=30,
                              headers={"content-type": "application/json"})
        assert response.status_code == 400 and response.json()["error"]["message"], raw
    reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.usage.completion_tokens >= 1
    log = SERVER_LOG["path"].read_text()  # the operator sees why each request was refused
    assert "POST /v1/chat/completions -> 400 messages.0.content: a user message needs content" in log
    assert "-> 404 the model 'gpt-4o' does not exist" in log and "not a known image format" in log


def test_unknown_paths_and_methods_answer_in_the_openai_error_shape(server):
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405),
                                 ("DELETE", "/v1/models", 405), ("POST", "/", 404)):
        response = httpx.request(method, server + path, timeout=30)
        assert response.status_code == status, (method, path)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert path in error["message"], error
    assert "-> 405 GET is not allowed on /v1/chat/completions" in SERVER_LOG["path"].read_text()


def test_a_busy_port_fails_at_once_without_a_serving_line(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "mlcd_vl.serve.api", "--model", str(model_dir), "--port",
                               str(port)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    assert f"cannot serve on 127.0.0.1:{port}: the port is in use (choose another --port)" in done.stderr
    assert "serving" not in done.stdout + done.stderr.replace("cannot serve", "")
    assert "Traceback" not in done.stderr


def test_concurrent_requests_are_batched(client, engine, server):
    before = httpx.get(server + "/metrics").json()
    questions = [f"Question {i}: what is the value of bar {i}?" + " and more" * i for i in range(8)]
    limits = [4 + i for i in range(8)]  # different max_tokens share one batch; each row is cut to its own
    answers: list = [None] * 8
    barrier = threading.Barrier(8)

    def ask(index: int) -> None:
        barrier.wait()
        answers[index] = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": questions[index]}], max_tokens=limits[index],
            temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    after = httpx.get(server + "/metrics").json()
    assert after["completed"] - before["completed"] == 8
    assert after["largest_batch"] >= 2, after  # requests really shared a generate call
    assert after["generate_calls"] - before["generate_calls"] < 8, after
    for question, limit, answer in zip(questions, limits, answers):
        alone = engine.generate([Request([{"role": "user", "content": question}])],
                                GenerationSettings(max_new_tokens=limit))[0]
        assert answer.choices[0].message.content == alone.text
        assert answer.usage.completion_tokens == alone.completion_tokens
        assert answer.choices[0].finish_reason == alone.finish_reason
