"""`mlcd-vl eval summarize` over several run folders: one row per folder (its results files merged), and the scoring
settings of the rows (lmms-eval version, task versions and prompts, template, generation settings, model arguments)
recorded and compared, with a warning for each that differs. Synthetic variants of the recorded lmms-eval 0.7.3 run
in tests/data/eval_results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mlcd_vl.eval import compare
from mlcd_vl.eval.cli import main
from mlcd_vl.eval.summarize import published_row, summarize_paths

RECORDED = Path(__file__).parent / "data" / "eval_results"
STAMP = "20261127_230025"


def _run(tmp_path: Path, name: str, edit=None, model: str | None = None) -> Path:
    folder = tmp_path / name
    shutil.copytree(RECORDED, folder)
    path = folder / f"{STAMP}_results.json"
    data = json.loads(path.read_text())
    data["lmms_eval_version"] = "0.7.3"
    if model is not None:
        data["config"]["model_args"] = f"pretrained={model}"
    if edit is not None:
        edit(data)
    path.write_text(json.dumps(data))
    return folder


def _checkpoint(tmp_path: Path, name: str, template: str = "qwen_1_5") -> Path:
    folder = tmp_path / "models" / name / "stage2"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"mlcd_vl": {"template": template}}))
    return folder


def test_runs_scored_the_same_way_compare_without_warnings(tmp_path):
    first = _run(tmp_path, "a", model=_checkpoint(tmp_path, "a"))
    second = _run(tmp_path, "b", model=_checkpoint(tmp_path, "b"))
    summary = summarize_paths([first, second], published=False)
    assert len(summary.runs) == 2
    assert not [w for w in summary.warnings if w.startswith("rows differ")]
    assert "## Scoring settings across rows" in summary.markdown and "identical" in summary.markdown
    # both checkpoints are folders called stage2: the rows are named by their run folders instead
    assert f"| [1] {first} |" in summary.markdown and f"| [2] {second} |" in summary.markdown


def test_each_differing_scoring_setting_is_a_warning_naming_both_values(tmp_path):
    first = _run(tmp_path, "a", model=_checkpoint(tmp_path, "a"))

    def edit(data):
        data["lmms_eval_version"] = "0.7.2"
        data["versions"]["mlcd_chartqa_local"] = 2.0
        chartqa = data["configs"]["mlcd_chartqa_local"]
        chartqa["generation_kwargs"]["max_new_tokens"] = 16
        chartqa["lmms_eval_specific_kwargs"]["default"]["post_prompt"] = " Answer briefly."
        data["config"]["model_args"] += ",dtype=float16,repetition_penalty=checkpoint"
        data["config"]["batch_size"] = "1"

    second = _run(tmp_path, "b", edit, model=_checkpoint(tmp_path, "b", template="plain"))
    summary = summarize_paths([first, second], published=False)
    differing = {w.split(":")[0] for w in summary.warnings if w.startswith("rows differ")}
    assert differing == {"rows differ in lmms-eval version", "rows differ in template",
                         "rows differ in model_args (besides pretrained)", "rows differ in batch size",
                         "rows differ in ChartQA", "rows differ in DocVQA", "rows differ in InfoVQA",
                         "rows differ in OCRBench", "rows differ in MMMU"}
    warnings = "\n".join(summary.warnings)
    assert "rows differ in lmms-eval version: [1]: 0.7.3; [2]: 0.7.2" in warnings
    assert "rows differ in template: [1]: qwen_1_5; [2]: plain" in warnings
    assert "rows differ in ChartQA: version: [1]: Yaml (metadata 0.0); [2]: 2.0 (metadata 0.0)" in warnings
    assert 'rows differ in ChartQA: prompt: [1]: {"pre_prompt": "", "post_prompt": "\\nAnswer the question' in warnings
    assert "max_new_tokens=4" in warnings and "max_new_tokens=16" in warnings
    # the checkpoint's repetition penalty changes every benchmark's generation settings
    assert "rows differ in MMMU: generation" in warnings and "repetition_penalty=null" in warnings
    table = summary.markdown.split("## Scoring settings across rows")[1]
    assert "| setting | [1] | [2] |" in table and "| lmms-eval version | `0.7.3` | `0.7.2` |" in table


def test_git_commits_recorded_in_place_of_a_release_are_not_a_difference(tmp_path):
    """lmms-eval records `branch@commit` of the git repository around it when it has no release number: runs of one
    installed lmms-eval made at different commits of that repository are scored alike."""

    def recorded(commit):
        return lambda data: data.update(lmms_eval_version=f"main@{commit}")

    first = _run(tmp_path, "a", recorded("d162358"), model=_checkpoint(tmp_path, "a"))
    second = _run(tmp_path, "b", recorded("3615833"), model=_checkpoint(tmp_path, "b"))
    summary = summarize_paths([first, second], published=False)
    assert not [w for w in summary.warnings if w.startswith("rows differ")]
    rows = [compare.row_settings(sorted(folder.glob("*_results.json")), name) for name, folder in
            (("a", first), ("b", second))]
    assert rows[0].settings["lmms-eval version"] == f"{compare.installed_lmms_eval_version()} (installed here)"
    assert "the file records 'main@d162358'" in summary.markdown  # each row's own section still says what it recorded


def test_results_files_of_one_run_folder_make_one_row(tmp_path):
    folder = _run(tmp_path, "split", model=_checkpoint(tmp_path, "split"))
    data = json.loads((folder / f"{STAMP}_results.json").read_text())
    later = dict(data, results={"mlcd_mmmu_val_local": {"mmmu_acc,none": 0.75}})
    data["results"].pop("mlcd_mmmu_val_local")
    (folder / f"{STAMP}_results.json").write_text(json.dumps(data))
    (folder / "20261128_090000_results.json").write_text(json.dumps(later))
    other = _run(tmp_path, "other", model=_checkpoint(tmp_path, "other"))
    summary = summarize_paths([folder, other], published=False)
    assert len(summary.runs) == 2
    assert set(summary.runs[0].scores) == {"ChartQA", "DocVQA", "InfoVQA", "OCRBench", "MMMU"}
    assert summary.runs[0].scores["MMMU"].value == 75.0 and summary.runs[1].scores["MMMU"].value == 50.0
    assert not [w for w in summary.warnings if w.startswith("rows differ")]

    (folder / "20261129_090000_results.json").write_text(json.dumps(later))  # MMMU scored again
    summary = summarize_paths([folder], published=False)
    assert any("MMMU scored in more than one results file; the row shows 20261129_090000_results.json's" in w
               for w in summary.warnings)


def test_cli_over_several_folders_prints_the_differences(tmp_path, capsys):
    first = _run(tmp_path, "a", model=_checkpoint(tmp_path, "a"))
    second = _run(tmp_path, "b", lambda d: d.update(lmms_eval_version="0.7.2"), model=_checkpoint(tmp_path, "b"))
    assert main(["summarize", str(first), str(second)]) == 0
    captured = capsys.readouterr()
    assert "warning: rows differ in lmms-eval version: [1]: 0.7.3; [2]: 0.7.2" in captured.err
    assert "| published: MLCD (ViT-bigG-14-448px) |" in captured.out


def test_published_rows_are_found_by_tower_preset():
    from mlcd_vl import presets

    assert published_row("mlcd-bigG-448") == ("MLCD (ViT-bigG-14-448px)", {
        "ChartQA": 73.80, "DocVQA": 83.34, "InfoVQA": 46.59, "OCRBench": 582, "MMMU": 46.00})
    assert {name: published_row(name)[0] for name in presets.TOWERS} == {
        "clip-vitL-336": "CLIP (ViT-L-14-336px)", "siglip-so400m-384": "SigLIP (ViT-SO400M-384px)",
        "dfn5b-vitH-378": "DFN5B (ViT-H-14-378px)", "mlcd-vitL-336": "MLCD (ViT-L-14-336px)",
        "mlcd-bigG-336": "MLCD (ViT-bigG-14-336px)", "mlcd-bigG-448": "MLCD (ViT-bigG-14-448px)"}
    assert published_row("my-tower") is None


def test_row_settings_skip_unreadable_files_and_a_single_row_has_no_comparison(tmp_path):
    (tmp_path / "bad_results.json").write_text("{")
    row = compare.row_settings([tmp_path / "bad_results.json"], "[1]")
    assert row.settings == {}
    assert compare.render_differences([row]) == "" and compare.compare([row]) == []
