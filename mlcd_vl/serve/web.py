"""`mlcd-vl web`: a Gradio chat demo: upload images, ask, follow up; answers stream in as they are generated.

    mlcd-vl web --model runs/finetune [--host 127.0.0.1 --port 7860]

The page has a chat box that takes text and images (upload or drag and drop, several per message, any turn), a
settings panel (temperature, top-p, max new tokens) and an example with the bundled picture. The whole
conversation, images included, is rendered with the checkpoint's own template and image mode by the serving engine,
so the demo's prompt is the training prompt. One engine serves every visitor, one answer at a time.
"""

from __future__ import annotations

import argparse
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mlcd_vl.assets import DEMO_IMAGE, DEMO_QUESTION

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class WebDefaults:
    temperature: float = 0.2
    top_p: float = 0.95
    max_new_tokens: int = 512


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF-native model folder or hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--title", default=None, help="page title (default: the model folder's name)")
    parser.add_argument("--temperature", type=float, default=WebDefaults.temperature, help="initial temperature")
    parser.add_argument("--top-p", type=float, default=WebDefaults.top_p, help="initial top-p")
    parser.add_argument("--max-new-tokens", type=int, default=WebDefaults.max_new_tokens, help="initial maximum")
    parser.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))


def _pieces(content: Any) -> list[tuple[str, str]]:
    """("text", str) and ("image", path) pieces of one Gradio message content, whatever shape Gradio gave it."""
    if content is None:
        return []
    if isinstance(content, (list, tuple)):
        return [piece for item in content for piece in _pieces(item)]
    if isinstance(content, str):
        return [("text", content)]
    if isinstance(content, dict):
        if content.get("type") == "text":
            return [("text", str(content.get("text", "")))]
        file = content.get("file") if content.get("type") == "file" else content
        path = file.get("path") if isinstance(file, dict) else getattr(file, "path", None)
        if path and str(path).lower().endswith(IMAGE_SUFFIXES):
            return [("image", str(path))]
        return []  # other files (and components) are not shown to the model
    path = getattr(content, "path", None)
    return [("image", str(path))] if path and str(path).lower().endswith(IMAGE_SUFFIXES) else []


def to_request(message: dict | str, history: list[dict]):
    """An engine Request from the new multimodal message and Gradio's history (consecutive turns of one role are
    merged; each image becomes an `<image>` placeholder where it appears, its path filling it)."""
    from mlcd_vl.serve.requests import Request

    turns: list[dict] = []
    images: list[str] = []
    new = message if isinstance(message, dict) else {"text": message, "files": []}
    new_content = [{"path": f if isinstance(f, str) else f.get("path")} for f in new.get("files") or []]
    entries = list(history) + [{"role": "user", "content": new_content + [new.get("text") or ""]}]
    for entry in entries:
        role = entry.get("role") if isinstance(entry, dict) else getattr(entry, "role", None)
        content = entry.get("content") if isinstance(entry, dict) else getattr(entry, "content", None)
        text = ""
        for kind, value in _pieces(content):
            if kind == "image" and role == "user":
                text += "<image>\n"
                images.append(value)
            elif kind == "text":
                text += value.replace("<image>", "< image >")  # typed placeholders would break the image count
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += ("\n" if text and turns[-1]["content"] else "") + text
        else:
            turns.append({"role": role, "content": text})
    return Request(turns, images)


def make_responder(engine):
    """The Gradio chat function: yields the growing answer; one generation at a time across all visitors."""
    import gradio as gr

    from mlcd_vl.model.pixels import ImageError
    from mlcd_vl.serve.requests import EngineError, GenerationSettings

    lock = threading.Lock()

    def respond(message, history, temperature, top_p, max_new_tokens) -> Iterator[str]:
        try:
            request = to_request(message, history or [])
            settings = GenerationSettings(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                          top_p=float(top_p))
        except EngineError as error:
            raise gr.Error(str(error)) from error
        with lock:
            answer = ""
            try:
                for piece in engine.stream(request, settings):
                    answer += piece
                    yield answer
            except (EngineError, ImageError) as error:
                raise gr.Error(str(error)) from error
            if not answer:
                yield "(empty answer: the model stopped at once)"

    return respond


def build_demo(engine, title: str, defaults: WebDefaults | None = None):
    """The Gradio app (a ChatInterface with a multimodal box, a settings accordion and the bundled example)."""
    import gradio as gr

    defaults = defaults or WebDefaults()

    settings = [
        gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature (0 = greedy)"),
        gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p"),
        gr.Slider(1, 4096, value=defaults.max_new_tokens, step=1, label="Max new tokens"),
    ]
    description = (f"{engine.settings.image_mode} images, template `{engine.settings.template}`. Attach images "
                   "with the clip button or drop them in the box; ask follow-up questions in the same chat.")
    return gr.ChatInterface(
        make_responder(engine), multimodal=True, title=title, description=description,
        chatbot=gr.Chatbot(label="Conversation", height=520),
        textbox=gr.MultimodalTextbox(file_types=["image"], file_count="multiple",
                                     placeholder="Ask about an image (attach one with the clip)..."),
        additional_inputs=settings, additional_inputs_accordion=gr.Accordion("Settings", open=False),
        examples=[[{"text": DEMO_QUESTION, "files": [str(DEMO_IMAGE)]}, defaults.temperature, defaults.top_p,
                   min(defaults.max_new_tokens, 128)]],
        cache_examples=False, concurrency_limit=1, flagging_mode="never", fill_height=True, analytics_enabled=False)


def run(args: argparse.Namespace) -> int:
    import os

    from mlcd_vl.errors import UserError
    from mlcd_vl.model.sources import model_source
    from mlcd_vl.serve.ports import bind

    # a mistyped folder and a busy port are answered before torch, transformers and the model load (in our words:
    # Gradio's own message names GRADIO_SERVER_PORT)
    model_source(args.model, "--model")
    bind(args.host, args.port).close()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from transformers.utils import logging as hf_logging

    from mlcd_vl.serve.engine import Engine

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    defaults = WebDefaults(args.temperature, args.top_p, args.max_new_tokens)
    demo = build_demo(engine, args.title or f"MLCD-VL: {Path(args.model).resolve().name}", defaults)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {args.host}; the demo has no authentication", file=sys.stderr)
    try:
        demo.queue(default_concurrency_limit=1).launch(
            server_name=args.host, server_port=args.port, share=False, inbrowser=False,
            allowed_paths=[str(DEMO_IMAGE.parent)])
    except OSError as error:  # taken since the check: Gradio's message names GRADIO_SERVER_PORT, ours --port
        raise UserError(f"cannot serve on {args.host}:{args.port}: {error} (choose another --port)") from error
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="mlcd-vl web", description=__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_parser(_parser)
    from mlcd_vl.errors import run_reporting

    _args = _parser.parse_args()
    sys.exit(run_reporting("mlcd-vl web", lambda: run(_args)))
