"""The five benchmarks of the MLCD table and their offline lmms-eval task definitions.

`BENCHMARKS` lists lmms-eval's task, our offline task, its data file, the metric and the unit the paper reports.
`task_yaml(benchmark, data_files)` renders an offline task: the settings of the installed lmms-eval's own task file
(prompts, generation kwargs, metrics, utils imported from `lmms_eval.tasks.<name>.utils`; read, never copied) over
local parquet files; `eval/*.yaml` are these files rendered with `data/<stem>.parquet` (tested to stay identical),
and `write_task_dir` renders them for any data folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Benchmark:
    name: str  # column of the MLCD table
    task: str  # lmms-eval 0.7.3 task
    local_task: str  # our offline twin (eval/<local_task>.yaml)
    stem: str  # data file: <data>/<stem>.parquet or shards under <data>/<stem>/
    split: str
    metric: str  # key in results.json, without ",none"
    scale: float  # results value x scale = the paper's unit
    unit: str
    full_size: int  # documents in the official split


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("ChartQA", "chartqa", "mlcd_chartqa_local", "chartqa", "test", "relaxed_overall", 100,
              "relaxed accuracy x100", 2500),
    Benchmark("DocVQA", "docvqa_val", "mlcd_docvqa_val_local", "docvqa_val", "validation", "anls", 100,
              "ANLS x100", 5349),
    Benchmark("InfoVQA", "infovqa_val", "mlcd_infovqa_val_local", "infovqa_val", "validation", "anls", 100,
              "ANLS x100", 2801),
    Benchmark("OCRBench", "ocrbench", "mlcd_ocrbench_local", "ocrbench", "test", "ocrbench_accuracy", 1000,
              "points of 1000", 1000),
    Benchmark("MMMU", "mmmu_val", "mlcd_mmmu_val_local", "mmmu_val", "validation", "mmmu_acc", 100,
              "accuracy x100", 900),
)


def benchmark_for_task(task: str) -> Benchmark | None:
    return next((b for b in BENCHMARKS if task in (b.task, b.local_task)), None)


# Where lmms-eval keeps each benchmark's own task file (under lmms_eval/tasks/), and its keys that name the data.
BUILTIN_TASKS = {"chartqa": "chartqa/chartqa.yaml", "docvqa_val": "docvqa/docvqa_val.yaml",
                 "infovqa_val": "infovqa/infovqa_val.yaml", "ocrbench": "ocrbench/ocrbench.yaml",
                 "mmmu_val": "mmmu/mmmu_val.yaml"}
DATASET_KEYS = ("task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "test_split")


class _Function(str):
    """A `!function module.name` reference, kept as text and written back as one."""


class _Quoted(str):
    """A string written in double quotes (data file paths)."""


class _Dumper(yaml.SafeDumper):
    def represent_str(self, value: str):
        return self.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\n" in value else None)


_Dumper.add_representer(str, _Dumper.represent_str)
_Dumper.add_representer(_Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))
_Dumper.add_representer(_Quoted, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value,
                                                                               style='"'))


def _read_task(path: Path) -> dict:
    """A task file with its `include`s merged as lmms-eval merges them; `!function utils.x` becomes the absolute
    `lmms_eval.tasks.<folder>.utils.x`, so the offline copy imports the official utils from anywhere."""
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: _Function(
        f"lmms_eval.tasks.{path.parent.name}.{loader.construct_scalar(node)}"))
    config = yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 - a SafeLoader with one more tag
    includes = config.pop("include", [])
    merged: dict = {}
    for name in reversed([includes] if isinstance(includes, str) else includes):  # the first include wins
        merged.update(_read_task(path.parent / name))
    return {**merged, **config}


def task_body(benchmark: Benchmark) -> dict:
    """lmms-eval's own settings of the benchmark (prompts, generation kwargs, metrics), minus its dataset keys."""
    import lmms_eval

    config = _read_task(Path(lmms_eval.__file__).parent / "tasks" / BUILTIN_TASKS[benchmark.stem])
    return {key: value for key, value in config.items() if key not in DATASET_KEYS}


def task_yaml(benchmark: Benchmark, data_files: str | list[str], metrics: tuple[str, ...] | None = None) -> str:
    """The offline task YAML for a benchmark over `data_files` (relative to the YAML's folder, or absolute): the
    installed lmms-eval's own task settings (the one source) over local parquet files. `metrics` keeps only those
    entries of its metric_list (for data that never produces the others, e.g. ChartQA without augmented items)."""
    files = [_Quoted(f) for f in ([data_files] if isinstance(data_files, str) else data_files)]
    head = {"task": benchmark.local_task, "tag": [], "dataset_path": "parquet",
            "dataset_kwargs": {"data_files": {benchmark.split: files}}, "test_split": benchmark.split}
    body = task_body(benchmark)
    if metrics is not None:
        known = [entry["metric"] for entry in body["metric_list"]]
        if unknown := sorted(set(metrics) - set(known)):
            raise ValueError(f"{benchmark.task} has no metric {', '.join(unknown)} (it has {', '.join(known)})")
        body["metric_list"] = [entry for entry in body["metric_list"] if entry["metric"] in metrics]
    return (f"# Offline twin of lmms-eval `{benchmark.task}`: its own prompts, generation kwargs and metrics, over\n"
            f"# local parquet files in the benchmark's own schema. Generated by mlcd_vl.eval.tasks.task_yaml.\n"
            + yaml.dump({**head, **body}, Dumper=_Dumper, sort_keys=False, width=120,
                        allow_unicode=True))


def find_data_files(data_dir: str | Path, benchmark: Benchmark) -> list[Path]:
    """`<data>/<stem>.parquet`, else the parquet shards under `<data>/<stem>/` (only the split's own shards when
    their names say which split they hold, as in the hub layout `validation-00000-of-00003.parquet`)."""
    data_dir = Path(data_dir)
    single = data_dir / f"{benchmark.stem}.parquet"
    if single.is_file():
        return [single.resolve()]
    folder = data_dir / benchmark.stem
    shards = sorted(folder.rglob("*.parquet")) if folder.is_dir() else []
    own = [s for s in shards if s.name.startswith(benchmark.split)]
    return [s.resolve() for s in (own or shards)]


def write_task_dir(out: str | Path, data_dir: str | Path | None = None, *, relative: bool = False) -> list[Path]:
    """Write one YAML per benchmark into `out` (an lmms-eval `--include_path`).

    With `data_dir`, the YAMLs name that folder's files by absolute path (benchmarks without data are skipped);
    with `relative=True` they read `data/<stem>.parquet` next to themselves (the checked-in `eval/` folder).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for benchmark in BENCHMARKS:
        if relative:
            files: list[str] = [f"data/{benchmark.stem}.parquet"]
        else:
            files = [str(p) for p in find_data_files(data_dir, benchmark)] if data_dir is not None else []
            if not files:
                continue
        path = out / f"{benchmark.local_task}.yaml"
        path.write_text(task_yaml(benchmark, files))
        written.append(path)
    return written
