"""Generation requests and results: settings, conversations with images, and how images are referenced.

A request is a conversation (LLaVA `from/value` or OpenAI `role/content` turns; user content is a string with
`<image>` placeholders, or a list of OpenAI-style parts with `image_url` / `image` entries). `flatten_messages`
turns it into text turns plus the images in prompt order. Remote `http(s)` image URLs are refused here: the
server decides separately whether an operator allows fetching them.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field

from PIL import Image

from mlcd_vl.errors import UsageError
from mlcd_vl.vocab import IMAGE_PLACEHOLDER
from mlcd_vl.model import multimodal, pixels

ImageSource = Image.Image | str | os.PathLike | bytes


class EngineError(UsageError, ValueError):
    """A request the engine cannot serve; the message says which part is wrong."""


@dataclass
class GenerationSettings:
    """Decoding settings for one `generate` / `stream` call.

    `temperature` 0 means greedy. `top_k` 0 and `top_p` 1.0 disable those filters. `repetition_penalty` None takes the
    checkpoint's value (1.0 when it has none); like upstream's generate-from-embeddings it only sees generated
    tokens, not the prompt. `stop` strings are added to the template's own; generation ends at the first one and
    the text is cut before it.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float | None = 1.0
    stop: tuple[str, ...] | list[str] = ()
    seed: int | None = None
    use_cache: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise EngineError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise EngineError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise EngineError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        self.stop = tuple(self.stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Request:
    """One conversation to continue. `images` fill the `<image>` placeholders of string contents, in order; a
    conversation without placeholders gets one `<image>\\n` per image in front of its first user turn (as lmms-eval
    does for upstream). Images given as content parts are placed where the part is."""

    messages: list[dict]
    images: list[ImageSource] = field(default_factory=list)


@dataclass
class Prompt:
    """A rendered, tokenized request: `input_ids` already hold one image token per visual token."""

    text: str
    input_ids: list[int]
    images: list[multimodal.ImageInput]


@dataclass
class Result:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (stop token or stop string) or "length"
    token_ids: list[int] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def load_image_source(source: ImageSource) -> Image.Image:
    """A PIL image from a PIL image, a path, raw bytes, a `file://` URL or a base64 `data:` URL (RGB).

    A PIL image is only converted to RGB: it is decoded already (the API server decodes each image once, under its
    own pixel limit), and the pixel limit guards decoding."""
    if isinstance(source, Image.Image):
        return pixels.load_rgb(source, max_pixels=source.width * source.height)
    if isinstance(source, str):
        if source.startswith("data:"):
            header, _, payload = source.partition(",")
            if ";base64" not in header:
                raise EngineError("data: image URLs must be base64-encoded")
            try:
                return pixels.load_rgb(base64.b64decode(payload, validate=False))
            except (ValueError, TypeError) as error:
                raise EngineError(f"cannot decode data: image URL ({error})") from error
        if source.startswith("file://"):
            source = source[len("file://"):]
        elif source.startswith(("http://", "https://")):
            raise EngineError(f"{source}: remote image URLs are not fetched; pass a file path or a data: URL")
    return pixels.load_rgb(source)


def _part_image(part: dict) -> ImageSource:
    """The image of an OpenAI (`image_url`) or transformers-style (`image`) content part."""
    if part.get("type") == "image_url":
        value = part.get("image_url")
        value = value.get("url") if isinstance(value, dict) else value
    else:
        value = next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)
    if value is None:
        raise EngineError(f"image content part without an image: {sorted(part)}")
    return value


def flatten_messages(request: Request) -> tuple[list[dict], list[ImageSource]]:
    """Turns as `{"role", "content": str}` with `<image>` placeholders, and the images in placeholder order."""
    given = list(request.images)
    turns, images = [], []
    placeholders = 0
    for index, turn in enumerate(request.messages):
        if not isinstance(turn, dict):
            raise EngineError(f"message {index} is not an object")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if isinstance(content, list):
            pieces = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    pieces.append(str(part.get("text", "")))
                elif kind in ("image", "image_url"):
                    pieces.append(IMAGE_PLACEHOLDER + "\n")
                    images.append(_part_image(part))
                else:
                    raise EngineError(f"message {index}: unsupported content part {part!r:.80}")
            content = "".join(pieces)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise EngineError(f"message {index}: content must be a string or a list of parts")
        else:
            count = content.count(IMAGE_PLACEHOLDER)
            images.extend(given[placeholders:placeholders + count])
            placeholders += count
        turns.append({"role": role, "content": content})
    if given and placeholders == 0:
        first_user = next((t for t in turns if str(t["role"]).lower() in ("user", "human")), None)
        if first_user is None:
            raise EngineError("images were given but the conversation has no user turn")
        first_user["content"] = (IMAGE_PLACEHOLDER + "\n") * len(given) + first_user["content"]
        images = given + images
    elif placeholders != len(given):
        raise EngineError(f"the conversation has {placeholders} <image> placeholder(s) in its text but "
                          f"{len(given)} image(s) were given")
    return turns, images
