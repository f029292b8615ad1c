"""The on-disk data cache: where it lives, and how one process builds an entry while the others wait and read it.

Everything cached here is keyed by what it is computed from (file sizes and mtimes, tokenizer, template, image
settings...), never by the run, so every rank, every restart and every run on the same data shares it:

* `records/`: byte-offset indices of JSON / JSONL files (`json_index`), so records are parsed lazily;
* `lengths/`: length tables of the scan (`lengths_cache`);
* `manifests/`: data manifests (`manifest`).

Location: `data.cache_dir` when set, else `$MLCD_VL_CACHE_DIR`, else `$XDG_CACHE_HOME/mlcd_vl` (`~/.cache/mlcd_vl`).
Node-local by default; point it at a shared file system to build each entry once per cluster instead of once per
node. Library functions write nothing unless they are given a cache folder: the entry points (training, the CLI)
resolve it.

Concurrency: an entry is a folder written under a temporary name and renamed into place (atomic: a reader sees a
complete entry or none). Builders take a file lock (`filelock`) first, so concurrent ranks build an entry once and
the others wait, then read it; where the file system ignores locks, two builders write the same content and the
second rename loses harmlessly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

logger = logging.getLogger("mlcd_vl.data")

CACHE_ENV = "MLCD_VL_CACHE_DIR"
DISABLED = ("off", "none", "")


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlcd_vl"


def resolve_cache_dir(setting: str | os.PathLike | None) -> Path | None:
    """The cache folder for a `data.cache_dir` setting: None -> the default, "off" -> no cache."""
    if setting is None:
        return default_cache_dir()
    if str(setting).strip().lower() in DISABLED:
        return None
    return Path(setting).expanduser()


def digest(value) -> str:
    """sha256 of a JSON-serialisable value in canonical form (sorted keys, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def build_once(entry: Path, build: Callable[[Path], None], *, timeout: float = -1) -> bool:
    """Make sure the folder `entry` exists with its content; `build(folder)` fills a fresh folder when it does not.

    Returns True when this call built it, False when it was already there (or another process built it meanwhile).
    """
    if entry.is_dir():
        return False
    from filelock import FileLock

    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock", timeout=timeout):
        if entry.is_dir():  # another process built it while this one waited for the lock
            return False
        scratch = Path(tempfile.mkdtemp(prefix=entry.name + ".partial-", dir=entry.parent))
        try:
            build(scratch)
            os.replace(scratch, entry)
        except OSError:
            if not entry.is_dir():
                raise
        finally:
            if scratch.exists():
                shutil.rmtree(scratch, ignore_errors=True)
    return True


def writable(folder: Path) -> bool:
    """Whether entries can be written under `folder` (created when missing)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-")
        probe.close()
        return True
    except OSError as error:
        logger.warning("data cache %s is not writable (%s); working without it", folder, error)
        return False
