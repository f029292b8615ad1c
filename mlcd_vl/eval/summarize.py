"""`mlcd-vl eval summarize`: lmms-eval results in the MLCD table's units, next to the published rows.

Reads `*_results.json` files (from the folders given, recursively) and, when present beside them, the per-sample
logs `*_samples_<task>.jsonl`. Scores are shown as the paper reports them: ChartQA relaxed accuracy x100, DocVQA and
InfoVQA ANLS x100, OCRBench points out of 1000, MMMU accuracy x100 (the MLCD README). Each score is recorded with
the lmms-eval version, the chat template and every generation setting `mlcd_llava` used for it (the same
`effective_generation` the adapter runs). Warnings: OCRBench on fewer than its 1000 items (lmms-eval always divides
by 1000), runs on fewer documents than the official split, empty answers in the sample logs. Tasks outside the MLCD
table (the CPU demo's skills, your own tasks) get a table of their own with every metric lmms-eval recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mlcd_vl.errors import UsageError
from mlcd_vl.eval import MODEL_ID
from mlcd_vl.eval import compare
from mlcd_vl.eval.compare import checkpoint_template, lmms_eval_version, parse_model_args, scoring_generation
from mlcd_vl.eval.tasks import BENCHMARKS, Benchmark, benchmark_for_task

COLUMNS = [b.name for b in BENCHMARKS]

#: The MLCD README's table: LLaVA-NeXT recipe, Qwen2.5-7B, LCS-558K + LLaVA-NeXT-Data, lmms-eval 0.2.0.
PUBLISHED: list[tuple[str, dict[str, float]]] = [
    ("CLIP (ViT-L-14-336px)", dict(ChartQA=66.52, DocVQA=75.21, InfoVQA=38.88, OCRBench=525, MMMU=44.20)),
    ("SigLIP (ViT-SO400M-384px)", dict(ChartQA=69.28, DocVQA=76.71, InfoVQA=41.38, OCRBench=554, MMMU=46.78)),
    ("DFN5B (ViT-H-14-378px)", dict(ChartQA=64.36, DocVQA=70.87, InfoVQA=38.59, OCRBench=473, MMMU=48.00)),
    ("MLCD (ViT-L-14-336px)", dict(ChartQA=67.84, DocVQA=76.46, InfoVQA=43.48, OCRBench=531, MMMU=44.30)),
    ("MLCD (ViT-bigG-14-336px)", dict(ChartQA=71.07, DocVQA=79.63, InfoVQA=44.38, OCRBench=572, MMMU=46.78)),
    ("MLCD (ViT-bigG-14-448px)", dict(ChartQA=73.80, DocVQA=83.34, InfoVQA=46.59, OCRBench=582, MMMU=46.00)),
]

#: The tower preset (`mlcd_vl.presets.TOWERS`) behind each published row, for tables that set ours beside theirs.
PUBLISHED_TOWERS = {"clip-vitL-336": "CLIP (ViT-L-14-336px)", "siglip-so400m-384": "SigLIP (ViT-SO400M-384px)",
                    "dfn5b-vitH-378": "DFN5B (ViT-H-14-378px)", "mlcd-vitL-336": "MLCD (ViT-L-14-336px)",
                    "mlcd-bigG-336": "MLCD (ViT-bigG-14-336px)", "mlcd-bigG-448": "MLCD (ViT-bigG-14-448px)"}


def published_row(tower: str) -> tuple[str, dict[str, float]] | None:
    """(row name, scores) of the published table for a tower preset name, or None for a tower it does not have."""
    name = PUBLISHED_TOWERS.get(tower)
    return next(((n, row) for n, row in PUBLISHED if n == name), None)


class SummaryError(UsageError, ValueError):
    """No usable results: the message names the path."""


@dataclass
class Score:
    benchmark: Benchmark
    task: str
    value: float | None  # in the paper's unit
    documents: int | None
    generation: dict
    empty_answers: int | None = None
    ocrbench_points: int | None = None


@dataclass
class Run:
    path: Path
    model: str
    model_args: str
    lmms_eval_version: str
    template: str
    batch_size: str
    label: str = ""  # the row's name in the table; default: the model and its checkpoint folder's name
    scores: dict[str, Score] = field(default_factory=dict)
    other_tasks: list[str] = field(default_factory=list)
    other_scores: dict[str, "OtherScore"] = field(default_factory=dict)  # task -> its metrics, as recorded


@dataclass
class OtherScore:
    """A task outside the MLCD table: every numeric metric lmms-eval recorded for it (no unit conversion)."""

    metrics: dict[str, float]
    documents: int | None


@dataclass
class Summary:
    runs: list[Run]
    warnings: list[str]
    markdown: str


def find_results(paths: list[str | Path]) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            matches = sorted(path.rglob("*_results.json"))
            if not matches:
                raise SummaryError(f"{path}: no *_results.json inside (did lmms-eval fail? it exits 0 when it does)")
            found.extend(matches)
        else:
            raise SummaryError(f"{path}: no such file or folder")
    return found


def _samples(results_path: Path, task: str) -> list[dict] | None:
    stamp = results_path.name[: -len("_results.json")]
    path = results_path.with_name(f"{stamp}_samples_{task}.jsonl")
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _answer(sample: dict) -> str:
    answer = sample.get("filtered_resps", sample.get("resps", ""))
    while isinstance(answer, list) and answer:
        answer = answer[0]
    return answer if isinstance(answer, str) else ""


def read_run(path: Path, warnings: list[str]) -> Run:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SummaryError(f"{path}: not a results file ({error})") from error
    if "results" not in data:
        raise SummaryError(f"{path}: no 'results' key (not an lmms-eval results file)")
    config = data.get("config") or {}
    args = parse_model_args(config.get("model_args"))
    run = Run(path=path, model=str(config.get("model", "?")), model_args=str(config.get("model_args", "")),
              lmms_eval_version=lmms_eval_version(data.get("lmms_eval_version")),
              template=checkpoint_template(args) if config.get("model") == MODEL_ID else "the model's own",
              batch_size=str(config.get("batch_size", "?")))
    for task, metrics in sorted(data["results"].items()):
        benchmark = benchmark_for_task(task)
        if benchmark is None:
            run.other_tasks.append(task)
            run.other_scores[task] = OtherScore(_recorded_metrics(metrics),
                                                (data.get("n-samples") or {}).get(task, {}).get("effective"))
            continue
        raw = metrics.get(f"{benchmark.metric},none")
        value = float(raw) * benchmark.scale if isinstance(raw, (int, float)) else None
        if value is None:
            warnings.append(f"{path}: {task} has no numeric {benchmark.metric} ({raw!r})")
        documents = (data.get("n-samples") or {}).get(task, {}).get("effective")
        generation = scoring_generation((data.get("configs") or {}).get(task, {}), args)
        score = Score(benchmark, task, value, documents, generation)
        samples = _samples(path, task)
        if samples is not None:
            score.empty_answers = sum(1 for s in samples if not _answer(s).strip())
            documents = score.documents = score.documents or len(samples)
            if benchmark.name == "OCRBench":
                score.ocrbench_points = sum(int((s.get("ocrbench_accuracy") or {}).get("score", 0)) for s in samples)
            if score.empty_answers:
                warnings.append(f"{path.name}: {task}: {score.empty_answers} of {len(samples)} answers are empty")
        if benchmark.name == "OCRBench" and documents is not None and documents < benchmark.full_size:
            warnings.append(f"{path.name}: {task} ran on {documents} of OCRBench's 1000 items, but its score is "
                            f"always points/1000: {value if value is not None else '?'} is at most {documents}, "
                            "not comparable with the published numbers")
        elif documents is not None and documents < benchmark.full_size:
            warnings.append(f"{path.name}: {task} ran on {documents} of {benchmark.full_size} documents of the "
                            f"official split: not comparable with the published numbers")
        if benchmark.name in run.scores:
            warnings.append(f"{path.name}: {benchmark.name} appears twice ({run.scores[benchmark.name].task}, "
                            f"{task}); the table shows {task}")
        run.scores[benchmark.name] = score
    return run


def _recorded_metrics(metrics: dict) -> dict[str, float]:
    """`{"relaxed_overall,none": 0.9, "relaxed_overall_stderr,none": ...}` -> `{"relaxed_overall": 0.9}`."""
    values = {}
    for key, value in metrics.items():
        name, _, filter_name = key.partition(",")
        if "_stderr" in name or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        values[name if filter_name in ("none", "") else f"{name} ({filter_name})"] = float(value)
    return values


def format_score(value: float | None, benchmark_name: str, missing: str = "-") -> str:
    """A score as the MLCD table writes it: OCRBench in whole points of 1000 (one decimal if not whole), the others
    with two decimals."""
    if value is None:
        return missing
    if benchmark_name == "OCRBench":
        return f"{value:.0f}" if abs(value - round(value)) < 1e-6 else f"{value:.1f}"
    return f"{value:.2f}"


def _run_label(run: Run) -> str:
    if run.label:
        return run.label
    pretrained = parse_model_args(run.model_args).get("pretrained")
    return f"{run.model}: {Path(pretrained).name}" if pretrained else run.model


def _stop(generation: dict) -> str:
    return ", ".join(json.dumps(s) for s in generation["stop"]) or "none"


def render(runs: list[Run], warnings: list[str], published: bool = True) -> str:
    lines = ["# Evaluation summary"]
    mlcd_runs = [(number, run) for number, run in enumerate(runs, start=1) if run.scores]
    if mlcd_runs:
        lines += ["", "Units: ChartQA relaxed accuracy x100 (test), DocVQA and InfoVQA ANLS x100 (val), OCRBench "
                      "points of 1000, MMMU accuracy x100 (val).", "",
                  "| Model | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for number, run in mlcd_runs:
        cells = [format_score(run.scores[c].value, c) if c in run.scores else "" for c in COLUMNS]
        lines.append(f"| [{number}] {_run_label(run)} | " + " | ".join(cells) + " |")
    if published and mlcd_runs:
        for name, row in PUBLISHED:
            cells = [format_score(row[c], c) for c in COLUMNS]
            lines.append(f"| published: {name} | " + " | ".join(cells) + " |")
        lines += ["", "Published rows: MLCD README (LLaVA-NeXT recipe, Qwen2.5-7B, LCS-558K + LLaVA-NeXT-Data, "
                      "lmms-eval 0.2.0, `llava` model with fp16 and the checkpoint's repetition_penalty 1.05)."]
    other = [(number, run) for number, run in enumerate(runs, start=1) if run.other_scores]
    if other:
        lines += ["", "Other tasks (not in the MLCD table; metrics as lmms-eval records them, 1.0 = 100%):", "",
                  "| Model | task | metric | score | documents |", "|---|---|---|---:|---:|"]
        for number, run in other:
            for task, score in run.other_scores.items():
                for metric, value in score.metrics.items():
                    documents = score.documents if score.documents is not None else "?"
                    lines.append(f"| [{number}] {_run_label(run)} | {task} | {metric} | {value:.4f} | {documents} |")
    for number, run in enumerate(runs, start=1):
        lines += ["", f"## [{number}] {run.path}", "",
                  f"- lmms-eval: {run.lmms_eval_version}",
                  f"- model: `{run.model}`, model_args `{run.model_args}`, batch size {run.batch_size}",
                  f"- template: {run.template}"]
        if not run.scores:
            continue
        lines += ["", "| Benchmark | task | score | documents | max_new_tokens | temperature | top_p | top_k | "
                  "num_beams | repetition_penalty | stop strings (until) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for column in COLUMNS:
            if column not in run.scores:
                continue
            s = run.scores[column]
            g = s.generation
            penalty = "checkpoint's" if g["repetition_penalty"] is None else g["repetition_penalty"]
            score = format_score(s.value, column)
            if s.ocrbench_points is not None:
                score += f" ({s.ocrbench_points} of {s.documents} items right)"
            lines.append(f"| {column} | {s.task} | {score} | {s.documents if s.documents is not None else '?'} | "
                         f"{g['max_new_tokens']} | {g['temperature']} | {g['top_p']} | {g['top_k']} | 1 | "
                         f"{penalty} | {_stop(g)} |")
        if run.model != MODEL_ID:
            lines += ["", f"Generation settings above are those `{MODEL_ID}` would use; this run used `{run.model}`."]
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    return "\n".join(lines) + "\n"


def summarize_paths(paths: list[str | Path], published: bool = True) -> Summary:
    """One row per path given: a results file, or a run folder whose results files (searched recursively: e.g.
    an eval.sh output folder, or a training run folder with its evaluations inside) make one row together. The
    rows' scoring settings are compared (`compare`): each setting that differs between rows is a warning and a
    table under the scores."""
    warnings: list[str] = []
    groups = [(Path(path), find_results([path])) for path in paths]
    runs = [merge_runs(path, [read_run(file, warnings) for file in files], warnings) for path, files in groups]
    labels = [_run_label(run) for run in runs]
    if len(set(labels)) < len(labels):  # e.g. every tower's checkpoint folder is called stage2: name the paths
        for run, path in zip(runs, paths):
            run.label = str(path)
    rows = [compare.row_settings(files, f"[{number}]") for number, (_, files) in enumerate(groups, start=1)]
    warnings += compare.compare(rows)
    markdown = render(runs, warnings, published)
    if len(rows) > 1:
        markdown += "\n## Scoring settings across rows\n\n" + compare.render_differences(rows)
    return Summary(runs, warnings, markdown)


def merge_runs(path: Path, runs: list[Run], warnings: list[str]) -> Run:
    """The results files of one run folder as one row (files in name order, i.e. by lmms-eval's date stamp: a
    benchmark scored twice keeps the later score, with a warning)."""
    if len(runs) == 1:
        return runs[0]
    merged = Run(path=path, model=runs[-1].model, model_args=runs[-1].model_args,
                 lmms_eval_version=runs[-1].lmms_eval_version, template=runs[-1].template,
                 batch_size=runs[-1].batch_size)
    if len({run.model_args for run in runs}) > 1:
        warnings.append(f"{path}: its results files score different models or model_args "
                        f"({'; '.join(sorted({run.model_args for run in runs}))}); they make one row here")
    for run in runs:
        for name, value in vars(run).items():  # every collection a row holds (scores, other tasks, ...)
            target = getattr(merged, name)
            if isinstance(value, dict):
                repeated = set(target) & set(value)
                if name == "scores" and repeated:
                    warnings.append(f"{path}: {', '.join(sorted(repeated))} scored in more than one results file; "
                                    f"the row shows {run.path.name}'s")
                target.update(value)
            elif isinstance(value, list):
                target.extend(v for v in value if v not in target)
    return merged


def check_results(paths: list[str | Path], tasks: list[str]) -> list[str]:
    """Problems that make a run unusable: a requested task missing from every results file, or one of its metrics
    (the task config's metric_list) missing or not a number. lmms-eval exits 0 on failure, so scripts check this."""
    try:
        files = find_results(paths)
    except SummaryError as error:
        return [str(error)]
    problems = []
    for task in tasks:
        holders = []
        for path in files:
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if task in (data.get("results") or {}):
                holders.append(data)
        if not holders:
            problems.append(f"{task}: in no results file")
            continue
        data = holders[-1]
        metrics = [m.get("metric") for m in (data.get("configs") or {}).get(task, {}).get("metric_list") or []]
        benchmark = benchmark_for_task(task)
        if not metrics and benchmark is not None:
            metrics = [benchmark.metric]
        if not metrics:
            problems.append(f"{task}: the results file lists no metrics for it")
        for metric in metrics:
            value = data["results"][task].get(f"{metric},none")
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                problems.append(f"{task}: metric {metric} is {value!r}, not a number")
    return problems
