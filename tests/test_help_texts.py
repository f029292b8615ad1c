"""What users read: `--help` says every option's default, `data check --help` explains itself with an example,
`demo --help` speaks to users (no notes for the test suite), and nothing points at a document the repository does
not ship."""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import pytest

from mlcd_vl.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
UNSHIPPED = ("reference" + "-spec", "env" + "-notes", "lmms-eval" + "-notes", "DESIGN" + ".md")  # not spelled here


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser of `mlcd-vl`, by its command path (`serve`, `data check`, ...)."""
    found = {}

    def walk(name: str, parser: argparse.ArgumentParser) -> None:
        found[name] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(f"{name} {sub_name}".strip(), sub)

    walk("", build_parser())
    return found


def test_no_text_points_at_a_document_the_repository_does_not_ship():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for name in files:
        path = REPO / name
        if path.suffix not in (".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".txt", ".json") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        hits += [f"{name}: {word}" for word in UNSHIPPED if word in text]
    assert hits == []


def test_every_option_with_a_default_says_it():
    missing = []
    for name, parser in parsers().items():
        text = parser.format_help()
        for action in parser._actions:
            default = action.default
            if (not action.option_strings or default is None or default is False or default == []
                    or default is argparse.SUPPRESS):
                continue
            if "default" not in (action.help or "").lower():
                missing.append(f"{name} {action.option_strings[0]}")
        assert "%(default)" not in text, name
    assert missing == []
    serve, ask = parsers()["serve"].format_help(), parsers()["ask"].format_help()
    for shown in ("default: 8000", "rows in the running batch (default: 8)", "(default: 64)"):
        assert shown in " ".join(serve.split()), shown
    assert "default: 512" in ask


def test_data_check_help_has_a_description_and_an_example():
    text = parsers()["data check"].format_help()
    assert "report each record training would skip" in " ".join(text.split())
    assert "example:\n  mlcd-vl data check runs/demo/data/chat.json --model runs/demo/stage2" in text


@pytest.mark.parametrize("words", ["CI", "tests?", "measured with other jobs"])
def test_demo_help_speaks_to_users(words):
    text = " ".join(parsers()["demo"].format_help().split())
    assert re.search(rf"\b{words}\b", text) is None
    assert "runs/demo/" in text and "ask" in text


def test_console_tables_align_numbers_right_and_named_columns_left():
    from mlcd_vl.console import text_table

    found = text_table(["what", "GiB"], [["loss", "3.6"], ["total", "101,152"]]).splitlines()
    assert found == ["what       GiB", "-----  -------", "loss       3.6", "total  101,152"]
    mixed = text_table(["row", "ZeRO-3"], [["total", "60.1"], ["fits", "yes"]], left=(0,)).splitlines()
    assert mixed == ["row    ZeRO-3", "-----  ------", "total    60.1", "fits      yes"]  # yes / NO aligned as numbers


def test_console_durations_share_one_style():
    from mlcd_vl.console import duration

    assert [duration(s) for s in (42, 119.4, 120, 5400, 7200, 47 * 3600, 100 * 3600)] == [
        "42 s", "119 s", "2.0 min", "90.0 min", "2.0 h", "47.0 h", "100.0 h (4.2 days)"]
