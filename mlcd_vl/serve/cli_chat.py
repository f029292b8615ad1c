"""`mlcd-vl chat`: a multi-turn conversation about images in the terminal, answers streamed as they are generated.

Type a question and press Enter. Commands:

    /image PATH   attach an image to your next message (repeat for several; any turn may bring new images)
    /reset        forget the conversation and the attached images
    /exit         leave (so do /quit, Ctrl-D and end of input)
    /help         list the commands

Every turn is rendered with the checkpoint's own chat template and every image is processed in the checkpoint's
image mode (anyres ...) by the serving engine, so the prompt is the one the model was trained on (upstream's demo
built its prompt by hand and drifted from training). Input may come from a pipe too:
`printf '/image cat.png\\nWhat is it?\\n' | mlcd-vl chat --model DIR`. Answers go to stdout, everything else
(banner, notices, errors) to stderr.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

HELP = "commands: /image PATH (attach to the next message), /reset, /exit, /help"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF-native model folder or hub id")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="attach an image to the first message (repeatable)")
    parser.add_argument("--system", default=None, help="system prompt (default: the template's)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.2, help="0 = greedy (default 0.2, as upstream's demo)")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="seed each answer's sampling")
    parser.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--no-stream", action="store_true", help="print each answer only when it is complete")


@dataclass
class Conversation:
    """The turns so far (string contents with `<image>` placeholders) and their images, in placeholder order."""

    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    pending_images: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.images, self.pending_images = [], []

    def with_question(self, text: str) -> tuple[list[dict], list[Path]]:
        """The conversation with the user's next turn, not yet committed: pending images go in front of its text,
        unless the text places them itself with one `<image>` each."""
        placed = self.pending_images and text.count("<image>") == len(self.pending_images)
        content = text if placed else "<image>\n" * len(self.pending_images) + text
        return self.messages + [{"role": "user", "content": content}], self.images + self.pending_images

    def commit(self, messages: list[dict], images: list[Path], answer: str) -> None:
        self.messages = messages + [{"role": "assistant", "content": answer}]
        self.images, self.pending_images = images, []


def read_line(stdin: TextIO, interactive: bool) -> str | None:
    """The next input line without its newline, or None at end of input."""
    if interactive:
        try:
            return input(">>> ")
        except EOFError:
            return None
    line = stdin.readline()
    return None if line == "" else line.rstrip("\r\n")


def attach_image(conversation: Conversation, argument: str) -> None:
    """Check that the image opens before attaching it, so a typo is reported now and not after the question."""
    from mlcd_vl.model.pixels import ImageError, load_rgb

    path = Path(argument.strip().strip("'\"")).expanduser()
    if not argument.strip():
        print("usage: /image PATH", file=sys.stderr)
        return
    try:
        size = load_rgb(path).size
    except (ImageError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return
    conversation.pending_images.append(path)
    print(f"[attached {path} ({size[0]}x{size[1]}); {len(conversation.pending_images)} image(s) for the next "
          "message]", file=sys.stderr)


def answer(engine, conversation: Conversation, text: str, settings, stream: bool) -> None:
    """Generate, print and remember one answer; on an error or Ctrl-C the turn is dropped."""
    from mlcd_vl.model.pixels import ImageError
    from mlcd_vl.serve.requests import EngineError, Request

    messages, images = conversation.with_question(text)
    request = Request(messages, list(images))
    try:
        if stream:
            pieces = engine.stream(request, settings)
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
            result = pieces.result
        else:
            result = engine.generate([request], settings)[0]
            sys.stdout.write(result.text)
        sys.stdout.write("\n")
        sys.stdout.flush()
    except (EngineError, ImageError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return
    except KeyboardInterrupt:
        print("\n[interrupted; this turn is forgotten]", file=sys.stderr)
        return
    conversation.commit(messages, images, result.text)


def run(args: argparse.Namespace) -> int:
    from mlcd_vl.model.sources import model_source

    model_source(args.model, "--model")  # a mistyped folder is answered before torch and transformers load

    from transformers.utils import logging as hf_logging

    from mlcd_vl.serve.engine import Engine
    from mlcd_vl.serve.requests import GenerationSettings

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, seed=args.seed)
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    interactive = sys.stdin.isatty()
    conversation = Conversation(system=args.system)
    for path in args.image:
        attach_image(conversation, path)
    print(f"[{args.model}: template {engine.settings.template}, images {engine.settings.image_mode}, "
          f"temperature {settings.temperature}, top-p {settings.top_p}, max {settings.max_new_tokens} new tokens]",
          file=sys.stderr)
    print(f"[{HELP}]", file=sys.stderr)
    while True:
        try:
            line = read_line(sys.stdin, interactive)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        if line is None:
            return 0
        text = line.strip()
        command, _, argument = text.partition(" ")
        if not text:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/help":
            print(HELP, file=sys.stderr)
        elif command == "/reset":
            conversation.reset()
            print("[conversation reset]", file=sys.stderr)
        elif command == "/image":
            attach_image(conversation, argument)
        elif command.startswith("/") and "/" not in command[1:]:
            print(f"unknown command {command}; {HELP}", file=sys.stderr)
        else:
            answer(engine, conversation, line, settings, stream=not args.no_stream)


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="mlcd-vl chat", description=__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_parser(_parser)
    from mlcd_vl.errors import run_reporting

    _args = _parser.parse_args()
    sys.exit(run_reporting("mlcd-vl chat", lambda: run(_args)))
