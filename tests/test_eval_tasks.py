"""Offline task YAMLs (identical to the generator, same settings as lmms-eval's built-ins) and the synthetic sets
(benchmark schemas, deterministic, accepted by the official task utils)."""

from __future__ import annotations

import ast
import inspect
import os
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

import lmms_eval  # noqa: E402
from datasets import load_dataset  # noqa: E402
from lmms_eval.utils import load_yaml_config  # noqa: E402

from mlcd_vl.eval.tasks import BENCHMARKS, find_data_files, task_yaml, write_task_dir  # noqa: E402
from mlcd_vl.eval.synthetic import features, make_synthetic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = Path(lmms_eval.__file__).parent / "tasks"
BUILTIN = {"chartqa": "chartqa/chartqa.yaml", "docvqa_val": "docvqa/docvqa_val.yaml",
           "infovqa_val": "infovqa/infovqa_val.yaml", "ocrbench": "ocrbench/ocrbench.yaml",
           "mmmu_val": "mmmu/mmmu_val.yaml"}
DATASET_KEYS = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs"}


def _comparable(value):
    """Functions by name and source file (the built-in loads utils.py by path, ours imports the module)."""
    if callable(value):
        return ("function", value.__name__, os.path.realpath(inspect.getsourcefile(value)))
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


def test_checked_in_yamls_are_the_generated_ones(tmp_path):
    write_task_dir(tmp_path, relative=True)
    for benchmark in BENCHMARKS:
        assert (REPO / "eval" / f"{benchmark.local_task}.yaml").read_text() == \
            (tmp_path / f"{benchmark.local_task}.yaml").read_text(), f"regenerate eval/ ({benchmark.local_task})"


@pytest.mark.parametrize("benchmark", BENCHMARKS, ids=[b.stem for b in BENCHMARKS])
def test_local_task_settings_equal_the_builtin(benchmark):
    ours = load_yaml_config(str(REPO / "eval" / f"{benchmark.local_task}.yaml"))
    theirs = load_yaml_config(str(TASKS_DIR / BUILTIN[benchmark.stem]))
    assert theirs["task"] == benchmark.task and ours["task"] == benchmark.local_task
    assert theirs["test_split"] == ours["test_split"] == benchmark.split
    assert ours["dataset_path"] == "parquet" and ours["tag"] == []
    assert ours["dataset_kwargs"]["data_files"] == {benchmark.split: [f"data/{benchmark.stem}.parquet"]}
    strip = lambda config: _comparable({k: v for k, v in config.items() if k not in DATASET_KEYS})  # noqa: E731
    assert strip(ours) == strip(theirs)
    assert benchmark.metric in [m["metric"] for m in ours["metric_list"]]


def test_task_dir_for_a_data_folder_uses_absolute_paths_and_hub_shards(tmp_path):
    data = tmp_path / "data"
    make_synthetic(data, items=1, stems=["chartqa"])
    shards = data / "docvqa_val"
    shards.mkdir()
    for name in ("validation-00000-of-00002.parquet", "validation-00001-of-00002.parquet", "test-00000.parquet"):
        (shards / name).write_bytes(b"")
    written = write_task_dir(tmp_path / "tasks", data)
    assert [p.name for p in written] == ["mlcd_chartqa_local.yaml", "mlcd_docvqa_val_local.yaml"]
    docvqa = next(b for b in BENCHMARKS if b.stem == "docvqa_val")
    assert [p.name for p in find_data_files(data, docvqa)] == ["validation-00000-of-00002.parquet",
                                                               "validation-00001-of-00002.parquet"]
    config = load_yaml_config(str(written[0]), mode="simple")
    assert config["dataset_kwargs"]["data_files"] == {"test": [str((data / "chartqa.parquet").resolve())]}
    assert "\n".join(task_yaml(docvqa, ["/x/a b.parquet"]).splitlines()[:10]).count('"/x/a b.parquet"') == 1


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    paths = make_synthetic(root / "a", items=6, seed=3)
    rows = {stem: load_dataset("parquet", data_files={"x": str(path)}, cache_dir=str(root / "hf"))["x"]
            for stem, path in paths.items()}
    return {"root": root, "paths": paths, "rows": rows}


def test_synthetic_sets_are_deterministic(synthetic):
    again = make_synthetic(synthetic["root"] / "b", items=6, seed=3)
    other = make_synthetic(synthetic["root"] / "c", items=6, seed=4, stems=["chartqa"])
    for stem, path in synthetic["paths"].items():
        assert path.read_bytes() == again[stem].read_bytes(), stem
    assert other["chartqa"].read_bytes() != synthetic["paths"]["chartqa"].read_bytes()


def test_synthetic_schema_matches_the_benchmarks(synthetic):
    for stem, dataset in synthetic["rows"].items():
        assert dataset.features == features()[stem], stem
        assert len(dataset) == 6
    assert set(synthetic["rows"]["docvqa_val"].features) >= {"questionId", "question", "answers", "image"}
    assert set(synthetic["rows"]["mmmu_val"].features) >= {"id", "options", "answer", "question_type",
                                                           *(f"image_{k}" for k in range(1, 8))}


def test_official_task_utils_accept_the_synthetic_rows(synthetic):
    from lmms_eval.api.metrics import anls
    from lmms_eval.tasks.chartqa import utils as chartqa
    from lmms_eval.tasks.mmmu import utils as mmmu
    from lmms_eval.tasks.ocrbench import utils as ocrbench

    rows = synthetic["rows"]
    chart = rows["chartqa"]
    assert {row["type"] for row in chart} == {"human_test", "augmented_test"}
    for row in chart:
        assert chartqa.chartqa_doc_to_visual(row)[0].mode == "RGB"
        assert chartqa.chartqa_process_results(row, [row["answer"]])["relaxed_overall"] == 1.0
    for stem in ("docvqa_val", "infovqa_val"):
        for row in rows[stem]:
            assert anls(references=row["answers"], predictions=[row["answers"][0]])["anls"] == 1.0
    for row in rows["ocrbench"]:
        assert row["question_type"] in ocrbench.OCRBench_score
        scored = ocrbench.ocrbench_process_results(row, [f"It says {row['answer'][0]}."])["ocrbench_accuracy"]
        assert scored["score"] == 1
    image_counts = set()
    for row in rows["mmmu_val"]:
        assert mmmu.extract_subset_name(row["id"]) in {s for subs in mmmu.DOMAIN_CAT2SUB_CAT.values() for s in subs}
        visuals = mmmu.mmmu_doc_to_visual(row)
        image_counts.add(len(visuals))
        if row["question_type"] == "multiple-choice":
            options = ast.literal_eval(row["options"])
            right = options["ABCD".index(row["answer"])]
            result = mmmu.mmmu_process_results(row, [row["answer"]])["mmmu_acc"]
            assert result["parsed_pred"] == [row["answer"]] and right
        else:
            assert mmmu.mmmu_process_results(row, [row["answer"]])["mmmu_acc"]["parsed_pred"]
    assert image_counts == {1, 2, 3}
    results = [mmmu.mmmu_process_results(row, [row["answer"]])["mmmu_acc"] for row in rows["mmmu_val"]]
    assert mmmu.mmmu_aggregate_results(results) == 1.0
