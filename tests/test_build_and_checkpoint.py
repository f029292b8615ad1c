"""Composing a VLM, the presets registry, HF-native checkpoints and their errors (tiny models, CPU)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image
from transformers import (AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer,
                          LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
                          LlavaOnevisionForConditionalGeneration)

from mlcd_vl import presets
from mlcd_vl.assets import DEMO_IMAGE
from mlcd_vl.model import multimodal, pixels, tiny
from mlcd_vl.model.build import VLMSpec, build_vlm
from mlcd_vl.model.checkpoint import CheckpointError, load_vlm, read_settings, save_vlm

SHAPES = tiny.TinyShapes()
GRID = presets.upstream_grid(SHAPES.image_size)
MODES = {
    "llava": ("square", "flat", LlavaForConditionalGeneration),
    "llava_next": ("anyres", "spatial_unpad", LlavaNextForConditionalGeneration),
    "llava_onevision": ("anyres_max_4", "spatial_unpad", LlavaOnevisionForConditionalGeneration),
}
CHATML = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?"
          "<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def assets(tiny_assets):
    return tiny_assets


def build(assets, model_type: str, tower: str = "tower"):
    image_mode, merge, _ = MODES[model_type]
    spec = VLMSpec(llm=str(assets["llm"]), tower=str(assets[tower]), image_mode=image_mode, merge_type=merge,
                   pinpoints=GRID if merge != "flat" else None)
    return build_vlm(spec)


@pytest.fixture(scope="module")
def saved(assets, tmp_path_factory):
    """model type -> (model, tokenizer, settings, folder)."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for model_type in MODES:
        model, tokenizer, settings = build(assets, model_type)
        out[model_type] = (model, tokenizer, settings, save_vlm(model, tokenizer, settings, root / model_type))
    return out


def images() -> list[Image.Image]:
    demo = Image.open(DEMO_IMAGE).convert("RGB")
    return [demo, demo.resize((100, 37)), demo.resize((30, 90)), demo.resize((600, 500))]


def our_inputs(model, tokenizer, settings, image: Image.Image, text: str = CHATML):
    """Our path: pixels.process_image -> expand <image> -> multimodal.embed_inputs."""
    item = multimodal.ImageInput(pixels.process_image(image, settings.processor, settings.mode), image.size,
                                 settings.image_mode)
    ids = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        count = multimodal.expected_tokens(item, settings) if token == model.config.image_token_id else 1
        ids.extend([token] * count)
    ids = torch.tensor([ids])
    with torch.no_grad():
        embeds = multimodal.embed_inputs(model, settings, ids, [item])
    return ids, embeds


# ------------------------------------------------------------------ composition


@pytest.mark.parametrize("model_type", list(MODES))
def test_class_projector_and_newline(saved, assets, model_type):
    model, tokenizer, settings, _ = saved[model_type]
    assert type(model) is MODES[model_type][2]
    assert model.config.model_type == model_type
    projector = model.model.multi_modal_projector
    assert (projector.linear_1.in_features, projector.linear_1.out_features) == (SHAPES.tower_hidden, SHAPES.llm_hidden)
    assert (projector.linear_2.in_features, projector.linear_2.out_features) == (SHAPES.llm_hidden, SHAPES.llm_hidden)
    assert projector.linear_1.bias is not None and projector.linear_2.bias is not None
    assert isinstance(projector.act, torch.nn.GELU) or "gelu" in type(projector.act).__name__.lower()
    assert model.config.projector_hidden_act == "gelu"
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    newline = getattr(model.model, "image_newline", None)
    if model_type == "llava":
        assert newline is None
    else:
        assert newline is not None and newline.shape == (SHAPES.llm_hidden,)
    original = AutoTokenizer.from_pretrained(assets["llm"])
    assert tokenizer.convert_tokens_to_ids("<image>") == len(original) == model.config.image_token_id


def test_saved_chat_template_is_qwen_chatml(saved):
    folder = saved["llava_next"][3]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "<image>\nWhat is it?"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == CHATML
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert tokenizer.apply_chat_template(parts, tokenize=False, add_generation_prompt=True) == CHATML
    turns = messages + [{"role": "assistant", "content": "A circle."}, {"role": "user", "content": "Colour?"}]
    assert tokenizer.apply_chat_template(turns, tokenize=False) == (
        CHATML[:-len("<|im_start|>assistant\n")]
        + "<|im_start|>assistant\nA circle.<|im_end|>\n<|im_start|>user\nColour?<|im_end|>\n")
    assert tokenizer.padding_side == "left"
    assert read_settings(folder).template == "qwen_1_5"


def test_forward_backward_reaches_every_part(assets):
    model, tokenizer, settings = build(assets, "llava_next")
    model.train()
    image = images()[0]
    item = multimodal.ImageInput(pixels.process_image(image, settings.processor, settings.mode), image.size,
                                 settings.image_mode)
    ids = []
    for token in tokenizer(CHATML + "A red circle.<|im_end|>", add_special_tokens=False)["input_ids"]:
        ids.extend([token] * (multimodal.expected_tokens(item, settings) if token == model.config.image_token_id
                              else 1))
    ids = torch.tensor([ids])
    labels = ids.masked_fill(ids == model.config.image_token_id, -100)
    loss = model(inputs_embeds=multimodal.embed_inputs(model, settings, ids, [item]), labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    parts = {
        "projector": model.model.multi_modal_projector.linear_1.weight,
        "tower": next(p for n, p in model.model.vision_tower.named_parameters() if "patch_embedding" in n),
        "llm": model.model.language_model.layers[0].self_attn.q_proj.weight,
        "embeddings": model.model.language_model.embed_tokens.weight,
        "image_newline": model.model.image_newline,
    }
    for name, parameter in parts.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


# ------------------------------------------------------------------ plain transformers reads our folders


@pytest.mark.parametrize("model_type", ["llava_next", "llava"])
def test_plain_transformers_gives_identical_logits(saved, model_type):
    model, tokenizer, settings, folder = saved[model_type]
    plain = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder, backend="pil")
    assert type(plain) is MODES[model_type][2]
    for image in images():
        ids, embeds = our_inputs(model, tokenizer, settings, image)
        inputs = processor(images=image, text=CHATML, return_tensors="pt")
        assert torch.equal(inputs["input_ids"], ids), image.size  # same visual-token count and layout
        with torch.no_grad():
            ours = model(inputs_embeds=embeds).logits
            theirs = plain(**inputs).logits
        assert torch.equal(ours, theirs), (image.size, (ours - theirs).abs().max())


def test_onevision_folder_loads_and_matches_our_embed_path(saved):
    model, tokenizer, settings, folder = saved["llava_onevision"]
    plain = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(plain) is LlavaOnevisionForConditionalGeneration
    # AutoProcessor(backend="pil") fails on OneVision's video processor; the image processor alone loads
    image_processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    for image in images():
        ids, embeds = our_inputs(model, tokenizer, settings, image)
        _, plain_embeds = our_inputs(plain, tokenizer, settings, image)
        with torch.no_grad():
            ours = model(inputs_embeds=embeds).logits
            reloaded = plain(inputs_embeds=plain_embeds).logits
            theirs = plain(input_ids=ids, **image_processor(images=image, return_tensors="pt")).logits
        assert torch.equal(ours, reloaded)
        assert torch.equal(ours, theirs), (image.size, (ours - theirs).abs().max())


def test_load_vlm_round_trip(saved):
    model, tokenizer, settings, folder = saved["llava_next"]
    loaded, loaded_tokenizer, loaded_settings = load_vlm(folder)
    assert loaded_settings == settings
    assert loaded_tokenizer.convert_tokens_to_ids("<image>") == loaded.config.image_token_id
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


# ------------------------------------------------------------------ errors


def test_unknown_preset_is_named():
    with pytest.raises(KeyError, match="mlcd-vit-huge"):
        presets.require_tower_preset("mlcd-vit-huge")


def test_truncated_safetensors_names_the_file(saved, tmp_path):
    folder = tmp_path / "truncated"
    _copy_folder(saved["llava_next"][3], folder)
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_vlm(folder)


def test_corrupt_safetensors_header_names_the_file(saved, tmp_path):
    folder = tmp_path / "corrupt"
    _copy_folder(saved["llava_next"][3], folder)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_vlm(folder)


def test_shape_mismatch_is_a_clear_error(saved, tmp_path):
    folder = tmp_path / "mismatch"
    _copy_folder(saved["llava_next"][3], folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["intermediate_size"] = SHAPES.llm_intermediate + 32
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mismatch") as error:
        load_vlm(folder)
    assert str(folder) in str(error.value)


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_vlm(tmp_path)


def _copy_folder(source, target) -> None:
    target.mkdir()
    for item in source.iterdir():
        (target / item.name).write_bytes(item.read_bytes())


# ------------------------------------------------------------------ presets registry


def test_tower_presets_grids_and_sizes():
    bigg = presets.require_tower_preset("mlcd-bigG-448")
    assert bigg.hub_id == "DeepGlint-AI/mlcd-vit-bigG-patch14-448" and bigg.kind == "mlcd"
    assert (bigg.image_size, bigg.patch_size, bigg.hidden_size) == (448, 14, 1664)
    assert bigg.pinpoints == [(448, 896), (896, 448), (896, 896), (1344, 448), (448, 1344)]
    assert bigg.tokens_per_crop == 1024
    assert presets.require_tower_preset("mlcd-bigG-336").hidden_size == 1664
    vitl = presets.require_tower_preset("mlcd-vitL-336")
    assert vitl.hub_id == "DeepGlint-AI/mlcd-vit-large-patch14-336" and vitl.kind == "clip"
    assert (vitl.image_size, vitl.hidden_size, vitl.tokens_per_crop) == (336, 1024, 576)
    assert vitl.pinpoints == [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
    clip = presets.require_tower_preset("clip-vitL-336")
    assert clip.hub_id == "openai/clip-vit-large-patch14-336" and clip.kind == "clip"
    assert clip.pinpoints == vitl.pinpoints
    siglip = presets.require_tower_preset("siglip-so400m-384")
    assert siglip.kind == "siglip" and siglip.select_strategy == "full" and siglip.hidden_size == 1152
    assert siglip.pinpoints[0] == (384, 768)
    for preset in presets.TOWERS.values():
        assert preset.select_layer == -2
        assert all(w % preset.image_size == 0 and h % preset.image_size == 0 for w, h in preset.pinpoints)
        assert (preset.image_size, preset.image_size) not in preset.pinpoints  # upstream's grid has no 1x1


def test_resolve_ids_without_network(tmp_path):
    assert presets.resolve_tower("mlcd-bigG-448") == "DeepGlint-AI/mlcd-vit-bigG-patch14-448"
    assert presets.resolve_tower("DeepGlint-AI/mlcd-vit-bigG-patch14-448") == "DeepGlint-AI/mlcd-vit-bigG-patch14-448"
    assert presets.tower_preset("DeepGlint-AI/mlcd-vit-bigG-patch14-448").name == "mlcd-bigG-448"
    assert presets.resolve_tower(str(tmp_path)) == str(tmp_path)
    assert presets.tower_preset(str(tmp_path)) is None
    assert presets.resolve_llm("qwen2.5-7b-instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert presets.llm_preset("Qwen/Qwen2.5-7B-Instruct").hidden_size == 3584
    assert presets.DEFAULT_TOWER == "mlcd-bigG-448" and presets.DEFAULT_LLM == "qwen2.5-7b-instruct"
