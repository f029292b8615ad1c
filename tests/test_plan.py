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
    assert shape.total["projector"] == 18_816_000  # upstream's mlp2x_gelu: Linear(1664 -> 3584), Linear(3584 -> 3584)
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


QWEN7B_HEAD = {"vocab": 151936, "hidden": 3584}
# bench/results/loss_memory_*_2026-12-02.md (main): step peak GiB of the chunked loss, 1024-token chunks, by
# (dtype, supervised tokens); and the full-logits path's at 2048 tokens
MEASURED_CHUNKED_GIB = {("bf16", 2048): 3.32, ("bf16", 4096): 3.33, ("bf16", 8192): 3.36, ("bf16", 32768): 3.52,
                        ("fp32", 2048): 3.22, ("fp32", 8192): 3.31}
MEASURED_FULL_2048_GIB = 3.50


def test_full_loss_grows_with_supervised_tokens_as_measured():
    assert memory.loss_bytes(2048, 151936) == pytest.approx(MEASURED_FULL_2048_GIB * GIB, rel=0.02)
    assert memory.loss_bytes(32768, 151936) == 16 * memory.loss_bytes(2048, 151936)


@pytest.mark.parametrize("dtype, tokens", sorted(MEASURED_CHUNKED_GIB))
def test_chunked_loss_model_matches_the_measured_step_peaks(dtype, tokens):
    e = 2 if dtype == "bf16" else 4
    modelled = memory.chunked_loss_bytes(tokens, QWEN7B_HEAD["vocab"], QWEN7B_HEAD["hidden"], 1024,
                                         weight_bytes=e, activation_bytes=e, head_trains=True,
                                         hidden_needs_grad=True)
    assert modelled == pytest.approx(MEASURED_CHUNKED_GIB[dtype, tokens] * GIB, rel=0.05)


def test_chunked_loss_stays_flat_and_drops_the_weight_gradient_of_a_frozen_head():
    def chunked(tokens, **flags):
        return memory.chunked_loss_bytes(tokens, 152064, 3584, 1024, weight_bytes=2, activation_bytes=2, **flags)

    trains = {"head_trains": True, "hidden_needs_grad": True}
    assert chunked(32768, **trains) - chunked(2048, **trains) == 2 * (32768 - 2048) * 3584  # the hidden gradient
    frozen = chunked(32768, head_trains=False, hidden_needs_grad=True)
    assert frozen == chunked(32768, **trains) - 4.0 * 152064 * 3584  # no float32 accumulator


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


def own_row(plan: dict) -> dict:
    return next(row for row in plan["scenarios"] if row["recipe"])


def test_the_loss_is_the_one_the_recipe_runs_chunked_above_its_threshold():

    plan = plan_for(config_for("mlcd_bigG448_stage2.yaml"), gpus=8)  # loss_impl auto, 65,536 supervised tokens
    loss, vocab, hidden = plan["loss"], plan["model"]["llm"]["vocab"], plan["model"]["llm"]["hidden"]
    assert (loss["impl"], loss["runs"], loss["supervised_tokens"]) == ("auto", "chunked", 2 * 32768)
    chunk_bound = memory.chunked_loss_bytes(2 * 32768, vocab, hidden, 1024, weight_bytes=2, activation_bytes=2,
                                            head_trains=True, hidden_needs_grad=True)
    assert loss["bytes"] == own_row(plan)["gpu"]["loss"] == chunk_bound < 4 * GIB
    assert loss["full_bytes"] == memory.loss_bytes(2 * 32768, vocab)
    full = plan_for(config_for("mlcd_bigG448_stage2.yaml", "optim.loss_impl=full"), gpus=8)
    assert full["loss"]["runs"] == "full" and full["loss"]["bytes"] == memory.loss_bytes(2 * 32768, vocab)
    from mlcd_vl.plan.model_size import model_shape

    shape, _ = model_shape(config_for("tiny_stage2.yaml"))
    from mlcd_vl.plan.loss import LossModel

    model = LossModel.of(config_for("tiny_stage2.yaml"), shape, 4)
    assert [model.implementation(n, 4) for n in (1024, 1025)] == ["full", "chunked"]  # training's rule, threshold
    # Qwen2.5-7B's head trained in bf16: its float32 weight-gradient accumulator makes chunking pay only from ~1.9k
    real = config_for("mlcd_bigG448_stage2.yaml")
    real_model = LossModel.of(real, model_shape(real)[0], 2)
    assert [real_model.implementation(n, 2) for n in (1025, 1800, 2000)] == ["full", "full", "chunked"]


def test_auto_counts_the_full_logits_just_below_a_large_threshold():
    plan = plan_for(config_for("mlcd_bigG448_stage2.yaml", "optim.loss_chunk_tokens=16384"), gpus=8)
    vocab = plan["model"]["llm"]["vocab"]
    assert plan["loss"]["runs"] == "chunked"
    assert plan["loss"]["bytes"] == memory.loss_bytes(16384, vocab) > plan["loss"]["chunked_bytes"]


def test_real_stage2_fits_80_gib_with_its_chunked_loss_not_with_full_logits():
    chunked = plan_for(config_for("mlcd_bigG448_stage2.yaml"), gpus=8, gpu_memory_gib=80)
    own = own_row(chunked)
    assert own["scenario"] == "ZeRO-3" and own["fits"] and own["largest_fitting_positions"] >= 2 * 32768
    assert not any("chunked loss" in line for line in chunked["suggestions"])
    ddp = next(row for row in chunked["scenarios"] if row["stage"] == 0)
    assert not ddp["fits"]  # 16 bytes per trainable parameter on every GPU
    full = plan_for(config_for("mlcd_bigG448_stage2.yaml", "optim.loss_impl=full"), gpus=8, gpu_memory_gib=80)
    assert not own_row(full)["fits"]
    suggestion = next(line for line in full["suggestions"] if line.startswith("chunked loss"))
    assert "optim.loss_impl=auto" in suggestion and f"total {own['gpu_total'] / GIB:.1f} GiB" in suggestion


def test_host_memory_counts_the_model_built_per_rank_as_the_recipe_builds_it():
    whole = plan_for(config_for("mlcd_bigG448_stage2.yaml", "model.sharded_init=false"), gpus=16, nodes=2)
    own = next(row for row in whole["scenarios"] if row["recipe"])
    params = sum(whole["model"]["parameters"].values())
    build = next(t for t in own["host_per_node"]["terms"] if t["name"] == "model build per rank")
    assert build["bytes"] == pytest.approx(8 * memory.HOST_BUILD_BYTES_PER_PARAM_PEAK * params)
    assert any("model.sharded_init=true builds it partitioned" in line for line in whole["suggestions"])
    sharded = plan_for(config_for("mlcd_bigG448_stage2.yaml"), gpus=16, nodes=2)  # the recipe's default
    own_sharded = next(row for row in sharded["scenarios"] if row["recipe"])
    build = next(t for t in own_sharded["host_per_node"]["terms"] if t["name"] == "model build per rank")
    embedding = 152064 * 3584  # Qwen2.5-7B's largest tensor, gathered whole while it loads
    assert build["bytes"] == pytest.approx(8 * 2 * (params / 16 + embedding))  # bf16: 8 partitions + one tensor each
    assert own_sharded["host_per_node"]["startup"] < own["host_per_node"]["startup"] / 10
    save = next(t for t in own_sharded["host_per_node"]["terms"] if t["name"].startswith("final ZeRO-3 save"))
    assert save["bytes"] < 4 * 2**30  # one streamed shard, not the consolidated fp32 state


def test_cli_prints_tables_and_json(capsys):
    from mlcd_vl.cli import main

    assert main(["plan", str(RECIPES / "tiny_stage2.yaml"), "model.init_from=null", "--gpus", "2"]) == 0
    text = capsys.readouterr().out
    assert "per GPU, GiB" in text and "what to change:" in text and "{" not in text
    assert main(["plan", str(RECIPES / "tiny_stage2.yaml"), "model.init_from=null", "--gpus", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["cluster"]["gpus"] == 2 and {row["stage"] for row in plan["scenarios"]} == {0, 1, 2, 3}
    assert main(["plan", str(RECIPES / "tiny_stage2.yaml"), "--gpus", "3", "--nodes", "2"]) == 2
    assert capsys.readouterr().err == "mlcd-vl plan: error: --gpus 3 must be a positive multiple of --nodes 2\n"
    assert main(["plan", str(RECIPES / "tiny_stage2.yaml"), "--gpus", "2", "--lengths", "missing.npz"]) == 2
    assert capsys.readouterr().err.count("\n") == 1  # one line naming the file, no traceback
    assert main(["plan", str(RECIPES / "tiny_stage2.yaml"), "optim.loss_impl=fused", "--gpus", "2"]) == 2
    assert "optim.loss_impl" in capsys.readouterr().err


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
