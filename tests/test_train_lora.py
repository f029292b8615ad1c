"""LoRA on the tiny preset (CPU, one process): adapters on the LLM, projector trained fully, tower frozen, merged
on export into a plain HF-native folder that reloads with `AutoModelForImageTextToText`; resume works."""

from __future__ import annotations

import shutil

import pytest
import torch
import train_helpers as H
from safetensors.torch import load_file

from mlcd_vl.train import checkpointing, lora, models, optim
from mlcd_vl.train.config import ConfigError, load_config
from mlcd_vl.train.run import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    paths = H.write_dataset(tmp_path_factory.mktemp("lora"))
    with H.in_process_training(paths["tiny"]):
        yield paths


def lora_config(data, out, *extra):
    return load_config(H.RECIPES / "tiny_stage2.yaml", [
        f"data.train={data['chat']}", f"data.image_folder={data['images']}", f"output_dir={out}",
        "model.init_from=null", "tunable_parts=mm_mlp_adapter,mm_language_model", "lora.enabled=true", "lora.r=4",
        "lora.alpha=8", "optim.lr=1e-2", "optim.max_steps=4", "batch.per_device_batch_size=1", *extra])


@pytest.fixture(scope="module")
def lora_run(data):
    config = lora_config(data, data["root"] / "lora", "save_steps=2")
    return config, train(config)


def randomise_lora_b(model):
    """B starts at zero (the adapters change nothing): give it values."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.5, generator=generator)


def text_logits(model, seed=0):
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_adapters_only_on_the_llm(data):
    config = lora_config(data, data["root"] / "unused")
    model, _, _, _ = models.build_model(config)
    optim.apply_tunable_parts(model, config.tunable_parts)
    lora.apply_lora(model, config.lora, config.tunable_parts_list)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    adapters = {name for name in trainable if ".lora_" in name}
    assert adapters and all(name.startswith(lora.LLM_PREFIX) for name in adapters)
    assert len(adapters) == 2 * 7 * model.config.text_config.num_hidden_layers  # A and B on 7 linears per layer
    # the projector fully, and image_newline (new in stage 2, part of the language model upstream); nothing else
    assert trainable - adapters == {optim.PROJECTOR_PREFIX + k for k in optim.PROJECTOR_KEYS} | {"model.image_newline"}
    with pytest.raises(ConfigError, match="mm_language_model"):
        lora.apply_lora(model, config.lora, ["mm_mlp_adapter"])


def test_merge_keeps_the_outputs(data):
    config = lora_config(data, data["root"] / "unused")
    model, _, _, _ = models.build_model(config)
    tuner = lora.apply_lora(model, config.lora, config.tunable_parts_list)
    randomise_lora_b(model)  # make the adapters matter
    before = text_logits(model)
    merged = lora.merge(tuner)
    assert not any(".lora_" in name or "base_layer" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(text_logits(merged), before, rtol=1e-5, atol=1e-5)


def test_tensor_merge_equals_peft_merge(data):
    """ZeRO-3's merge, on a (consolidated) state dict, gives exactly what `merge_and_unload` gives on the module."""
    config = lora_config(data, data["root"] / "unused", "lora.alpha=12")
    model, _, _, _ = models.build_model(config)
    plain_keys = list(model.state_dict())
    tuner = lora.apply_lora(model, config.lora, config.tunable_parts_list)
    randomise_lora_b(model)
    scalings = lora.layer_scalings(model)
    assert len(scalings) == 7 * model.config.text_config.num_hidden_layers and set(scalings.values()) == {12 / 4}
    state = {key: tensor.clone() for key, tensor in model.state_dict().items()}  # merge_state_dict consumes it
    merged = lora.merge_state_dict(state, scalings)
    expected = lora.merge(tuner).state_dict()
    assert list(merged) == list(expected) == plain_keys  # base_layer renamed back, adapters gone, same order
    for key, tensor in expected.items():
        torch.testing.assert_close(merged[key], tensor, rtol=0, atol=0, msg=key)


def test_tensor_merge_reads_peft_scaling_and_checks_keys():
    """rsLoRA's alpha / sqrt(r) comes from the layers; an adapter tensor left over or missing is an error."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import LoraModel

    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4, bias=False))
    tuner = LoraModel(model, PeftLoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["0", "1"]),
                      lora.ADAPTER)
    randomise_lora_b(model)
    scalings = lora.layer_scalings(model)
    assert scalings == {"0": 6 / 2, "1": 6 / 2}
    def state(drop=(), **extra):
        return {k: v.clone() for k, v in model.state_dict().items() if k not in drop} | extra

    with pytest.raises(ValueError, match="missing"):
        lora.merge_state_dict(state(drop=["1.lora_B.default.weight"]), scalings)
    with pytest.raises(ValueError, match="no adapter scaling"):
        lora.merge_state_dict(state(), {"0": scalings["0"]})
    with pytest.raises(ValueError, match="no merged layer"):
        lora.merge_state_dict(state(**{"2.lora_A.default.weight": torch.zeros(4, 4)}), scalings)
    merged = lora.merge_state_dict(state(), scalings)
    expected = tuner.merge_and_unload().state_dict()
    assert list(merged) == list(expected) == ["0.weight", "0.bias", "1.weight"]
    for key, tensor in expected.items():
        torch.testing.assert_close(merged[key], tensor, rtol=0, atol=0, msg=key)


def test_lora_run_saves_a_plain_merged_model(lora_run):
    from transformers import AutoModelForImageTextToText

    config, result = lora_run
    assert result.steps == 4
    start, _, _, _ = models.build_model(config)
    initial = start.state_dict()
    reloaded = AutoModelForImageTextToText.from_pretrained(result.output_dir)
    assert type(reloaded).__name__ == type(result.model).__name__
    saved = reloaded.state_dict()
    assert saved.keys() == initial.keys()  # no adapter or base_layer keys left
    changed = {k for k, v in saved.items() if not torch.equal(v, initial[k])}
    assert {optim.PROJECTOR_PREFIX + k for k in optim.PROJECTOR_KEYS} <= changed
    assert any(".self_attn.q_proj.weight" in k for k in changed)  # adapters merged into the LLM
    assert not any("vision_tower" in k or "embed_tokens" in k for k in changed)  # tower and embeddings frozen
    for key, tensor in result.model.state_dict().items():
        torch.testing.assert_close(saved[key], tensor, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(text_logits(reloaded), text_logits(result.model), rtol=1e-5, atol=1e-5)


def test_lora_run_resumes(data, lora_run):
    _, full = lora_run
    resumed_dir = data["root"] / "lora-resumed"
    shutil.copytree(full.output_dir / "checkpoint-2", resumed_dir / "checkpoint-2")
    assert any(".lora_A." in key for key in load_file(str(resumed_dir / "checkpoint-2" / "model.safetensors")))
    resumed = train(lora_config(data, resumed_dir, "save_steps=2"))
    assert [r["step"] for r in resumed.history] == [3, 4]
    assert resumed.history[-1]["loss"] == pytest.approx(full.history[-1]["loss"], rel=1e-6)
    expected = load_file(str(full.output_dir / "model.safetensors"))
    actual = load_file(str(resumed_dir / "model.safetensors"))
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, rtol=0, atol=1e-6, msg=key)
    assert [p.name for p in checkpointing.checkpoints(resumed_dir)] == ["checkpoint-2"]
