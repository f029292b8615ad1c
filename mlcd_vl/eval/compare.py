"""What each row of an evaluation table was scored with, and where rows differ: the eval side of reproducibility.

A row is one run (one folder of lmms-eval results, possibly several results files). Its settings are read from the
results files themselves, never from the command that made them:

* the lmms-eval version (`lmms_eval_version`: a release number, or the installed one when the file only records a
  git `branch@commit`);
* the chat template (`checkpoint_template`: `conv_template=`, else the checkpoint's own);
* the model arguments other than `pretrained` (dtype, max_new_tokens, repetition_penalty, ...), the batch size and
  lmms-eval's `--limit`;
* per benchmark (an MLCD benchmark by its column, so `chartqa` and its offline twin `mlcd_chartqa_local` compare as
  one; any other task by its name): which task ran, its version (lmms-eval's `versions` and the task's
  `metadata.version`), its prompt (`lmms_eval_specific_kwargs`' pre/post prompt) and the generation settings
  `mlcd_llava` used (`generation.effective_generation`, the adapter's own function).

`compare(rows)` names every setting whose value differs between rows that have it, with each row's value; a
benchmark only some rows ran is not a difference (its cells are empty). Identical settings give no warning.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from mlcd_vl.eval.generation import effective_generation
from mlcd_vl.eval.tasks import benchmark_for_task

#: model_args that name the model rather than how it is scored (compared rows are different models on purpose)
MODEL_IDENTITY_ARGS = ("pretrained",)


@dataclass
class RowSettings:
    """The scoring settings of one row, as `name -> value` text (so any two rows compare key by key)."""

    label: str
    settings: dict[str, str] = field(default_factory=dict)


def parse_model_args(text: str | dict | None) -> dict:
    """lmms-eval's `k=v,k2=v2` model_args as a dict of strings."""
    if isinstance(text, dict):
        return {k: str(v) for k, v in text.items()}
    pairs = [part.split("=", 1) for part in (text or "").split(",") if "=" in part]
    return {k.strip(): v.strip() for k, v in pairs}


def installed_lmms_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmms_eval")
    except PackageNotFoundError:
        return "not installed"


def lmms_eval_version(recorded: str | None, with_record: bool = True) -> str:
    """The results file's version when it is a release number; lmms-eval writes `branch@commit` of whatever git
    repository surrounds it (or unknown@unknown), so otherwise take the installed one and say so (`with_record`:
    also quote what the file records; comparisons leave it out, since it names that surrounding repository's
    commit at the time, which differs between runs of one lmms-eval)."""
    if recorded and re.fullmatch(r"v?\d+\.\d+(\.\d+)?\S*", recorded):
        return recorded
    if not with_record:
        return f"{installed_lmms_eval_version()} (installed here)"
    return f"{installed_lmms_eval_version()} (installed here; the file records {recorded!r})"


def checkpoint_template(model_args: dict) -> str:
    """The template the adapter used: conv_template=, else the checkpoint's (or its converted copy's) config."""
    if model_args.get("conv_template"):
        return model_args["conv_template"]
    pretrained = model_args.get("pretrained")
    if not pretrained:
        return "unknown"
    source = Path(pretrained).expanduser()
    for folder in (source, source.parent / f"{source.name}.mlcd-hf"):
        config = folder / "config.json"
        if config.is_file():
            data = json.loads(config.read_text())
            template = (data.get("mlcd_vl") or {}).get("template")
            if template:
                return template
    return "unknown (checkpoint not readable here)"


def scoring_generation(task_config: dict, model_args: dict) -> dict:
    """The generation settings `mlcd_llava` used for a task: the task's generation_kwargs through the adapter's own
    `effective_generation`, with the run's model_args (max_new_tokens, repetition_penalty, stop_at_until)."""
    generation, _ = effective_generation(
        task_config.get("generation_kwargs") or {}, max_new_tokens=int(model_args.get("max_new_tokens", 1024)),
        repetition_penalty=model_args.get("repetition_penalty", 1.0),
        stop_at_until=model_args.get("stop_at_until", "true").lower() not in ("false", "0", "no"))
    return generation


def _task_version(data: dict, task: str) -> str:
    version = (data.get("versions") or {}).get(task)
    metadata = (data.get("configs") or {}).get(task, {}).get("metadata")
    if isinstance(metadata, list):
        metadata = next((m for m in metadata if isinstance(m, dict)), None)
    declared = metadata.get("version") if isinstance(metadata, dict) else None
    return f"{version} (metadata {declared})" if declared is not None else str(version)


def _prompt(task_config: dict) -> str:
    kwargs = task_config.get("lmms_eval_specific_kwargs") or {}
    chosen = kwargs.get("default") if isinstance(kwargs.get("default"), dict) else kwargs
    return json.dumps({"pre_prompt": chosen.get("pre_prompt", ""), "post_prompt": chosen.get("post_prompt", "")},
                      ensure_ascii=False)


def _generation_text(settings: dict) -> str:
    return ", ".join(f"{key}={json.dumps(list(value) if isinstance(value, tuple) else value)}"
                     for key, value in settings.items())


def row_settings(results_files: list[Path], label: str) -> RowSettings:
    """The settings of one row from its results files (later files win where two hold the same benchmark)."""
    row = RowSettings(label)
    for path in results_files:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError):
            continue  # summarize reports unreadable files itself
        config = data.get("config") or {}
        args = parse_model_args(config.get("model_args"))
        row.settings["lmms-eval version"] = lmms_eval_version(data.get("lmms_eval_version"), with_record=False)
        row.settings["model"] = str(config.get("model", "?"))
        row.settings["template"] = checkpoint_template(args)
        row.settings["model_args (besides pretrained)"] = ",".join(
            f"{k}={v}" for k, v in sorted(args.items()) if k not in MODEL_IDENTITY_ARGS) or "(none)"
        row.settings["batch size"] = str(config.get("batch_size", "?"))
        row.settings["limit"] = str(config.get("limit"))
        for task in sorted(data.get("results") or {}):
            benchmark = benchmark_for_task(task)
            name = benchmark.name if benchmark is not None else task
            task_config = (data.get("configs") or {}).get(task, {})
            generation = scoring_generation(task_config, args)
            row.settings[f"{name}: task"] = task
            row.settings[f"{name}: version"] = _task_version(data, task)
            row.settings[f"{name}: prompt"] = _prompt(task_config)
            row.settings[f"{name}: generation"] = _generation_text(generation)
    return row


def differences(rows: list[RowSettings]) -> dict[str, list[str | None]]:
    """Setting -> each row's value (None where the row lacks it), for settings that differ between rows."""
    keys = list(dict.fromkeys(key for row in rows for key in row.settings))
    found = {}
    for key in keys:
        values = [row.settings.get(key) for row in rows]
        if len({v for v in values if v is not None}) > 1:
            found[key] = values
    return found


def compare(rows: list[RowSettings]) -> list[str]:
    """One warning per setting that differs between rows, naming each row's value."""
    return [f"rows differ in {key}: " + "; ".join(f"{row.label}: {value}" for row, value in zip(rows, values)
                                                  if value is not None)
            for key, values in differences(rows).items()]


def render_differences(rows: list[RowSettings]) -> str:
    """A markdown table of the settings that differ (empty text when the rows agree, or there is only one)."""
    found = differences(rows)
    if len(rows) < 2:
        return ""
    if not found:
        return ("Scoring settings compared across rows (lmms-eval version, task versions and prompts, template, "
                "generation settings, model arguments, batch size, limit): identical.\n")

    def cell(value: str | None) -> str:
        return "-" if value is None else f"`{value}`".replace("|", "\\|")

    lines = ["Scoring settings that differ between rows (scores in these rows are not strictly comparable):", "",
             "| setting | " + " | ".join(row.label for row in rows) + " |", "|---|" + "---|" * len(rows)]
    lines += [f"| {key} | " + " | ".join(cell(v) for v in values) + " |" for key, values in found.items()]
    return "\n".join(lines) + "\n"
