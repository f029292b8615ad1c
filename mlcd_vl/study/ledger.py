"""What marks a step of a study finished, so a second invocation redoes nothing that is done.

A step (a tower's stage 1, stage 2 or evaluation) is finished when its folder holds `study_step.json`, written by
the study only after the step's command exited 0 and its outputs were all there:

* a training stage: the saved model (`config.json`, `model.safetensors` or its index), the resolved recipe
  (`train_config.yaml`), `metrics.jsonl` and `data_manifest.json`;
* an evaluation: the lmms-eval results files it names.

The stamp records the step's settings (recipe sha256, overrides with the study folder written as `<study>`,
launch width, evaluation tasks and arguments) and what the table needs (wall time, the data manifest's hash, the
scores). A stamp whose settings differ from what the study would run now is an error naming the difference: the
study never mixes a step trained one way into a table of steps trained another way, nor silently retrains it. A
stamp whose outputs went missing is an error too. A step without a stamp (interrupted, failed) is run again; a
training stage continues from its newest checkpoint when its recipe says `resume: latest`.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from mlcd_vl.study.towers import StudyError

STAMP = "study_step.json"
STAGE_OUTPUTS = ("config.json", "train_config.yaml", "metrics.jsonl", "data_manifest.json")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def missing_outputs(folder: Path, kind: str, stamp: dict | None = None) -> list[str]:
    """What a finished step's folder lacks (empty: complete)."""
    if kind == "eval":
        files = (stamp or {}).get("results_files") or []
        return [f for f in files if not (folder / f).is_file()] or ([] if files else ["results files"])
    missing = [name for name in STAGE_OUTPUTS if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in WEIGHTS):
        missing.append("model.safetensors")
    return missing


def finished(folder: Path, kind: str, settings: dict) -> dict | None:
    """The stamp of a finished step with these settings; None when the step has to run. Raises StudyError when the
    folder was finished with other settings or lost its outputs."""
    path = folder / STAMP
    if not path.is_file():
        return None
    try:
        stamp = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise StudyError(f"{path}: unreadable ({error}); delete it to run the step again") from None
    recorded = stamp.get("settings") or {}
    if recorded != settings:
        changed = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
        detail = "; ".join(_change(k, recorded.get(k), settings.get(k)) for k in changed)
        raise StudyError(f"{folder} was finished with other settings ({detail}); a study compares steps run one "
                         f"way: use another --workdir, or delete {folder} to run it again")
    lost = missing_outputs(folder, kind, stamp)
    if lost:
        raise StudyError(f"{folder} is marked finished but lacks {', '.join(lost)}; delete {folder} to run it again")
    return stamp


def _change(key: str, old, new) -> str:
    if isinstance(old, list) and isinstance(new, list):  # overrides: name only what differs
        gone, added = [v for v in old if v not in new], [v for v in new if v not in old]
        return f"{key}: " + ", ".join([f"was {v}" for v in gone] + [f"now {v}" for v in added] or ["reordered"])
    return f"{key}: {old!r} -> {new!r}"


def mark_finished(folder: Path, kind: str, settings: dict, **facts) -> dict:
    """Write the stamp (after checking the outputs are there); returns it."""
    stamp = {"settings": settings, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **facts}
    lost = missing_outputs(folder, kind, stamp)
    if lost:
        raise StudyError(f"{folder}: the step exited 0 but wrote no {', '.join(lost)}")
    scratch = folder / (STAMP + ".partial")
    scratch.write_text(json.dumps(stamp, indent=1) + "\n")
    os.replace(scratch, folder / STAMP)
    return stamp


def portable(values: list[str], workdir: Path) -> list[str]:
    """Overrides with the study folder written as `<study>`, so a moved study folder still matches its stamps."""
    inside = re.compile(re.escape(str(workdir)) + r"(?=[/\\,\]\s]|$)")  # the folder itself, not a longer name
    return [inside.sub("<study>", value) for value in values]
