"""The `mlcd-vl` command: a table of subcommands, nothing else.

Each subcommand lives in its own module exposing `configure_parser(parser)` and `run(args) -> int`; modules keep
heavy imports inside `run` so `mlcd-vl --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mlcd_vl.console import use_help_formatter

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("mlcd_vl.demo.run", "train, evaluate and chat with a tiny model on the CPU, end to end (no downloads)"),
    "build": ("mlcd_vl.model.build_command", "compose a fresh VLM from an LLM and a vision tower"),
    "convert": ("mlcd_vl.model.convert", "convert upstream LLaVA checkpoints to HF-native folders and back"),
    "ask": ("mlcd_vl.serve.ask", "answer one question about one or more images"),
    "data": ("mlcd_vl.data.check", "check a training dataset, or pin it with a manifest (data check / manifest)"),
    "train": ("mlcd_vl.train.run", "train a VLM from a recipe (stage 1 projector, stage 2 full)"),
    "eval": ("mlcd_vl.eval.cli", "evaluate with lmms-eval: summarize results, synthetic sets, offline tasks"),
    "chat": ("mlcd_vl.serve.cli_chat", "multi-turn terminal chat with images and streaming"),
    "web": ("mlcd_vl.serve.web", "the Gradio web demo"),
    "serve": ("mlcd_vl.serve.api", "an OpenAI-compatible HTTP API (binds 127.0.0.1 by default)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlcd-vl", description="Train, evaluate and serve MLCD-LLaVA models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.configure_parser(sub)
        sub.set_defaults(_module=module)
    use_help_formatter(parser)  # every option's default in --help, sub-commands' sub-commands included
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_module", None) is None:
        parser.print_help()
        return 2
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
