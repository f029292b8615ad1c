"""Intermediate checkpoints and resume: `<output_dir>/checkpoint-<step>/`, written whole or not at all.

A checkpoint holds accelerate's state (`accelerator.save_state`: model, optimizer, the registered LR scheduler,
every process's RNG states; under DeepSpeed the engine's own checkpoint) plus `trainer_state.json`: the optimizer
step, the epoch, the sampler position in micro-batches actually consumed (not what DataLoader workers prefetched)
and the skipped-record counts so far.

It is written into `checkpoint-<step>.tmp` and renamed by the main process once every rank has finished, so a
crash never leaves a folder that looks complete; `.tmp` leftovers are ignored and replaced. `save_total_limit`
keeps the newest N. Resume (`resume: latest | never | <folder>`) restores all of it, so a resumed run continues
with the same data order and takes the same steps as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
_PATTERN = re.compile(rf"^{PREFIX}(\d+)$")


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders in output_dir, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if p.is_dir() and (m := _PATTERN.match(p.name)) and (p / STATE_FILE).is_file()]
    return [path for _, path in sorted(found)]


def find_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: `latest` (newest in output_dir, if any), `never`, or a folder."""
    if resume == "never":
        return None
    if resume == "latest":
        found = checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume: {path} is not a checkpoint folder (no {STATE_FILE})")
    return path


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict,
                    total_limit: int | None = None) -> Path:
    """Every rank calls this. Writes `checkpoint-<step>` atomically and prunes old ones; returns the folder."""
    final = Path(output_dir) / f"{PREFIX}{step}"
    partial = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        if total_limit:
            for old in checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, folder: str | Path) -> dict:
    """Restore accelerate's state from `folder` (every rank) and return its trainer state."""
    folder = Path(folder)
    accelerator.load_state(str(folder))
    return json.loads((folder / STATE_FILE).read_text())
