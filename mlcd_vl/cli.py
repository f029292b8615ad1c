"""The `mlcd-vl` command: a table of subcommands, nothing else.

Each subcommand lives in its own module exposing `configure_parser(parser)` and `run(args) -> int`; modules keep
heavy imports (torch, transformers) inside `run` so building the parser, and so `--help`, stays fast
(tests/test_cli_errors.py checks it). A command signals a user's mistake by raising `errors.UsageError` (exit 2) or
another `errors.UserError` (exit 1); `main` prints it as one line. `--debug` (or MLCD_VL_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mlcd_vl.console import use_help_formatter
from mlcd_vl.errors import run_reporting

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("mlcd_vl.demo.run", "train, evaluate and chat with a tiny model on the CPU, end to end (no downloads)"),
    "build": ("mlcd_vl.model.build_command", "compose a fresh VLM from an LLM and a vision tower"),
    "convert": ("mlcd_vl.model.convert", "convert upstream LLaVA checkpoints to HF-native folders and back"),
    "ask": ("mlcd_vl.serve.ask", "answer one question about one or more images"),
    "data": ("mlcd_vl.data.check", "check a training dataset, or pin it with a manifest (data check / manifest)"),
    "train": ("mlcd_vl.train.run", "train a VLM from a recipe (stage 1 projector, stage 2 full)"),
    "plan": ("mlcd_vl.plan.command", "GPU / host memory, steps and time a recipe needs, before it runs"),
    "eval": ("mlcd_vl.eval.cli", "evaluate with lmms-eval: summarize results, synthetic sets, offline tasks"),
    "study": ("mlcd_vl.study.run", "the encoder study: train and evaluate each tower the same way, one table"),
    "chat": ("mlcd_vl.serve.cli_chat", "multi-turn terminal chat with images and streaming"),
    "web": ("mlcd_vl.serve.web", "the Gradio web demo"),
    "serve": ("mlcd_vl.serve.api", "an OpenAI-compatible HTTP API (binds 127.0.0.1 by default)"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with `only`, the other subcommands are listed but their modules are not imported."""
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error (also: MLCD_VL_DEBUG=1)")
    parser = argparse.ArgumentParser(prog="mlcd-vl", description="Train, evaluate and serve MLCD-LLaVA models.",
                                     parents=[debug])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if only is not None and name != only:
            subparsers.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                                    formatter_class=argparse.RawDescriptionHelpFormatter, parents=[debug])
        module.configure_parser(sub)
        sub.set_defaults(_module=module)
    use_help_formatter(parser)  # every option's default in --help, sub-commands' sub-commands included
    return parser


def _command_in(argv: list[str]) -> str:
    """The subcommand `argv` names (its first non-option word), or "" when it names none."""
    return next((word for word in argv if not word.startswith("-")), "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=_command_in(argv))  # imports only the module of the command asked for
    args = parser.parse_args(argv)
    if getattr(args, "_module", None) is None:
        parser.print_help()
        return 2
    return run_reporting(f"mlcd-vl {args.command}", lambda: args._module.run(args), getattr(args, "debug", False))


if __name__ == "__main__":
    sys.exit(main())
