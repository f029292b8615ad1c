"""`mlcd-vl eval summarize` on a recorded lmms-eval 0.7.3 run (tiny model, synthetic sets: tests/data/eval_results)
and on variants of it built here; the results check that scripts/eval.sh relies on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mlcd_vl.eval.cli import main
from mlcd_vl.eval.summarize import check_results, summarize_paths

RECORDED = Path(__file__).parent / "data" / "eval_results"
STAMP = "20261127_230025"
LOCAL_TASKS = ["mlcd_chartqa_local", "mlcd_docvqa_val_local", "mlcd_infovqa_val_local", "mlcd_ocrbench_local",
               "mlcd_mmmu_val_local"]


def _copy(tmp_path: Path, edit=None) -> Path:
    folder = tmp_path / "run"
    shutil.copytree(RECORDED, folder)
    if edit is not None:
        path = folder / f"{STAMP}_results.json"
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    return folder


def test_recorded_run_in_paper_units_with_settings_and_warnings():
    summary = summarize_paths([RECORDED])
    (run,) = summary.runs
    assert {name: score.value for name, score in run.scores.items()} == {
        "ChartQA": 0.0, "DocVQA": 0.0, "InfoVQA": 0.0, "OCRBench": 0.0, "MMMU": 50.0}
    assert run.scores["OCRBench"].ocrbench_points == 0 and run.scores["OCRBench"].documents == 4
    assert run.scores["OCRBench"].generation == {"max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                                                 "repetition_penalty": 1.0, "stop": ("\n\n",)}
    text = summary.markdown
    assert "| [1] mlcd_llava: model | 0.00 | 0.00 | 0.00 | 0 | 50.00 |" in text
    assert "| published: MLCD (ViT-bigG-14-448px) | 73.80 | 83.34 | 46.59 | 582 | 46.00 |" in text
    assert "lmms-eval: 0.7.3 (installed here; the file records 'main@01aec39')" in text
    assert "template: unknown (checkpoint not readable here)" in text
    row = '| OCRBench | mlcd_ocrbench_local | 0 (0 of 4 items right) | 4 | 4 | 0.0 | 1.0 | 0 | 1 | 1.0 | "\\n\\n" |'
    assert row in text
    assert any("4 of OCRBench's 1000 items" in w and "points/1000" in w for w in summary.warnings)
    assert any("mlcd_chartqa_local ran on 4 of 2500" in w for w in summary.warnings)


def test_full_runs_recorded_versions_templates_and_penalties(tmp_path):
    model = tmp_path / "ckpt"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"mlcd_vl": {"template": "qwen_1_5"}}))

    def edit(data):
        data["lmms_eval_version"] = "0.7.3"
        data["config"]["model_args"] = f"pretrained={model},repetition_penalty=checkpoint"
        data["results"]["mlcd_ocrbench_local"]["ocrbench_accuracy,none"] = 0.582
        for task in data["n-samples"]:
            data["n-samples"][task]["effective"] = 5349 if "docvqa" in task else 3000
        data["n-samples"]["mlcd_ocrbench_local"]["effective"] = 1000

    folder = _copy(tmp_path, edit)
    (folder / f"{STAMP}_samples_mlcd_ocrbench_local.jsonl").unlink()
    summary = summarize_paths([folder], published=False)
    assert summary.runs[0].scores["OCRBench"].value == pytest.approx(582.0)
    assert "lmms-eval: 0.7.3\n" in summary.markdown and "template: qwen_1_5" in summary.markdown
    assert "| checkpoint's |" in summary.markdown and "published:" not in summary.markdown
    assert not [w for w in summary.warnings if "OCRBench" in w or "of 5349" in w]


def test_empty_answers_in_sample_logs_are_reported(tmp_path):
    folder = _copy(tmp_path)
    samples = folder / f"{STAMP}_samples_mlcd_chartqa_local.jsonl"
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    lines[1]["filtered_resps"] = ""
    samples.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    summary = summarize_paths([folder])
    assert summary.runs[0].scores["ChartQA"].empty_answers == 1
    assert any("1 of 4 answers are empty" in w for w in summary.warnings)


def test_results_check_finds_missing_tasks_and_metrics(tmp_path):
    assert check_results([RECORDED], LOCAL_TASKS) == []
    assert check_results([RECORDED], ["chartqa"]) == ["chartqa: in no results file"]
    assert "no *_results.json" in check_results([tmp_path], ["chartqa"])[0]

    def drop(data):
        del data["results"]["mlcd_chartqa_local"]["relaxed_human_split,none"]
        data["results"]["mlcd_mmmu_val_local"]["mmmu_acc,none"] = "N/A"

    problems = check_results([_copy(tmp_path, drop)], LOCAL_TASKS)
    assert problems == ["mlcd_chartqa_local: metric relaxed_human_split is None, not a number",
                        "mlcd_mmmu_val_local: metric mmmu_acc is 'N/A', not a number"]


def test_cli(tmp_path, capsys):
    out = tmp_path / "summary.md"
    assert main(["summarize", str(RECORDED), "--output", str(out), "--require", ",".join(LOCAL_TASKS)]) == 0
    assert out.read_text() == capsys.readouterr().out
    assert main(["summarize", str(RECORDED), "--require", "ocrbench"]) == 1
    assert "missing result: ocrbench" in capsys.readouterr().err
    assert main(["summarize", str(tmp_path / "nothing")]) == 2
    assert main([]) == 2


def test_cli_passes_lmms_arguments_through_and_writes_task_dirs(tmp_path, capsys):
    import argparse

    from mlcd_vl.eval.cli import configure_parser

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["lmms", "--model", "mlcd_llava", "--tasks", "chartqa", "-h"])
    assert args.eval_command == "lmms" and args.lmms_args == ["--model", "mlcd_llava", "--tasks", "chartqa", "-h"]
    assert main(["tasks", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["tasks", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "no benchmark data" in capsys.readouterr().err
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ocrbench.parquet").write_bytes(b"")
    assert main(["tasks", str(tmp_path / "data"), str(tmp_path / "out")]) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mlcd_ocrbench_local.yaml"]


def test_tasks_outside_the_mlcd_table_get_their_own_table(tmp_path):
    """The CPU demo's tasks (ChartQA's metrics without its augmented split) show their scores, and pass --require."""
    demo = {"alias": "mlcd_demo_colour", "relaxed_overall,none": 0.9583, "relaxed_overall_stderr,none": 0.0417,
            "relaxed_overall_stderr_clustered,none": "N/A", "relaxed_human_split,none": 0.9583}

    def only_demo(data):
        data["results"] = {"mlcd_demo_colour": demo}
        data["n-samples"] = {"mlcd_demo_colour": {"original": 24, "effective": 24}}
        data["configs"] = {"mlcd_demo_colour": {"metric_list": [{"metric": "relaxed_overall"},
                                                                {"metric": "relaxed_human_split"}]}}

    folder = _copy(tmp_path, only_demo)
    text = summarize_paths([folder]).markdown
    assert "| [1] mlcd_llava: model | mlcd_demo_colour | relaxed_overall | 0.9583 | 24 |" in text
    assert "| [1] mlcd_llava: model | mlcd_demo_colour | relaxed_human_split | 0.9583 | 24 |" in text
    assert "stderr" not in text and "published:" not in text and "| Model | ChartQA |" not in text
    assert check_results([folder], ["mlcd_demo_colour"]) == []

    def both(data):
        data["results"]["mlcd_demo_colour"] = demo
    text = summarize_paths([_copy(tmp_path / "both", both)]).markdown
    assert "| [1] mlcd_llava: model | 0.00 | 0.00 | 0.00 | 0 | 50.00 |" in text and "published:" in text
    assert "| [1] mlcd_llava: model | mlcd_demo_colour | relaxed_overall | 0.9583 | ? |" in text
