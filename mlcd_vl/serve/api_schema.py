"""The wire format of the OpenAI-compatible API: request models, response and chunk objects, and error bodies.

Requests are validated with pydantic; fields that OpenAI defines but this server does not use (presence_penalty,
user, ...) are accepted and ignored, and features that would change the answer's shape (`n` > 1, tools, logprobs)
are refused with a 400. Every error has OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`;
`as_api_error` maps the engine's errors to it (a request the engine cannot serve is a 400, anything else a 500).
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from mlcd_vl.serve.requests import Result


class APIError(Exception):
    """An error answered to the client as OpenAI-style JSON with an HTTP status."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None

    def unsupported(self) -> APIError | None:
        empty = next((i for i, m in enumerate(self.messages) if m.content is None), None)
        if empty is not None:  # OpenAI allows it only beside tool calls, which this server does not take
            where = f"messages.{empty}.content"
            return APIError(400, f"{where}: a {self.messages[empty].role} message needs content (text or parts)",
                            param=where)
        if self.n != 1:
            return APIError(400, "only n=1 is supported", param="n")
        if self.logprobs:
            return APIError(400, "logprobs are not supported", param="logprobs")
        if self.tools:
            return APIError(400, "tools are not supported", param="tools")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            return APIError(400, "at most 4 stop sequences", param="stop")
        return None

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def engine_messages(self) -> list[dict]:
        """Messages as the engine reads them (OpenAI parts kept; `developer` is a system turn)."""
        return [{"role": "system" if m.role == "developer" else m.role,
                 "content": m.content if not isinstance(m.content, list)
                 else [part.model_dump(exclude_none=True) for part in m.content]} for m in self.messages]


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(result: Result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.total_tokens}


def completion(ident: str, model: str, result: Result) -> dict:
    """A `chat.completion` object."""
    return {"id": ident, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": None, "finish_reason": result.finish_reason}],
            "usage": usage(result)}


def chunk(ident: str, model: str, created: int, *, delta: dict | None = None, finish_reason: str | None = None,
          result_usage: dict | None = None) -> dict:
    """A `chat.completion.chunk` object; with `result_usage` it is the final usage-only chunk (no choices)."""
    body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None}
    if result_usage is not None:
        body.update(choices=[], usage=result_usage)
    else:
        body["choices"] = [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]
    return body


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "mlcd-vl"}


async def read_body(http, limit: int) -> bytes:
    """The request body, refused with a 413 once it grows past `limit` bytes."""
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    body = bytearray()
    async for piece in http.stream():
        body += piece
        if len(body) > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    return bytes(body)


def as_api_error(error: BaseException) -> APIError:
    """The client's view of an error raised while serving its request."""
    from mlcd_vl.serve.batcher import ContextLengthError
    from mlcd_vl.serve.requests import EngineError

    if isinstance(error, APIError):
        return error
    if isinstance(error, ContextLengthError):
        return APIError(400, str(error), param="messages", code="context_length_exceeded")
    if isinstance(error, EngineError):
        return APIError(400, str(error), param="messages")
    return APIError(500, f"internal error: {type(error).__name__}: {error}", kind="server_error")
