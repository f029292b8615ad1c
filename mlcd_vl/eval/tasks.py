"""The five benchmarks of the MLCD table and their offline lmms-eval task definitions.

`BENCHMARKS` lists lmms-eval's task, our offline task, its data file, the metric and the unit the paper reports.
`task_yaml(benchmark, data_files)` renders an offline task: the official 0.7.3 settings (prompts, generation kwargs,
metrics, utils imported from `lmms_eval.tasks.<name>.utils`) over local parquet files; `eval/*.yaml` are these
files rendered with `data/<stem>.parquet` (tested to stay identical), and `write_task_dir` renders them for any
data folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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


# The official task bodies of lmms-eval 0.7.3 (tasks/<name>/*.yaml with their includes merged), minus the dataset
# keys and tags; `!function utils.x` became `!function lmms_eval.tasks.<name>.utils.x` (an absolute import).
_U = "!function lmms_eval.tasks.{}.utils."
_BODIES = {
    "chartqa": f"""output_type: generate_until
doc_to_visual: {_U.format('chartqa')}chartqa_doc_to_visual
doc_to_text: {_U.format('chartqa')}chartqa_doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 16
  temperature: 0
  do_sample: False
process_results: {_U.format('chartqa')}chartqa_process_results
metric_list:
  - metric: relaxed_overall
    aggregation: mean
    higher_is_better: true
  - metric: relaxed_human_split
    aggregation: mean
    higher_is_better: true
  - metric: relaxed_augmented_split
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question with a single word."
  qwen_vl:
    pre_prompt: ""
    post_prompt: " Answer:"
""",
    "docvqa_val": f"""output_type: generate_until
doc_to_visual: {_U.format('docvqa')}docvqa_doc_to_visual
doc_to_text: {_U.format('docvqa')}docvqa_doc_to_text
doc_to_target: "answers"
generation_kwargs:
  max_new_tokens: 32
  temperature: 0
  do_sample: False
metric_list:
  - metric: anls
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
  qwen_vl:
    pre_prompt: ""
    post_prompt: " Answer:"
""",
    "infovqa_val": f"""output_type: generate_until
doc_to_visual: {_U.format('infovqa')}infovqa_doc_to_visual
doc_to_text: {_U.format('infovqa')}infovqa_doc_to_text
doc_to_target: "answers"
generation_kwargs:
  max_new_tokens: 32
  temperature: 0
  do_sample: False
metric_list:
  - metric: anls
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
""",
    "ocrbench": f"""output_type: generate_until
doc_to_visual: {_U.format('ocrbench')}ocrbench_doc_to_visual
doc_to_text: {_U.format('ocrbench')}ocrbench_doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 128
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
process_results: {_U.format('ocrbench')}ocrbench_process_results
metric_list:
  - metric: ocrbench_accuracy
    aggregation: {_U.format('ocrbench')}ocrbench_aggregate_accuracy
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: ""
  plm:
    pre_prompt: ""
    post_prompt: "\\nProvide a short and direct response."
metadata:
  - version: 0.0
""",
    "mmmu_val": f"""output_type: generate_until
doc_to_visual: {_U.format('mmmu')}mmmu_doc_to_visual
doc_to_text: {_U.format('mmmu')}mmmu_doc_to_text
doc_to_target: "answer"
doc_to_messages: {_U.format('mmmu')}mmmu_doc_to_messages
process_results: {_U.format('mmmu')}mmmu_process_results
metric_list:
  - metric: mmmu_acc
    aggregation: {_U.format('mmmu')}mmmu_aggregate_results
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    prompt_type: "format"
    multiple_choice_prompt: "Answer with the option's letter from the given choices directly."
    open_ended_prompt: "Answer the question using a single word or phrase."
  qwen3_vl:
    format: "qwen3_vl"
    pre_prompt: "Question: "
    post_prompt: "Answer with the option letter only."
    open_ended_prompt: "Please select the correct answer from the options above."
generation_kwargs:
  max_new_tokens: 128
metadata:
  version: 0.0
  interleaved_format: false
""",
}


def task_yaml(benchmark: Benchmark, data_files: str | list[str]) -> str:
    """The offline task YAML for a benchmark over `data_files` (relative to the YAML's folder, or absolute)."""
    files = [data_files] if isinstance(data_files, str) else list(data_files)
    listed = "\n".join(f"      - {_quote(f)}" for f in files)
    return (f"# Offline twin of lmms-eval 0.7.3 `{benchmark.task}`: same prompts, generation kwargs and metrics,\n"
            f"# data from local parquet files in the benchmark's own schema. Generated by mlcd_vl.eval.tasks.task_yaml.\n"
            f"task: {benchmark.local_task}\n"
            f"tag: []\n"
            f"dataset_path: parquet\n"
            f"dataset_kwargs:\n"
            f"  data_files:\n"
            f"    {benchmark.split}:\n{listed}\n"
            f"test_split: {benchmark.split}\n"
            + _BODIES[benchmark.stem])


def _quote(path: str) -> str:
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


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
