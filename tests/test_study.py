"""The encoder study (`mlcd-vl study`): every tower gets the same recipe but for the tower and its own image settings,
finished steps are not redone (and steps finished with other settings are refused), runs on different data are not
compared unless told, and the CPU study runs end to end with two tiny tower families, then redoes nothing."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlcd_vl import presets
from mlcd_vl.study import ledger, run as study_run
from mlcd_vl.study.towers import StudyError, parse_towers, tiny_crop
from mlcd_vl.train.config import config_to_dict, load_config

REPO = Path(__file__).resolve().parents[1]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    study_run.configure_parser(parser)
    return parser.parse_args(list(argv))


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ------------------------------------------------------------------ only the tower changes


def test_every_tower_trains_the_bigG_recipes_with_only_its_tower_and_grid_changed(tmp_path):
    study = study_run.Study(_args("--towers", "all", "--allow-pickle", "--workdir", str(tmp_path),
                                  "--set", "data.num_workers=4", "--stage1-set", "data.image_folder=/data/lcs",
                                  "--stage2-set", "data.image_folder=/data/next", "optim.max_steps=7"))
    assert [t.key for t in study.towers] == list(presets.TOWERS)
    assert [p.name for p in study.recipes] == ["mlcd_bigG448_stage1.yaml", "mlcd_bigG448_stage2.yaml"]
    per_tower = {0: "model.tower", 1: "model.pinpoints", 2: "output_dir", 3: "model.init_from",
                 4: "model.allow_pickle"}
    for stage in (1, 2):
        configs = {}
        for tower in study.towers:
            step = study.stage_step(tower, stage)
            config = _flat(config_to_dict(load_config(step.recipe, step.overrides)))
            assert config["model.tower"] == tower.preset.name  # build_vlm takes the image settings from the preset
            assert config["output_dir"] == str(tmp_path / tower.key / f"stage{stage}")
            if stage == 2:
                assert [tuple(p) for p in config["model.pinpoints"]] == presets.upstream_grid(tower.preset.image_size)
                assert config["model.init_from"] == str(tmp_path / tower.key / "stage1")
                assert config["optim.max_steps"] == 7
            assert config["model.allow_pickle"] == (tower.key == "dfn5b-vitH-378")
            assert config["data.num_workers"] == 4
            assert config["data.image_folder"] == ("/data/lcs" if stage == 1 else "/data/next")
            configs[tower.key] = config
        first = configs["mlcd-bigG-448"]
        for key, config in configs.items():
            differing = {k for k in first if first[k] != config[k]}
            assert differing <= set(per_tower.values()), (stage, key, differing)
    evals = [study.eval_step(t).settings for t in study.towers]
    assert all(settings == evals[0] for settings in evals)


def test_tower_settings_cannot_be_overridden_and_dfn5b_needs_the_pickle_flag(tmp_path):
    with pytest.raises(StudyError, match="sets model.tower per tower"):
        study_run.Study(_args("--towers", "clip-vitL-336,siglip-so400m-384", "--set", "model.tower=x",
                              "--workdir", str(tmp_path)))
    with pytest.raises(StudyError, match="--allow-pickle"):
        study_run.Study(_args("--towers", "clip-vitL-336,dfn5b-vitH-378", "--workdir", str(tmp_path)))
    with pytest.raises(StudyError, match="not a tower preset"):
        parse_towers("clip-vitL-336,my-tower", tiny=False)
    with pytest.raises(StudyError, match="exactly one"):
        study_run.resolve_recipes(str(REPO / "configs" / "recipes"), tiny=False)
    prefix = study_run.resolve_recipes(str(REPO / "configs" / "recipes" / "tiny"), tiny=False)
    assert [p.name for p in prefix] == ["tiny_stage1.yaml", "tiny_stage2.yaml"]


def test_tiny_towers_keep_their_family_and_image_settings_through_training_build(tmp_path):
    from mlcd_vl.model import tiny
    from mlcd_vl.train.models import build_model

    towers = parse_towers(None, tiny=True)
    assert [t.preset.name for t in towers] == ["mlcd-bigG-448", "clip-vitL-336", "siglip-so400m-384"]
    assert [tiny_crop(t.preset) for t in towers] == [56, 42, 48]  # 48 = 3 x 14 + 6, as 384 = 27 x 14 + 6
    assert tiny_crop(presets.TOWERS["dfn5b-vitH-378"]) == 42
    shapes = tiny.TinyShapes()
    llm = tiny.write_tiny_llm(tmp_path / "llm", tiny.train_tokenizer(tiny.default_corpus()), shapes)
    expected_tokens = {"mlcd-bigG-448": 16, "clip-vitL-336": 9, "siglip-so400m-384": 9}
    for tower in towers:
        folder = tiny.write_preset_tower(tmp_path / tower.key, tower.tiny, shapes)
        config = load_config(study_run.resolve_recipes(None, tiny=True)[1],
                             [f"model.llm={llm}", *tower.overrides(2, folder), "model.init_from=null",
                              f"output_dir={tmp_path / 'out'}"])
        model, _, settings, _ = build_model(config)
        preset = tower.tiny
        assert (settings.crop_size, settings.resize_mode, settings.image_mean, settings.image_std) == (
            preset.image_size, preset.resize_mode, preset.mean, preset.std)
        assert settings.pinpoints == presets.upstream_grid(preset.image_size)  # the grid scales with the crop
        assert model.config.vision_feature_select_strategy == preset.select_strategy
        assert model.config.vision_feature_layer == preset.select_layer
        assert model.config.vision_config.hidden_act == preset.hidden_act
        assert preset.tokens_per_crop == expected_tokens[tower.preset.name]


# ------------------------------------------------------------------ finished steps


def _stage_outputs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in (*ledger.STAGE_OUTPUTS, "model.safetensors"):
        (folder / name).write_text("{}")


def test_study_errors_are_one_line_with_an_exit_code(tmp_path, capsys):
    from mlcd_vl.cli import main
    from mlcd_vl.errors import UserError

    assert main(["study", "--towers", "clip-vitL-336,my-tower", "--dry-run", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlcd-vl study: error: --towers: 'my-tower' is not a tower preset") and err.count("\n") == 1
    study = study_run.Study(_args("--towers", "clip-vitL-336", "--workdir", str(tmp_path)))
    with pytest.raises(UserError, match=r"^clip-vitL-336 stage1: pretrain.sh failed \(log: L\)$") as failed:
        with study_run.step_command(study.stage_step(study.towers[0], 1)):
            raise RuntimeError("pretrain.sh failed (log: L)")
    assert failed.value.exit_code == 1


def test_a_finished_step_is_kept_and_one_finished_with_other_settings_is_refused(tmp_path):
    folder = tmp_path / "stage1"
    settings = {"recipe_sha256": "abc", "overrides": ["optim.max_steps=3", "model.tower=x"], "num_gpus": 8}
    assert ledger.finished(folder, "stage", settings) is None  # never ran
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(StudyError, match="wrote no train_config.yaml, metrics.jsonl, data_manifest.json, model"):
        ledger.mark_finished(folder, "stage", settings)
    assert ledger.finished(folder, "stage", settings) is None  # interrupted: no stamp, it runs again
    _stage_outputs(folder)
    ledger.mark_finished(folder, "stage", settings, wall_seconds=12.5)
    assert ledger.finished(folder, "stage", settings)["wall_seconds"] == 12.5
    other = dict(settings, overrides=["optim.max_steps=4", "model.tower=x"])
    with pytest.raises(StudyError, match=r"other settings \(overrides: was optim.max_steps=3, now optim.max_steps=4"):
        ledger.finished(folder, "stage", other)
    (folder / "model.safetensors").unlink()
    with pytest.raises(StudyError, match="lacks model.safetensors"):
        ledger.finished(folder, "stage", settings)

    evaluation = tmp_path / "eval"
    (evaluation / "m").mkdir(parents=True)
    (evaluation / "m" / "x_results.json").write_text("{}")
    ledger.mark_finished(evaluation, "eval", {"tasks": ["a"]}, results_files=["m/x_results.json"])
    assert ledger.finished(evaluation, "eval", {"tasks": ["a"]})["results_files"] == ["m/x_results.json"]
    (evaluation / "m" / "x_results.json").unlink()
    with pytest.raises(StudyError, match="lacks m/x_results.json"):
        ledger.finished(evaluation, "eval", {"tasks": ["a"]})
    assert ledger.portable(["output_dir=/s/x/stage1", "data.train=/d"], Path("/s")) == [
        "output_dir=<study>/x/stage1", "data.train=/d"]


# ------------------------------------------------------------------ the same data, or a refusal


def test_a_stage_on_other_data_than_the_finished_towers_is_refused_unless_allowed(tmp_path):
    from mlcd_vl.data.manifest import build_manifest
    from mlcd_vl.demo.playground import write_playground
    from mlcd_vl.study.facts import StageFacts, TowerFacts

    workdir = tmp_path / "study"
    data = write_playground(workdir / "data", train_images=6, heldout_per_skill=1, seed=0)
    study = study_run.Study(_args("--tiny", "--towers", "mlcd-bigG-448,clip-vitL-336", "--workdir", str(workdir),
                                  "--launcher", "module"))
    first, second = study.towers
    step = study.stage_step(first, 1)
    manifest = build_manifest(str(data.captions), str(data.images), seed=42)
    _stage_outputs(step.folder)
    manifest.save(step.folder / "data_manifest.json")
    ledger.mark_finished(step.folder, "stage", step.settings, manifest_hash=manifest.hash)
    study.check_data(study.stage_step(second, 1))  # the same data: goes ahead

    records = json.loads(data.captions.read_text())
    data.captions.write_text(json.dumps(records[:-1]))  # one record less
    with pytest.raises(StudyError, match=r"other data than mlcd-bigG-448-tiny stage1 did: .*record count 6 -> 5"):
        study.check_data(study.stage_step(second, 1))

    changed = build_manifest(str(data.captions), str(data.images), seed=42)
    other = study.stage_step(second, 1).folder
    _stage_outputs(other)
    changed.save(other / "data_manifest.json")
    facts = [TowerFacts(t.key, t.label, {n: StageFacts(h, None, None, 1.0) for n in (1, 2)}, 1.0, {})
             for t, h in ((first, manifest.hash), (second, changed.hash))]
    for tower in (first, second):  # stage 2: the same manifest for both
        (workdir / tower.key / "stage2").mkdir(parents=True, exist_ok=True)
    facts[1].stages[2] = facts[0].stages[2]
    notes, refused = study.data_notes(facts)
    assert len(refused) == 1 and "stage 1 data of clip-vitL-336-tiny differs" in refused[0]
    assert "record count 6 -> 5" in refused[0] and any("Stage 2 data: one manifest" in n for n in notes)
    allowing = study_run.Study(_args("--tiny", "--towers", "mlcd-bigG-448,clip-vitL-336", "--workdir", str(workdir),
                                     "--launcher", "module", "--allow-different-data"))
    allowing.check_data(allowing.stage_step(second, 1))  # a warning, no error
    notes, refused = allowing.data_notes(facts)
    assert not refused and any("compared anyway: --allow-different-data" in n for n in notes)


def test_every_optimizer_step_holds_the_same_records_whatever_each_towers_token_counts(tmp_path):
    import numpy as np
    import yaml

    from mlcd_vl.data.dataset import LengthTable
    from mlcd_vl.study.facts import step_membership_sha256

    rng = np.random.default_rng(0)
    has_image = rng.random(203) < 0.8  # text-only records too: modality grouping, a mixed remainder
    text, crops = rng.integers(20, 400, size=203), rng.integers(2, 6, size=203)  # anyres: 2-5 crops an image

    def run_folder(name: str, tokens_per_crop: int, skipped: tuple[int, ...] = (), **recipe) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        lengths = text + has_image * crops * tokens_per_crop
        lengths[list(skipped)] = 0  # left out by the scan
        LengthTable(lengths, has_image).save(str(folder / "lengths.npz"))
        config = {"batch": {"per_device_batch_size": 3, "grad_accum": 2}, "data": {"group_by_modality": True},
                  "seed": 42, **recipe}
        (folder / "train_config.yaml").write_text(yaml.safe_dump(config))
        return folder

    small = step_membership_sha256(run_folder("tiny", 16), world_size=4)
    large = step_membership_sha256(run_folder("bigG", 1024), world_size=4)
    assert small == large  # the same records in each step; only their order inside a step differs
    from mlcd_vl.data.samplers import LengthGroupedBatchSampler

    plans = [LengthGroupedBatchSampler(LengthTable.load(str(tmp_path / name / "lengths.npz")).lengths, has_image, 3,
                                       world_size=4, grad_accum=2, seed=42).rank_batches() for name in ("tiny", "bigG")]
    assert plans[0] != plans[1]  # the towers' micro-batches do differ
    assert step_membership_sha256(run_folder("skip", 16, skipped=(5,)), world_size=4) != small
    assert step_membership_sha256(run_folder("seed", 16, seed=7), world_size=4) != small
    assert step_membership_sha256(run_folder("packed", 16, data={"packing": True, "token_budget": 4096}), 4) is None


def test_the_gpu_studys_table_has_published_rows_plots_and_the_towers_eval_differences(tmp_path):
    import shutil

    from mlcd_vl.data.manifest import build_manifest

    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "hi"},
                                                                 {"from": "gpt", "value": "yo"}]}]))
    manifest = build_manifest(str(records), seed=42)
    study = study_run.Study(_args("--towers", "clip-vitL-336,mlcd-bigG-448", "--workdir", str(tmp_path / "study")))
    recorded = REPO / "tests" / "data" / "eval_results"
    for number, tower in enumerate(study.towers):
        for stage in (1, 2):
            step = study.stage_step(tower, stage)
            _stage_outputs(step.folder)
            manifest.save(step.folder / "data_manifest.json")
            ledger.mark_finished(step.folder, "stage", step.settings, wall_seconds=3600.0 * stage,
                                 manifest_hash=manifest.hash, tokens_per_s=1000.0 * stage, steps_sha256="ab" * 32,
                                 visual_tokens={"mean": 576.0 * stage, "measured": 2000, "records": 779289})
        step = study.eval_step(tower)
        shutil.copytree(recorded, step.folder / "model")
        results = next((step.folder / "model").glob("*_results.json"))
        data = json.loads(results.read_text())
        data["lmms_eval_version"] = "0.7.3" if number == 0 else "0.7.2"
        results.write_text(json.dumps(data))
        ledger.mark_finished(step.folder, "eval", step.settings, wall_seconds=600.0,
                             results_files=[str(results.relative_to(step.folder))])
    assert study.report() == 0
    table = (tmp_path / "study" / "study.md").read_text()
    assert "| tower | ChartQA | DocVQA | InfoVQA | OCRBench | MMMU | visual tokens / sample (stage 1 / 2) |" in table
    assert ("| CLIP (ViT-L-14-336px): ours | 0.00 | 0.00 | 0.00 | 0 | 50.00 | 576 (2000 of 779289) / 1152 (2000 "
            f"of 779289) | 1000 / 2000 | 3.2 h | `{manifest.hash[:12]}` / `{manifest.hash[:12]}` |") in table
    assert "| CLIP (ViT-L-14-336px): published | 66.52 | 75.21 | 38.88 | 525 | 44.20 | | | | |" in table
    assert "| MLCD (ViT-bigG-14-448px): published | 73.80 | 83.34 | 46.59 | 582 | 46.00 |" in table
    assert "Stage 2 order: the same records in every optimizer step for every tower" in table
    assert "rows differ in lmms-eval version: clip-vitL-336: 0.7.3; mlcd-bigG-448: 0.7.2" in table
    assert "| lmms-eval version | `0.7.3` | `0.7.2` |" in table
    assert "OCRBench" in table and "ran on 4 of OCRBench's 1000 items" in table  # summarize's own warnings, per tower
    plots = sorted(p.name for p in (tmp_path / "study" / "plots").glob("*.png"))
    assert plots == ["ChartQA.png", "DocVQA.png", "InfoVQA.png", "MMMU.png", "OCRBench.png"]


# ------------------------------------------------------------------ the CPU study, end to end


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cpu_study_with_two_tower_families_writes_table_and_plots_and_resumes_without_redoing(tmp_path):
    from mlcd_vl.demo.stages import child_env

    workdir = tmp_path / "study"
    env = child_env(threads=1)  # offline, this checkout importable, as the study's own child processes
    command = [sys.executable, "-m", "mlcd_vl.cli", "study", "--tiny", "--towers", "mlcd-bigG-448,siglip-so400m-384",
               "--workdir", str(workdir), "--train-images", "48", "--heldout-per-skill", "2", "--stage1-steps", "2",
               "--stage2-steps", "3", "--threads", "1"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=880, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    from mlcd_vl.demo.playground import SKILLS

    table = (workdir / "study.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| tower |"))
    assert header.split(" | ")[1:len(SKILLS) + 1] == list(SKILLS)
    for label in ("| MLCD (ViT-bigG-14-448px), tiny |", "| SigLIP (ViT-SO400M-384px), tiny |",
                  "| chance (uniform guess) |", "| MLCD (ViT-bigG-14-448px) | 73.80 | 83.34 |"):
        assert label in table, label
    assert "Scoring settings compared across rows" in table and "identical" in table
    summary = json.loads((workdir / "study.json").read_text())
    rows = {row["tower"]: row for row in summary["rows"]}
    assert set(rows) == {"mlcd-bigG-448-tiny", "siglip-so400m-384-tiny"}
    for stage in ("1", "2"):  # the same data for both towers, pinned by the manifests training wrote
        hashes = {row["stages"][stage]["manifest_hash"] for row in rows.values()}
        written = {json.loads((workdir / key / f"stage{stage}" / "data_manifest.json").read_text())["hash"]
                   for key in rows}
        assert len(hashes) == 1 and hashes == written and f"one manifest for every tower, `{hashes.pop()}`" in table
    for row in rows.values():
        assert set(row["scores"]) == set(SKILLS) and all(0 <= v <= 100 for v in row["scores"].values())
        assert all(row["documents"][skill] == 2 for skill in SKILLS)
        assert row["stages"]["1"]["tokens_per_s"] > 0 and row["wall_seconds"] > 0
    tokens = {key: row["stages"]["1"]["visual_tokens_per_sample"]["mean"] for key, row in rows.items()}
    assert tokens == {"mlcd-bigG-448-tiny": 16.0, "siglip-so400m-384-tiny": 9.0}  # 4x4 patches; 3x3, no CLS
    anyres = {key: row["stages"]["2"]["visual_tokens_per_sample"]["mean"] for key, row in rows.items()}
    assert anyres["mlcd-bigG-448-tiny"] > anyres["siglip-so400m-384-tiny"] > 9
    plots = sorted(p.name for p in (workdir / "plots").glob("*.png"))
    assert plots == sorted(f"{skill}.png" for skill in SKILLS)
    assert all((workdir / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)

    outputs = [p for p in workdir.rglob("*") if p.is_file() and p.parent.name != "plots"
               and p.name not in ("study.md", "study.json")]
    before = {p: p.stat().st_mtime_ns for p in outputs}
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert again.stdout.count("not redone") == 6 and "===" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in outputs} == before  # nothing trained, evaluated or written again
    assert json.loads((workdir / "study.json").read_text())["rows"] == summary["rows"]
