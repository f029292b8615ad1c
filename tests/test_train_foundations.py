"""Training foundations on the tiny preset (CPU): config loading, freezing, LR groups, loss normalisation, projector IO.

The loss-normalisation tests check the central promise of `mlcd_vl.train.loss`: however a fixed set of samples is
split into micro-batches (or ranks), padded or packed, the accumulated gradient equals the gradient of one big
batch's token-mean loss, computed independently by transformers' own loss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from mlcd_vl import presets
from mlcd_vl.model.build import VLMSpec, build_vlm
from mlcd_vl.model.multimodal import ImageInput, embed_inputs
from mlcd_vl.model.varlen import VARLEN_ATTENTION, composite_attention
from mlcd_vl.train import optim
from mlcd_vl.train.config import ConfigError, load_config, save_resolved
from mlcd_vl.data.packing import block_causal_mask
from mlcd_vl.train.loss import StepTokens, plan_step
from mlcd_vl.train.step import (BatchError, TrainBatch, TrainingForward, count_batch_supervised, forward_loss,
                                plan_micro_batches)
from mlcd_vl.vocab import IGNORE_INDEX
from mlcd_vl.train.head_loss import HeadLossSettings

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "configs" / "recipes"
TINY_PINPOINTS = presets.upstream_grid(56)
PROJECTOR_NAMES = {f"model.multi_modal_projector.{k}" for k in optim.PROJECTOR_KEYS}


@pytest.fixture(scope="module")
def tiny_paths(tiny_assets) -> dict:
    return tiny_assets


def build(tiny_paths, stage: int):
    if stage == 1:
        spec = VLMSpec(llm=str(tiny_paths["llm"]), tower=str(tiny_paths["tower"]), image_mode="square",
                       merge_type="flat", template="plain")
    else:
        spec = VLMSpec(llm=str(tiny_paths["llm"]), tower=str(tiny_paths["tower"]), image_mode="anyres",
                       merge_type="spatial_unpad", pinpoints=TINY_PINPOINTS)
    return build_vlm(spec)


# ----------------------------------------------------------------------------------------------------------------
# Hand-made samples, padded and packed batches
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    ids: torch.Tensor
    labels: torch.Tensor
    image: ImageInput | None


def make_samples(model, seed: int = 0) -> list[Sample]:
    """Six samples of unequal lengths and supervised counts; four carry a square image (16 tokens)."""
    generator = torch.Generator().manual_seed(seed)
    image_id, tokens = model.config.image_token_id, 16
    samples = []
    for prompt, answer, has_image in [(5, 3, True), (9, 14, False), (4, 1, True), (7, 22, True), (3, 6, False),
                                      (6, 2, True)]:
        text = torch.randint(0, 490, (prompt + answer,), generator=generator)
        ids = torch.cat([text[:2], torch.full((tokens if has_image else 0,), image_id), text[2:]])
        labels = ids.clone()
        labels[1:2 + prompt] = IGNORE_INDEX  # prompt and image masked; the first token stays supervised on
        labels[ids == image_id] = IGNORE_INDEX  # purpose: packing must never train across a sample boundary
        image = ImageInput(torch.randn(3, 56, 56, generator=generator), (56, 56), "square") if has_image else None
        samples.append(Sample(ids, labels, image))
    return samples


def pad_batch(samples: list[Sample]) -> TrainBatch:
    length = max(len(s.ids) for s in samples)
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.ids)
        ids[row, :n], labels[row, :n], mask[row, :n] = sample.ids, sample.labels, 1
    return TrainBatch(ids, labels, mask, None, [s.image for s in samples if s.image is not None])


def pack_batch(rows: list[list[Sample]]) -> TrainBatch:
    """Each row holds several samples: block-diagonal causal mask, position ids restarting per sample."""
    length = max(sum(len(s.ids) for s in row) for row in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX)
    positions = torch.zeros(len(rows), length, dtype=torch.long)
    segments = torch.zeros(len(rows), length, dtype=torch.long)
    images = []
    for r, row in enumerate(rows):
        start = 0
        for number, sample in enumerate(row, start=1):
            n = len(sample.ids)
            ids[r, start:start + n], labels[r, start:start + n] = sample.ids, sample.labels
            positions[r, start:start + n], segments[r, start:start + n] = torch.arange(n), number
            images += [sample.image] if sample.image is not None else []
            start += n
    return TrainBatch(ids, labels, block_causal_mask(segments), positions, images)


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def reference_gradients(model, settings, samples: list[Sample]) -> dict[str, torch.Tensor]:
    """One big padded batch, token-mean loss computed by transformers' own causal-LM loss."""
    batch = pad_batch(samples)
    embeds = embed_inputs(model, settings, batch.input_ids, batch.images)
    model(inputs_embeds=embeds, attention_mask=batch.attention_mask, labels=batch.labels).loss.backward()
    return gradients(model)


def accumulated_gradients(model, settings, ranks: list[list[TrainBatch]], mode: str = "global",
                          head_loss: HeadLossSettings = HeadLossSettings()) -> dict:
    """Gradients summed over each rank's micro-batches and averaged over ranks (what DDP / DeepSpeed do)."""
    total = sum(count_batch_supervised(b) for batches in ranks for b in batches)
    per_rank = []
    for batches in ranks:
        step = StepTokens(supervised=total, micro_batches=len(batches), world_size=len(ranks), mode=mode)
        for batch in batches:
            forward_loss(model, settings, batch, step, head_loss).loss.backward()
        per_rank.append(gradients(model))
    names = set().union(*per_rank)
    return {n: sum(g.get(n, 0) for g in per_rank) / len(ranks) for n in names}


def assert_same_gradients(actual: dict, expected: dict, atol: float = 1e-6) -> None:
    for name in set(actual) | set(expected):
        a = actual.get(name, torch.zeros_like(expected.get(name, actual.get(name))))
        e = expected.get(name, torch.zeros_like(a))
        torch.testing.assert_close(a, e, atol=atol, rtol=1e-5, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------------------------
# Loss normalisation
# ----------------------------------------------------------------------------------------------------------------


def test_accumulated_gradients_equal_one_big_batch(tiny_paths):
    model, _, settings = build(tiny_paths, stage=1)
    samples = make_samples(model)
    expected = reference_gradients(model, settings, samples)
    assert any(n.startswith("model.vision_tower.") for n in expected)
    s = samples
    splits = {
        "padded 2+3+1": [[pad_batch(s[0:2]), pad_batch(s[2:5]), pad_batch(s[5:6])]],
        "padded 1+2+3": [[pad_batch(s[0:1]), pad_batch(s[1:3]), pad_batch(s[3:6])]],
        "packed 3+3 rows, one micro-batch": [[pack_batch([s[0:3], s[3:6]])]],
        "packed, two micro-batches": [[pack_batch([s[0:2], s[2:3]]), pack_batch([s[3:6]])]],
        "two ranks, uneven": [[pad_batch(s[0:1]), pad_batch(s[1:2])], [pad_batch(s[2:4]), pack_batch([s[4:6]])]],
    }
    for label, ranks in splits.items():
        actual = accumulated_gradients(model, settings, ranks)
        try:
            assert_same_gradients(actual, expected)
        except AssertionError as error:
            raise AssertionError(f"{label}: {error}") from None


def mask_free(batch: TrainBatch) -> TrainBatch:
    """A one-row packed batch without its 4D mask: sample boundaries come from the position ids alone."""
    return TrainBatch(batch.input_ids, batch.labels, None, batch.position_ids, batch.images)


def test_varlen_attention_gradients_equal_one_big_batch(tiny_paths):
    model, _, settings = build(tiny_paths, stage=1)
    samples = make_samples(model)
    expected = reference_gradients(model, settings, samples)  # plain SDPA, padded
    model.set_attn_implementation(composite_attention("sdpa", packing=True))
    assert model.model.language_model.config._attn_implementation == VARLEN_ATTENTION
    assert model.model.vision_tower.config._attn_implementation == "sdpa"
    s = samples
    splits = {
        "packed rows 3+3, no mask": [[mask_free(pack_batch([s[0:3]])), mask_free(pack_batch([s[3:6]]))]],
        "padded batches through sdpa_varlen": [[pad_batch(s[0:2]), pad_batch(s[2:6])]],
        "two ranks, padded and packed": [[pad_batch(s[0:1]), mask_free(pack_batch([s[1:4]]))],
                                         [mask_free(pack_batch([s[4:6]]))]],
    }
    for label, ranks in splits.items():
        try:
            assert_same_gradients(accumulated_gradients(model, settings, ranks), expected)
        except AssertionError as error:
            raise AssertionError(f"{label}: {error}") from None
    with pytest.raises(BatchError, match="one per micro-batch"):
        forward_loss(model, settings, mask_free(pack_batch([s[0:3], s[3:6]])), StepTokens(10, 1))


def test_packing_never_trains_across_sample_boundaries(tiny_paths):
    model, _, _ = build(tiny_paths, stage=1)
    samples = make_samples(model)
    packed = pack_batch([samples[0:3]])
    # every sample's first label is supervised, yet only targets inside a sample count
    assert count_batch_supervised(packed) == sum(int((s.labels[1:] != IGNORE_INDEX).sum()) for s in samples[0:3])


def test_batch_contract_is_checked(tiny_paths):
    model, _, settings = build(tiny_paths, stage=1)
    packed = pack_batch([make_samples(model)[0:2]])
    step = StepTokens(supervised=10, micro_batches=1)
    with pytest.raises(BatchError, match="position_ids"):
        forward_loss(model, settings, TrainBatch(packed.input_ids, packed.labels, packed.attention_mask), step)
    with pytest.raises(BatchError, match="leak attention across samples"):
        forward_loss(model, settings, TrainBatch(packed.input_ids, packed.labels, None, packed.position_ids), step)
    with pytest.raises(BatchError, match="labels shape"):
        forward_loss(model, settings, TrainBatch(packed.input_ids, packed.labels[:, 1:], packed.attention_mask), step)


def test_upstream_normalisation_weights_micro_batches_equally(tiny_paths):
    model, _, settings = build(tiny_paths, stage=1)
    samples = make_samples(model)
    micro = [pad_batch(samples[0:1]), pad_batch(samples[1:4]), pad_batch(samples[4:6])]
    counts = [count_batch_supervised(b) for b in micro]
    assert len(set(counts)) == len(counts)
    upstream = accumulated_gradients(model, settings, [micro], mode="upstream")
    # upstream by hand: transformers' per-micro-batch token mean, divided by the number of micro-batches
    for batch in micro:
        embeds = embed_inputs(model, settings, batch.input_ids, batch.images)
        loss = model(inputs_embeds=embeds, attention_mask=batch.attention_mask, labels=batch.labels).loss
        (loss / len(micro)).backward()
    assert_same_gradients(upstream, gradients(model))
    expected = reference_gradients(model, settings, samples)
    difference = max((upstream[n] - expected[n]).abs().max().item() for n in expected)
    assert difference > 1e-4, "upstream normalisation should re-weight micro-batches of unequal token counts"


ALL_REDUCE_WORKER = """
import json, sys
import torch.distributed as dist
from mlcd_vl.train.loss import plan_step
rank, init_file, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
step = plan_step([3, 4] if rank == 0 else [10], mode="global")
open(out, "w").write(json.dumps([step.supervised, step.world_size, step.micro_batches]))
dist.destroy_process_group()
"""


def test_plan_step_all_reduces_across_ranks(tmp_path):
    """Two gloo processes (plain interpreters: only torch to import) count 3+4 and 10 tokens."""
    import subprocess
    import sys

    processes = [subprocess.Popen([sys.executable, "-c", ALL_REDUCE_WORKER, str(rank), str(tmp_path / "init"),
                                   str(tmp_path / f"{rank}.json")], cwd=REPO) for rank in (0, 1)]
    assert [p.wait(timeout=120) for p in processes] == [0, 0]
    assert json.loads((tmp_path / "0.json").read_text()) == [17, 2, 2]
    assert json.loads((tmp_path / "1.json").read_text()) == [17, 2, 1]


# ----------------------------------------------------------------------------------------------------------------
# Freezing and optimizer groups
# ----------------------------------------------------------------------------------------------------------------


def test_stage1_trains_the_projector_only(tiny_paths):
    model, _, settings = build(tiny_paths, stage=1)
    summary = optim.apply_tunable_parts(model, "mm_mlp_adapter")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == PROJECTOR_NAMES
    assert summary["projector"].trainable == summary["projector"].total > 0
    assert summary["vision_tower"].trainable == summary["language_model"].trainable == 0
    config = load_config(RECIPES / "tiny_stage1.yaml")
    optimizer = optim.build_optimizer(model, config.optim)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    batch = pad_batch(make_samples(model)[:3])
    module = TrainingForward(model, settings)  # what DDP / DeepSpeed wrap
    module(batch, plan_micro_batches([batch])).loss.backward()
    optimizer.step()
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    assert changed == PROJECTOR_NAMES


def test_stage2_parts(tiny_paths):
    model, _, settings = build(tiny_paths, stage=2)
    everything = {n for n, _ in model.named_parameters()}
    optim.apply_tunable_parts(model, "mm_vision_tower,mm_mlp_adapter,mm_language_model")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == everything
    optim.apply_tunable_parts(model, "mm_language_model")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"lm_head.weight", "model.image_newline", "model.language_model.embed_tokens.weight"} <= trainable
    assert not any(n.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for n in trainable)
    summary = optim.apply_tunable_parts(model, "mm_vision_tower")
    assert all(n.startswith("model.vision_tower.") for n, p in model.named_parameters() if p.requires_grad)
    assert summary["vision_tower"].trainable == summary["vision_tower"].total
    assert sum(c.total for c in summary.values()) == sum(p.numel() for p in model.parameters())
    assert "trainable" in optim.format_parameter_summary(summary)
    with pytest.raises(ValueError, match="mm_vision_resampler"):
        optim.apply_tunable_parts(model, "mm_vision_resampler")


def test_stage2_step_with_anyres_image(tiny_paths):
    from PIL import Image

    from mlcd_vl.model.multimodal import expected_tokens
    from mlcd_vl.model.pixels import process_image

    model, _, settings = build(tiny_paths, stage=2)
    optim.apply_tunable_parts(model, "mm_vision_tower,mm_mlp_adapter,mm_language_model")
    image = ImageInput(process_image(Image.new("RGB", (150, 70), (200, 30, 30)), settings.processor, settings.mode),
                       (150, 70), "anyres")
    tokens = expected_tokens(image, settings)
    ids = torch.cat([torch.tensor([5, 6]), torch.full((tokens,), model.config.image_token_id), torch.arange(7, 20)])
    labels = torch.where(torch.arange(len(ids)) >= 2 + tokens, ids, torch.tensor(IGNORE_INDEX))
    batch = TrainBatch(ids[None], labels[None], torch.ones(1, len(ids), dtype=torch.long), None, [image])
    output = forward_loss(model, settings, batch, plan_step([count_batch_supervised(batch)]))
    output.loss.backward()
    assert output.supervised_tokens == 13 and torch.isfinite(output.loss)
    assert model.model.image_newline.grad is not None and model.model.image_newline.grad.abs().sum() > 0


def test_learning_rates_per_part(tiny_paths):
    model, _, _ = build(tiny_paths, stage=2)
    optim.apply_tunable_parts(model, "mm_vision_tower,mm_mlp_adapter,mm_language_model")
    config = load_config(RECIPES / "tiny_stage2.yaml", ["optim.lr=1e-5", "optim.vision_tower_lr=2e-6"])
    groups = optim.build_param_groups(model, config.optim)
    assert {g["name"]: g["lr"] for g in groups} == {"vision_tower": 2e-6, "projector": 1e-5, "language_model": 1e-5}
    for group in groups:
        assert all(optim.module_part(n) == group["name"] for n in group["param_names"])
    named = [n for g in groups for n in g["param_names"]]
    assert sorted(named) == sorted(n for n, _ in model.named_parameters())

    config = load_config(RECIPES / "tiny_stage2.yaml", ["optim.projector_lr=3e-5", "optim.weight_decay=0.1"])
    groups = {g["name"]: g for g in optim.build_param_groups(model, config.optim)}
    assert groups["projector"]["lr"] == groups["projector.no_decay"]["lr"] == 3e-5
    assert "model.image_newline" in groups["language_model.no_decay"]["param_names"]
    for name, group in groups.items():
        params = dict(zip(group["param_names"], group["params"]))
        if name.endswith(".no_decay"):
            assert group["weight_decay"] == 0.0
            assert all(n.endswith(".bias") or p.dim() < 2 for n, p in params.items())
        else:
            assert group["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in params.values())

    optim.apply_tunable_parts(model, "mm_mlp_adapter")
    optimizer = optim.build_optimizer(model, load_config(RECIPES / "tiny_stage1.yaml").optim)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3]
    scheduler = optim.build_scheduler(optimizer, load_config(RECIPES / "tiny_stage1.yaml").optim, total_steps=100)
    assert optim.warmup_steps(100, 0.03) == 3 and optimizer.param_groups[0]["lr"] == 0.0
    assert optim.warmup_steps(100, 0.03, 7) == 7 and optim.warmup_steps(100, 0.03, 0) == 3  # as TrainingArguments
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------


def test_config_overrides_and_resolved_round_trip(tmp_path):
    overrides = ["optim.lr=2e-5", "batch.grad_accum=4", "optim.max_grad_norm=None", "lora.target_modules=q_proj,v_proj"]
    config = load_config(RECIPES / "tiny_stage2.yaml", overrides)
    assert config.optim.lr == 2e-5 and config.batch.grad_accum == 4 and config.optim.max_grad_norm is None
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.batch.describe(1).startswith("global batch 8 = 2 per device x 1 process(es) x 4")
    path = save_resolved(config, tmp_path / "run")
    assert path.name == "train_config.yaml" and load_config(path) == config
    assert load_config(RECIPES / "tiny_stage2.yaml", ["tunable_parts=mm_mlp_adapter", "optim.lr=None"]).optim.lr \
        == 1e-3  # unset lr follows the stage


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1e-3", "optim.lrr"),
    ("batch.grad_accum=four", "batch.grad_accum: expected int"),
    ("gradient_checkpointing=maybe", "gradient_checkpointing: expected bool"),
    ("seed.value=3", "seed is a value"),
    ("precision=bf17", "precision"),
    ("tunable_parts=mm_projector", "tunable_parts"),
    ("optim.lr", "section.key=value"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(RECIPES / "tiny_stage1.yaml", [override])


def test_recipe_errors_name_the_key(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({"optim": {"lr": 1e-3, "warmup_ratioo": 0.1}}))
    with pytest.raises(ConfigError, match=r"optim\.warmup_ratioo.*did you mean optim\.warmup_ratio"):
        load_config(recipe)
    recipe.write_text(yaml.safe_dump({"batch": {"per_device_batch_size": "many"}}))
    with pytest.raises(ConfigError, match=r"bad\.yaml.*batch\.per_device_batch_size"):
        load_config(recipe)


def test_mlcd_recipes_have_the_upstream_global_batch():
    stage1 = load_config(RECIPES / "mlcd_bigG448_stage1.yaml")
    stage2 = load_config(RECIPES / "mlcd_bigG448_stage2.yaml")
    assert (stage1.optim.lr, stage1.tunable_parts_list) == (1e-3, ["mm_mlp_adapter"])
    assert (stage2.optim.lr, stage2.optim.vision_tower_lr, stage2.data.max_length) == (1e-5, 2e-6, 32768)
    for config in (stage1, stage2):
        assert config.batch.global_batch(8) == 128
        config.batch.check(8)
        with pytest.raises(ConfigError, match="global_batch_size"):
            config.batch.check(4)
        assert (REPO / config.deepspeed).is_file()


def test_deepspeed_configs():
    for name in ("zero2", "zero3", "zero3_offload"):
        config = json.loads((REPO / "configs" / "deepspeed" / f"{name}.json").read_text())
        assert "optimizer" not in config and "scheduler" not in config, name
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "gradient_clipping"):
            assert config[key] == "auto", (name, key)
        assert config["bf16"]["enabled"] == config["fp16"]["enabled"] == "auto"
        if name.startswith("zero3"):
            assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    offload = json.loads((REPO / "configs" / "deepspeed" / "zero3_offload.json").read_text())
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert offload["zero_force_ds_cpu_optimizer"] is False  # torch AdamW with offload


# ----------------------------------------------------------------------------------------------------------------
# Projector artifact
# ----------------------------------------------------------------------------------------------------------------


def test_projector_from_stage1_into_stage2(tiny_paths, tmp_path):
    from mlcd_vl.model.checkpoint import save_vlm

    stage1, tokenizer, settings1 = build(tiny_paths, stage=1)
    with torch.no_grad():
        for param in stage1.model.multi_modal_projector.parameters():
            param.add_(torch.randn_like(param))
    expected = optim.projector_state_dict(stage1)
    assert set(expected) == PROJECTOR_NAMES
    optim.save_projector(stage1, tmp_path / "stage1", upstream_bin=True)
    bin_state = torch.load(tmp_path / "stage1" / "mm_projector.bin", weights_only=True)
    assert sorted(bin_state) == sorted(f"model.mm_projector.{i}.{k}" for i in (0, 2) for k in ("weight", "bias"))

    upstream_dir = tmp_path / "upstream"
    upstream_dir.mkdir()
    torch.save(optim.to_upstream_projector(expected), upstream_dir / "mm_projector.bin")
    save_vlm(stage1, tokenizer, settings1, tmp_path / "stage1-checkpoint")

    sources = {"our artifact": (tmp_path / "stage1", False),
               "upstream mm_projector.bin": (upstream_dir / "mm_projector.bin", True),
               "HF-native checkpoint": (tmp_path / "stage1-checkpoint", False)}
    for label, (source, allow_pickle) in sources.items():
        stage2, _, _ = build(tiny_paths, stage=2)
        assert stage2.config.model_type == "llava_next"
        optim.load_projector(stage2, source, allow_pickle=allow_pickle)
        loaded = optim.projector_state_dict(stage2)
        for key in expected:
            assert torch.equal(loaded[key], expected[key]), (label, key)

    stage2, _, _ = build(tiny_paths, stage=2)
    before = optim.projector_state_dict(stage2)
    with pytest.raises(optim.ProjectorError, match="allow_pickle"):
        optim.load_projector(stage2, upstream_dir)
    assert all(torch.equal(before[k], t) for k, t in optim.projector_state_dict(stage2).items())


def test_projector_shape_mismatch_is_refused(tiny_paths, tmp_path):
    from safetensors.torch import save_file

    model, _, _ = build(tiny_paths, stage=2)
    state = optim.projector_state_dict(model)
    state["model.multi_modal_projector.linear_1.weight"] = torch.zeros(64, 48)
    save_file(state, str(tmp_path / "projector.safetensors"))
    with pytest.raises(optim.ProjectorError, match=r"linear_1\.weight has shape \(64, 48\)"):
        optim.load_projector(model, tmp_path)
    with pytest.raises(optim.ProjectorError, match="not found"):
        optim.load_projector(model, tmp_path / "missing")
