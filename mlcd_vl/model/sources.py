"""Where a model comes from: a local path or a Hugging Face hub id, decided by one rule for every command.

A value is a path when it starts with `.`, `/` or `~`, holds a backslash, its first component exists here, or it is
not shaped like a hub id (`owner/name`). A path that does not exist is answered at once with "no such folder: X"
(never looked up on the hub, which would spend half a minute on retries and then blame the network). A hub id is
left to the loaders, except with HF_HUB_OFFLINE=1: then one that is not in the local cache is refused in one line.

`model_source` applies the rule (ask, chat, web, serve, eval and `data check` through `checkpoint.load_vlm` /
`read_settings`; the recipe's `model.*` keys through `train.inputs`); `local_folder` also downloads a hub id
(`convert`, the lmms-eval adapter, ZeRO-3's partitioned build). `python -m mlcd_vl.model.sources VALUE` prints the
source or the one-line error (for shell scripts such as scripts/eval.sh).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mlcd_vl.errors import UsageError, UserError, first_line, run_reporting

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_path(value: str) -> bool:
    """Whether `value` names a local path rather than a hub id (see the module docstring for the rule)."""
    if not value or value.startswith((".", "/", "~")) or "\\" in value:
        return True
    if Path(Path(value).parts[0]).exists():
        return True
    return HUB_ID.fullmatch(value) is None


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_snapshot(repo_id: str, repo_type: str | None = None) -> Path | None:
    """The local cache's snapshot folder of `repo_id` (its default revision), or None; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def _named(what: str) -> str:
    return f"{what}: " if what else ""


def model_source(value: str | Path, what: str = "", *, files: bool = False) -> str:
    """`value` itself when it exists locally (`~` expanded) or is a usable hub id; otherwise a one-line error.

    `what` names the option or key in messages (`--model`, `model.llm`); `files=True` accepts a file as well as a
    folder (a stage-1 projector). Raises `UsageError` for a missing path and `UserError` for a hub id that is not in
    the cache while HF_HUB_OFFLINE=1.
    """
    text = str(value)
    local = Path(text).expanduser()
    if local.exists():
        return str(local)
    if looks_like_path(text):
        raise UsageError(f"{_named(what)}no such {'file or folder' if files else 'folder'}: {text}")
    if hub_offline() and cached_snapshot(text) is None:
        raise UserError(f"{_named(what)}{text} is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids "
                        "downloading it (unset HF_HUB_OFFLINE, or give a local folder)")
    return text


def local_folder(value: str | Path, what: str = "", allow_patterns: list[str] | None = None) -> Path:
    """A local folder for `value`: the folder itself, or the hub id's snapshot (downloaded, or from the cache);
    `allow_patterns` limits a download to the files it names (huggingface_hub's glob patterns)."""
    source = model_source(value, what)
    if Path(source).exists():
        if not Path(source).is_dir():
            raise UsageError(f"{_named(what)}{source} is a file, not a folder")
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=allow_patterns))
    except OSError as error:  # huggingface_hub's errors (not found, gated, connection) are OSErrors
        raise UserError(f"{_named(what)}cannot download {source} from the Hugging Face hub ({first_line(error)})") \
            from error


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mlcd_vl.model.sources",
                                     description="print where a model comes from, or why it cannot be used")
    parser.add_argument("value", help="a local folder or a hub id")
    parser.add_argument("--prog", default="mlcd-vl", help="the name error messages start with")
    args = parser.parse_args(argv)
    return run_reporting(args.prog, lambda: print(model_source(args.value)))


if __name__ == "__main__":
    sys.exit(main())
