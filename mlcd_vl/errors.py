"""Errors a user can fix, and how a command reports them: one line, no traceback, a meaningful exit code.

A command raises `UsageError` for a bad argument, option, recipe key or input path (exit 2, as argparse) and
`UserError` for a failure the user can act on that is not a usage mistake (exit 1: a busy port, a model that is not
in the offline cache). `run_reporting` is the one place that turns them into `PROG: error: MESSAGE` on stderr; with
`--debug` or `MLCD_VL_DEBUG=1` the traceback is shown instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

DEBUG_ENV = "MLCD_VL_DEBUG"


class UserError(Exception):
    """A failure the user can fix; the message is complete on its own (it names the value, file or option)."""

    exit_code = 1


class UsageError(UserError):
    """A bad argument, option, recipe key or input path."""

    exit_code = 2


def first_line(error: BaseException) -> str:
    """The first line of a library's (often multi-line) error message, or its type when it has none."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def debug_requested(debug_flag: bool = False) -> bool:
    return debug_flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_reporting(prog: str, command: Callable[[], int | None], debug: bool = False) -> int:
    """Run `command`; a `UserError` becomes one line on stderr and its exit code (re-raised when debugging)."""
    try:
        return int(command() or 0)
    except UserError as error:
        if debug_requested(debug):
            raise
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        return error.exit_code
    except KeyboardInterrupt:
        if debug_requested(debug):
            raise
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
