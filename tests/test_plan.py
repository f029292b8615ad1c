"""`mlcd-vl plan`: parameter counts equal training's, the memory formulas, micro-batches from a length table, the CLI,
and (slow) the plan's parameter / gradient / optimizer-state bytes against what two real DeepSpeed ranks hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlcd_vl.plan import memory
from mlcd_vl.plan.memory import GIB, Precision, Sharding

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "configs" / "recipes"
STAGE2 = str(RECIPES / "mlcd_bigG448_stage2.yaml")


@pytest.fixture(autouse=True)
def tiny_dir(tiny_assets, monkeypatch):
    """Training and the plan find the `tiny` preset in the session's tiny assets (conftest)."""
    from mlcd_vl.train.models import TINY_DIR_ENV

    monkeypatch.setenv(TINY_DIR_ENV, str(tiny_assets["llm"].parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def config_for(recipe: str, *overrides: str):
    from mlcd_vl.train.config import load_config

    return load_config(RECIPES / recipe, ["model.init_from=null", *overrides])


@pytest.mark.parametrize("recipe, overrides", [("tiny_stage2.yaml", ()), ("tiny_stage1.yaml", ()),
                                               ("tiny_stage2.yaml", ("lora.enabled=true",))])
def test_meta_counts_equal_what_training_trains(recipe, overrides, tmp_path):
    from mlcd_vl.plan.model_size import model_shape
    from mlcd_vl.train import lora, models, optim

    config = config_for(recipe, f"output_dir={tmp_path}", *overrides)
    model, _, _, _ = models.build_model(config)
    optim.apply_tunable_parts(model, config.tunable_parts)
    optim.freeze_unreached(model)
    if config.lora.enabled:
        lora.apply_lora(model, config.lora, config.tunable_parts_list, config.seed)
    built = optim.parameter_summary(model)
    shape, _ = model_shape(config)
    assert shape.total == {part: count.total for part, count in built.items()}
    assert shape.trainable == {part: count.trainable for part, count in built.items()}
    groups = [[p.numel() for p in group["params"]] for group in optim.build_param_groups(model, config.optim)]
    assert [list(group) for group in shape.optimizer_groups] == groups


def test_real_recipe_sizes_from_presets_without_downloads():
    from mlcd_vl.plan.model_size import model_shape

    shape, settings = model_shape(config_for("mlcd_bigG448_stage2.yaml"))
    assert shape.total["projector"] == 18_816_000  # reference-spec 1.1: Linear(1664 -> 3584), Linear(3584 -> 3584)
    assert shape.total["language_model"] == pytest.approx(7.6e9, rel=0.01)
    assert shape.total["vision_tower"] == pytest.approx(1.84e9, rel=0.01)
    assert 0 < shape.total["vision_tower"] - shape.trainable["vision_tower"] < shape.total["vision_tower"] / 40
    assert shape.llm.vocab == 152064 and shape.tower.tokens_per_crop == 32 * 32 + 1
    assert settings.pinpoints == [(448, 896), (896, 448), (896, 896), (1344, 448), (448, 1344)]


def test_every_preset_is_sized_without_downloads():
    from mlcd_vl import presets
    from mlcd_vl.model.build import check_tower_fits_preset
    from mlcd_vl.plan import architectures

    for preset in presets.TOWERS.values():
        check_tower_fits_preset(architectures.tower_config(preset.hub_id), preset, preset.name)
    for preset in presets.LLMS.values():
        assert architectures.llm_config(preset.hub_id).hidden_size == preset.hidden_size


@pytest.mark.parametrize("tower", ["dfn5b-vitH-378", "siglip-so400m-384"])
def test_tower_presets_give_the_composite_their_image_settings(tower):
    from mlcd_vl import presets
    from mlcd_vl.plan.model_size import build_meta_model

    preset = presets.TOWERS[tower]
    model, settings = build_meta_model(config_for("mlcd_bigG448_stage2.yaml", f"model.tower={tower}",
                                                  "model.pinpoints=null"))
    assert settings.crop_size == preset.image_size and settings.pinpoints == preset.pinpoints
    assert settings.resize_mode == preset.resize_mode
    assert model.config.vision_feature_select_strategy == preset.select_strategy
    assert model.config.vision_feature_layer == preset.select_layer


def test_a_checkpoint_recipe_is_sized_from_the_folder(tiny_vlm_dir, tmp_path):
    from mlcd_vl.plan.model_size import model_shape
    from mlcd_vl.train import models, optim

    config = config_for("tiny_stage2.yaml", f"model.checkpoint={tiny_vlm_dir}", f"output_dir={tmp_path}")
    model, _, built_settings, _ = models.build_model(config)
    optim.apply_tunable_parts(model, config.tunable_parts)
    optim.freeze_unreached(model)
    built = optim.parameter_summary(model)
    shape, settings = model_shape(config)
    assert shape.total == {part: count.total for part, count in built.items()}
    assert shape.trainable == {part: count.trainable for part, count in built.items()}
    assert settings == built_settings


def test_zero_stages_divide_what_they_partition():
    groups = ((100,) * 8,)
    bf16 = Precision("bf16")

    def terms(stage):
        state = memory.state_memory(1000, 800, bf16, Sharding(stage=stage), 4, param_numels=(100,) * 10,
                                    optimizer_groups=groups)
        return {name: state.gpu_bytes(name) for name in ("parameters", "gradients", "optimizer states")}

    assert terms(1) == {"parameters": 2000, "gradients": 1600, "optimizer states": 12 * 200}
    assert terms(2) == {"parameters": 2000, "gradients": 2 * 200, "optimizer states": 12 * 200}
    assert terms(3) == {"parameters": 2 * 250, "gradients": 2 * 200, "optimizer states": 12 * 200}
    ddp = memory.state_memory(1000, 800, bf16, Sharding(stage=0), 4)
    assert ddp.gpu_bytes("gradients") == 2 * 4 * 800  # .grad plus DDP's buckets
    offload = memory.state_memory(1000, 800, bf16, Sharding(stage=3, offload_optimizer=True, offload_params=True),
                                  4, param_numels=(100,) * 10, optimizer_groups=groups)
    assert offload.gpu_bytes("parameters") == offload.gpu_bytes("optimizer states") == 0
    assert offload.host_bytes() > 0


def test_zero2_gradient_partition_holds_the_whole_tensors_that_overlap_it():
    partition, overlapping = memory.zero12_partition(((600, 100, 100),), 2)
    assert partition == 400
    assert overlapping == [600, 600 + 100 + 100]  # rank 1's partition starts inside the 600-element tensor


def test_persistent_small_tensors_stay_whole_under_zero3():
    assert memory.zero3_partition((10, 1000), 4, persistence_threshold=10) == (250, 10)


def test_loss_term_grows_with_supervised_tokens_unless_chunked():
    assert memory.loss_bytes(2048, 151936) == pytest.approx(3.4 * GIB, rel=0.02)  # issue 14's measurement
    assert memory.loss_bytes(32768, 152064, chunk_tokens=1024) == memory.loss_bytes(1024, 152064)
    assert memory.loss_bytes(512, 152064, chunk_tokens=1024) == memory.loss_bytes(512, 152064)


def test_checkpointing_and_frozen_parts_save_less():
    from mlcd_vl.plan.model_size import model_shape

    shape, _ = model_shape(config_for("mlcd_bigG448_stage2.yaml"))

    def rates(**kwargs):
        flags = dict(llm_trainable=True, tower_trainable=True, projector_trainable=True, checkpointing=False)
        flags.update(kwargs)
        return memory.activation_rates(shape.llm, shape.tower, shape.projector_in, shape.projector_out, 2, **flags)

    full, checkpointed = rates(), rates(checkpointing=True)
    assert checkpointed.per_position < full.per_position / 5 and checkpointed.per_crop < full.per_crop / 5
    frozen = rates(llm_trainable=False, tower_trainable=False)
    assert frozen.per_position < full.per_position and frozen.per_crop < full.per_crop / 50


def write_lengths(path: Path, lengths: list[int], supervised: list[int] | None = None) -> str:
    from mlcd_vl.data.dataset import LengthTable

    LengthTable(np.array(lengths, dtype=np.int64), np.ones(len(lengths), dtype=bool),
                supervised=None if supervised is None else np.array(supervised, dtype=np.int64)).save(str(path))
    return str(path)


def plan_for(config, **request):
    from mlcd_vl.plan.planner import PlanRequest, make_plan

    return make_plan(config, PlanRequest(**request))


def test_largest_micro_batch_and_steps_come_from_the_length_table(tmp_path):
    table = write_lengths(tmp_path / "lengths.npz", [100] * 9 + [1000])
    padded = plan_for(config_for("tiny_stage2.yaml", "batch.grad_accum=1", "data.group_by_modality=false"),
                      gpus=1, lengths=table)
    assert (padded["micro_batch"]["rows"], padded["micro_batch"]["positions"]) == (2, 2000)
    assert padded["run"]["steps"] == 5 and padded["run"]["samples"] == 10
    packed = plan_for(config_for("tiny_stage2.yaml", "data.packing=true", "data.token_budget=1100"), gpus=1,
                      lengths=table)
    assert packed["micro_batch"]["positions"] == 1100  # first-fit-decreasing: [1000, 100], then the rest
    assert padded["loss"]["supervised_tokens"] == 2000  # no supervised counts in the table: every position


def test_loss_counts_the_most_supervised_micro_batch_of_the_table(tmp_path):
    config = config_for("tiny_stage2.yaml", "batch.grad_accum=1", "data.group_by_modality=false")
    table = write_lengths(tmp_path / "lengths.npz", [100] * 9 + [1000], supervised=[90] * 9 + [50])
    plan = plan_for(config, gpus=1, lengths=table)
    assert plan["loss"]["supervised_tokens"] == 180  # two 100-token rows of 90 beat [1000 (50), 100 (90)]
    assert any("from the length table" in note for note in plan["assumptions"])
    assert plan_for(config, gpus=1, lengths=table, supervised_fraction=0.5)["loss"]["supervised_tokens"] == 1000


def test_packed_rows_count_the_block_mask_only_where_the_attention_needs_it(tmp_path):
    table = write_lengths(tmp_path / "lengths.npz", [100] * 9 + [1000])
    packed = ("data.packing=true", "data.token_budget=1100", "precision=bf16")
    varlen = plan_for(config_for("tiny_stage2.yaml", *packed), gpus=1, lengths=table)
    assert varlen["activations"]["attention_mask"] == 0  # plain SDPA runs sdpa_varlen on packed rows: no mask
    eager = plan_for(config_for("tiny_stage2.yaml", *packed, "model.attn_implementation=eager"), gpus=1,
                     lengths=table)
    assert eager["activations"]["attention_mask"] == (4 + 2) * 1100**2  # float32 from the collator + bf16 copy


def test_plan_reads_the_length_table_a_data_check_writes(tiny_assets, tmp_path, capsys):
    from test_data_common import record, write_image

    from mlcd_vl.cli import main
    from mlcd_vl.data.dataset import LengthTable

    write_image(tmp_path / "a.png", (90, 60))
    rows = [record(f"r{i}", "<image>\nWhat colour?", "Red. " * (1 + 20 * i), image="a.png") for i in range(6)]
    (tmp_path / "data.json").write_text(json.dumps(rows + [record("t", "Name a colour.", "Blue.")]))
    assert main(["data", "check", str(tmp_path / "data.json"), "--tiny", "--tiny-dir", str(tiny_assets["llm"].parent),
                 "--image-folder", str(tmp_path), "--template", "qwen_1_5", "--max-length", "1024",
                 "--out", str(tmp_path / "check")]) == 0
    capsys.readouterr()
    table = tmp_path / "check" / "lengths.npz"
    assert main(["plan", str(RECIPES / "tiny_stage2.yaml"), "model.init_from=null", "--gpus", "1",
                 "--lengths", str(table), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    longest = int(LengthTable.load(str(table)).lengths.max())
    assert plan["run"]["samples"] == 7 and str(table) in plan["micro_batch"]["how"]
    assert plan["micro_batch"]["row_length"] == longest < 1024  # the data's longest row, not data.max_length


def test_an_order_file_recipe_is_told_its_micro_batches_are_the_samplers(tmp_path):
    (tmp_path / "order.txt").write_text("id0 id1\n")
    plan = plan_for(config_for("tiny_stage2.yaml", f"data.order_file={tmp_path / 'order.txt'}"), gpus=1)
    assert any(note.startswith("data.order_file:") for note in plan["assumptions"])


def test_without_a_table_rows_are_data_max_length():
    plan = plan_for(config_for("mlcd_bigG448_stage2.yaml"), gpus=8)
    assert plan["micro_batch"]["positions"] == 2 * 32768
    assert plan["run"]["samples"] == 779_289 and plan["run"]["steps"] == 6089  # 779,289 / (2 x 8 x 8)


def test_real_stage2_needs_the_chunked_loss_on_80_gib():
    plain = plan_for(config_for("mlcd_bigG448_stage2.yaml"), gpus=8, gpu_memory_gib=80)
    own = next(row for row in plain["scenarios"] if row["recipe"])
    assert own["scenario"] == "ZeRO-3" and not own["fits"]
    assert any("chunked loss" in line for line in plain["suggestions"])
    chunked = plan_for(config_for("mlcd_bigG448_stage2.yaml"), gpus=8, gpu_memory_gib=80, loss_chunk=1024)
    own = next(row for row in chunked["scenarios"] if row["recipe"])
    assert own["fits"] and own["largest_fitting_positions"] >= 2 * 32768
    ddp = next(row for row in chunked["scenarios"] if row["stage"] == 0)
    assert not ddp["fits"]  # 16 bytes per trainable parameter on every GPU


def test_host_memory_counts_the_model_built_per_rank():
    plan = plan_for(config_for("mlcd_bigG448_stage2.yaml"), gpus=16, nodes=2)
    own = next(row for row in plan["scenarios"] if row["recipe"])
    params = sum(plan["model"]["parameters"].values())
    build = next(t for t in own["host_per_node"]["terms"] if t["name"] == "model build per rank")
    assert build["bytes"] == pytest.approx(8 * memory.HOST_BUILD_BYTES_PER_PARAM_PEAK * params)
    sharded = plan_for(config_for("mlcd_bigG448_stage2.yaml"), gpus=16, nodes=2, sharded_init=True)
    own_sharded = next(row for row in sharded["scenarios"] if row["recipe"])
    assert own_sharded["host_per_node"]["startup"] < own["host_per_node"]["startup"] / 10


def test_cli_prints_tables_and_json(capsys):
    from mlcd_vl.cli import main

    assert main(["plan", str(RECIPES / "tiny_stage2.yaml"), "model.init_from=null", "--gpus", "2"]) == 0
    text = capsys.readouterr().out
    assert "per GPU, GiB" in text and "what to change:" in text and "{" not in text
    assert main(["plan", str(RECIPES / "tiny_stage2.yaml"), "model.init_from=null", "--gpus", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["cluster"]["gpus"] == 2 and {row["stage"] for row in plan["scenarios"]} == {0, 1, 2, 3}
    assert main(["plan", str(RECIPES / "tiny_stage2.yaml"), "--gpus", "3", "--nodes", "2"]) == 2
    assert "--gpus 3 must be a positive multiple of --nodes 2" in capsys.readouterr().err


def test_parser_module_imports_no_torch():
    code = "import sys, mlcd_vl.plan.command; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert done.stdout.strip() == "False"


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("config", ["zero2.json", "zero3.json"])
def test_plan_matches_what_two_zero_ranks_hold(config, tmp_path):
    pytest.importorskip("deepspeed")
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import plan_validation
    finally:
        sys.path.remove(str(REPO / "bench"))
    (case,) = plan_validation.validate(tmp_path, ["tiny"], [config], [2])
    for rank in case["ranks"]:
        for term in (*plan_validation.TERMS, "sum"):
            assert rank[term]["ratio"] == pytest.approx(1.0, abs=plan_validation.TOLERANCE), (rank["rank"], term)


def test_recipe_plans_bench_writes_its_result(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "plan_recipes.py"), "--out", str(tmp_path),
                           "--synthetic-records", "24"],
                          capture_output=True, text=True, cwd=REPO, check=False,
                          env={"PYTHONPATH": str(REPO), "PATH": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = tmp_path.glob("plan_recipes_*.md")
    text = result.read_text()
    assert text.count("per GPU, GiB") == 6 and "load average" in text  # 2 recipes, then stage 2 with the table
    assert "synthetic length table: 24 usable of 24 records" in text and "SYNTHETIC/lengths.npz" in text
    assert "/plan_recipes_" not in text  # the scratch folder (tempfile's plan_recipes_*) is not in the results
