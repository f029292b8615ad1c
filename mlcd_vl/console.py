"""What the terminal shows: `--help` with defaults, plain-text tables, and one third-party notice kept out of the way.

`use_help_formatter(parser)` makes every `mlcd-vl --help` keep descriptions as written and say each option's
default. `duration(seconds)` writes a wall time in one style everywhere (the plan's estimate, the study's ledger).
`text_table(headers, rows)` aligns columns for the console (numbers right, text left), so statistics never appear as
raw Python dicts. `quiet_deepspeed_cpu_notice()` drops DeepSpeed's "Setting accelerator to CPU" warning: DeepSpeed
prints it whenever it is imported on a machine without a GPU, and transformers / accelerate import it on every
`save_pretrained` when it is installed, so a CPU command that never uses DeepSpeed would print it several times.
Commands call it unless they run DeepSpeed themselves (a DeepSpeed run keeps the notice).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Collection, Sequence

DEEPSPEED_LOGGER = "DeepSpeed"  # deepspeed.utils.logging's logger; a filter set before its import survives it
DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU"


class _DropDeepSpeedCpuNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return DEEPSPEED_CPU_NOTICE not in record.getMessage()


def quiet_deepspeed_cpu_notice() -> None:
    """Drop DeepSpeed's CPU-accelerator warning in this process (idempotent; nothing else DeepSpeed logs)."""
    logger = logging.getLogger(DEEPSPEED_LOGGER)
    if not any(isinstance(f, _DropDeepSpeedCpuNotice) for f in logger.filters):
        logger.addFilter(_DropDeepSpeedCpuNotice())


def duration(seconds: float) -> str:
    """A wall time for people: seconds under 2 minutes, minutes under 2 hours, hours, and days beside the hours
    from 48 hours on."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    hours = seconds / 3600
    return f"{hours:,.1f} h ({hours / 24:,.1f} days)" if hours >= 48 else f"{hours:,.1f} h"


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("%").replace(",", ""))
    except ValueError:
        return False
    return True


def text_table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "",
               left: Collection[int] | None = None) -> str:
    """Rows under headers in aligned columns, one line per row: numeric columns right-aligned, or, given `left`,
    those columns left-aligned and the others right (for numbers mixed with words such as "yes" / "NO")."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    if left is not None:
        numeric = [i not in left for i in range(len(headers))]
    else:
        numeric = [all(_is_number(row[i]) or not row[i] for row in cells[1:]) and len(cells) > 1
                   for i in range(len(headers))]

    def line(row: list[str]) -> str:
        parts = [c.rjust(w) if right else c.ljust(w) for c, w, right in zip(row, widths, numeric)]
        return (indent + "  ".join(parts)).rstrip()

    rule = indent + "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def _shows_default(action: argparse.Action) -> bool:
    """An option whose default is worth saying and whose help does not say it yet."""
    text, default = (action.help or "").lower(), action.default
    said = any(form in text for form in ("(default", "default:", "%(default)", f"default {default}".lower()))
    nothing = default is None or default is False or default is argparse.SUPPRESS or default == []  # 0 is a value
    return bool(action.option_strings) and not said and action.help is not argparse.SUPPRESS and not nothing


def use_help_formatter(parser: argparse.ArgumentParser) -> None:
    """`--help` of `parser` and every sub-command parser below it: descriptions kept as written (line breaks and
    all), and each option's default said, unless its help already says it or there is none (None, False, [])."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                use_help_formatter(sub)
        elif _shows_default(action):
            action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"
