"""`mlcd-vl ask`: answer one question about one or more images and print the answer.

Example: `mlcd-vl ask --model runs/finetune --image chart.png --image photo.png "What differs?"`. The prompt is the
checkpoint's own template with one `<image>` per image in front of the question (put `<image>` placeholders in the
question to place them yourself); every image is processed in the checkpoint's image mode. Greedy by default;
`--temperature` above 0 samples.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", help="the question (may contain <image> placeholders)")
    parser.add_argument("--model", required=True, help="HF-native model folder or hub id")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="an image file; repeat for several images")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=[], help="extra stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--system", default=None, help="system prompt (default: the template's)")
    parser.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    parser.add_argument("--usage", action="store_true", help="also print token counts to stderr")


def run(args: argparse.Namespace) -> int:
    from mlcd_vl.model.sources import model_source

    model_source(args.model, "--model")  # a mistyped folder is answered before torch and transformers load

    from transformers.utils import logging as hf_logging

    from mlcd_vl.errors import UsageError
    from mlcd_vl.serve.engine import Engine
    from mlcd_vl.serve.requests import GenerationSettings, Request

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    missing = [path for path in args.image if not Path(path).is_file()]
    if missing:
        raise UsageError(f"image not found: {', '.join(missing)}")
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, stop=tuple(args.stop), seed=args.seed)
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.question}]
    request = Request(messages, list(args.image))
    if args.stream:
        stream = engine.stream(request, settings)
        for piece in stream:
            print(piece, end="", flush=True)
        print()
        result = stream.result
    else:
        result = engine.generate([request], settings)[0]
        print(result.text)
    if args.usage:
        print(f"[{result.prompt_tokens} prompt tokens, {result.completion_tokens} completion tokens, "
              f"finish: {result.finish_reason}]", file=sys.stderr)
    return 0
