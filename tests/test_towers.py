"""The six tower presets of the MLCD encoder table, and one tiny random tower per family built into a VLM.

Families, each a tiny random model of the real class with its preset's image settings shrunk
(`TowerPreset.shrunk`): CLIP with QuickGELU (DFN5B through the OpenCLIP conversion, "squash" resize; CLIP ViT-L's
shortest-edge resize), SigLIP without a CLS token (all patches kept, squash resize, 0.5 mean/std, a crop size that
is not a multiple of the patch, as 384/14), and MLCD with 2D RoPE. Each is composed with `build_vlm` in anyres and
square mode; the checks: settings taken from the preset, tokens per crop (no CLS dropped for SigLIP), the merged
visual-token count that `anyres.image_layout` predicts, plain transformers (`AutoProcessor` + the saved model) giving
the same input ids and logits as our path, and a save/load round trip.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_open_clip import write_tiny_open_clip
from transformers import AutoModelForImageTextToText, AutoProcessor

from mlcd_vl import cli, presets
from mlcd_vl.model import anyres, build_command, multimodal, pixels, tiny
from mlcd_vl.model.build import VLMSpec, build_vlm
from mlcd_vl.model.checkpoint import load_vlm, save_vlm

CHATML = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?"
          "<|im_end|>\n<|im_start|>assistant\n")
# family -> (preset, tiny crop size); the tiny towers have the tiny shapes' width (32)
FAMILIES = {
    "dfn5b-openclip": ("dfn5b-vitH-378", 42),
    "clip-vitL": ("clip-vitL-336", 42),
    "siglip": ("siglip-so400m-384", 60),  # 60 = 4 * 14 + 4, like 384 = 27 * 14 + 6
    "mlcd-rope2d": ("mlcd-bigG-448", 56),
}
MODEL_TYPES = {"mlcd": "mlcd_vision_model", "clip": "clip_vision_model", "siglip": "siglip_vision_model"}
MODES = {"anyres": ("anyres", "spatial_unpad", "llava_next"), "square": ("square", "flat", "llava")}


# ------------------------------------------------------------------ the registry


def test_six_towers_of_the_mlcd_table():
    assert list(presets.TOWERS) == ["clip-vitL-336", "siglip-so400m-384", "dfn5b-vitH-378", "mlcd-vitL-336",
                                    "mlcd-bigG-336", "mlcd-bigG-448"]
    expected = {  # kind, crop, hidden, activation, CLS strategy, resize, mean
        "clip-vitL-336": ("clip", 336, 1024, "quick_gelu", "default", "shortest_edge", pixels.OPENAI_CLIP_MEAN),
        "siglip-so400m-384": ("siglip", 384, 1152, "gelu_pytorch_tanh", "full", "squash", (0.5, 0.5, 0.5)),
        "dfn5b-vitH-378": ("clip", 378, 1280, "quick_gelu", "default", "squash", pixels.OPENAI_CLIP_MEAN),
        "mlcd-vitL-336": ("clip", 336, 1024, "quick_gelu", "default", "shortest_edge", pixels.OPENAI_CLIP_MEAN),
        "mlcd-bigG-336": ("mlcd", 336, 1664, "gelu", "default", "shortest_edge", pixels.OPENAI_CLIP_MEAN),
        "mlcd-bigG-448": ("mlcd", 448, 1664, "gelu", "default", "shortest_edge", pixels.OPENAI_CLIP_MEAN),
    }
    for name, (kind, crop, hidden, act, strategy, resize, mean) in expected.items():
        preset = presets.TOWERS[name]
        assert (preset.kind, preset.image_size, preset.hidden_size, preset.hidden_act) == (kind, crop, hidden, act)
        assert (preset.select_strategy, preset.resize_mode, preset.mean) == (strategy, resize, mean), name
        assert preset.patch_size == 14 and preset.select_layer == -2
        assert pixels.ProcessorSettings.of_tower(preset) == pixels.ProcessorSettings(
            crop, 14, mean=preset.mean, std=preset.std, resize_mode=resize)
    dfn = presets.require_tower_preset("apple/DFN5B-CLIP-ViT-H-14-378")
    assert dfn.source_format == "open_clip" and dfn.tokens_per_crop == 27 * 27
    assert presets.TOWERS["siglip-so400m-384"].tokens_per_crop == 729  # 384 // 14 = 27, no CLS


def test_grid_scales_with_the_crop_size():
    assert presets.upstream_grid(336) == [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
    for preset in presets.TOWERS.values():
        assert preset.pinpoints == presets.upstream_grid(preset.image_size)
        assert anyres.image_layout((500, 500), image_mode="anyres", merge_type="spatial_unpad",
                                   crop_size=preset.image_size, patch_size=14,
                                   pinpoints=preset.pinpoints).grid == (2, 2)
    shrunk = presets.TOWERS["dfn5b-vitH-378"].shrunk(42, 32)
    assert shrunk.pinpoints == presets.upstream_grid(42) and shrunk.hidden_size == 32
    assert (shrunk.resize_mode, shrunk.hidden_act, shrunk.select_strategy) == ("squash", "quick_gelu", "default")


# ------------------------------------------------------------------ one tiny tower per family


@pytest.fixture(scope="module")
def llm(tiny_assets):
    return tiny_assets["llm"]


@pytest.fixture(scope="module")
def family_towers(tmp_path_factory):
    """family -> (tower folder, shrunk preset); DFN5B's is an OpenCLIP checkpoint, converted by build_vlm."""
    root = tmp_path_factory.mktemp("towers")
    patch = pytest.MonkeyPatch()
    patch.setenv("MLCD_VL_CACHE", str(root / "cache"))
    out = {}
    for family, (name, crop) in FAMILIES.items():
        preset = presets.TOWERS[name].shrunk(crop, tiny.TinyShapes().tower_hidden)
        if family == "dfn5b-openclip":
            out[family] = (write_tiny_open_clip(root / family), preset)
        else:
            out[family] = (tiny.write_preset_tower(root / family, preset, seed=3), preset)
    yield out
    patch.undo()


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    sizes = [(50, 50), (100, 37), (30, 90), (600, 500)]
    return [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes]


def _our_inputs(model, tokenizer, settings, image):
    item = multimodal.ImageInput(pixels.process_image(image, settings.processor, settings.mode), image.size,
                                 settings.image_mode)
    layout = anyres.image_layout(image.size, image_mode=settings.image_mode, merge_type=settings.merge_type,
                                 crop_size=settings.crop_size, patch_size=settings.patch_size,
                                 pinpoints=settings.pinpoints)
    ids = []
    for token in tokenizer(CHATML, add_special_tokens=False)["input_ids"]:
        ids.extend([token] * (layout.tokens if token == model.config.image_token_id else 1))
    ids = torch.tensor([ids])
    with torch.no_grad():
        embeds = multimodal.embed_inputs(model, settings, ids, [item])  # raises if the merge gives another count
    return ids, embeds, layout


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_builds_with_its_preset_settings(family, mode, family_towers, llm, tmp_path):
    folder, preset = family_towers[family]
    image_mode, merge, model_type = MODES[mode]
    model, tokenizer, settings = build_vlm(VLMSpec(llm=str(llm), tower=str(folder), tower_preset=preset,
                                                   image_mode=image_mode, merge_type=merge))
    assert model.config.model_type == model_type
    assert (settings.crop_size, settings.patch_size, settings.resize_mode) == (preset.image_size, 14,
                                                                               preset.resize_mode)
    assert (settings.image_mean, settings.image_std) == (preset.mean, preset.std)
    assert settings.pinpoints == (presets.upstream_grid(preset.image_size) if mode == "anyres" else [])
    assert model.config.vision_feature_layer == preset.select_layer == -2
    assert model.config.vision_feature_select_strategy == preset.select_strategy
    vision = model.config.vision_config
    assert (vision.model_type, vision.hidden_act) == (MODEL_TYPES[preset.kind], preset.hidden_act)

    # tokens per crop: CLS dropped for CLIP and MLCD, none to drop for SigLIP
    unit = preset.image_size // preset.patch_size
    crops = torch.randn(2, 3, preset.image_size, preset.image_size)
    with torch.no_grad():
        hidden = model.model.vision_tower(crops, output_hidden_states=True).hidden_states
        features = multimodal.vision_tower_features(model, crops)
    has_cls = preset.kind != "siglip"
    assert hidden[-2].shape[1] == unit * unit + has_cls
    assert features.shape[1] == unit * unit
    assert torch.equal(features, hidden[-2][:, int(has_cls):])

    folder_out = save_vlm(model, tokenizer, settings, tmp_path / "vlm")
    plain = AutoModelForImageTextToText.from_pretrained(folder_out)
    processor = AutoProcessor.from_pretrained(folder_out, backend="pil")
    for image in _images():
        ids, embeds, layout = _our_inputs(model, tokenizer, settings, image)
        assert int((ids == model.config.image_token_id).sum()) == layout.tokens
        inputs = processor(images=image, text=CHATML, return_tensors="pt")
        assert torch.equal(inputs["input_ids"], ids), (family, image.size)  # transformers counts the same tokens
        with torch.no_grad():
            ours = model(inputs_embeds=embeds).logits
            theirs = plain(**inputs).logits
        assert torch.isfinite(ours).all()
        assert (ours - theirs).abs().max() <= 1e-5, (family, image.size, (ours - theirs).abs().max())

    loaded, _, loaded_settings = load_vlm(folder_out)
    assert loaded_settings == settings
    reference = model.state_dict()
    assert all(torch.equal(tensor, reference[name]) for name, tensor in loaded.state_dict().items())


def test_tower_that_does_not_fit_its_preset_is_named(family_towers, llm):
    folder, _ = family_towers["clip-vitL"]
    siglip = presets.TOWERS["siglip-so400m-384"].shrunk(42, tiny.TinyShapes().tower_hidden)
    with pytest.raises(ValueError, match="does not fit preset 'siglip-so400m-384-tiny': model type clip_vision_model "
                                         "!= siglip_vision_model; hidden_act quick_gelu != gelu_pytorch_tanh"):
        build_vlm(VLMSpec(llm=str(llm), tower=str(folder), tower_preset=siglip))


def test_build_command_converts_an_open_clip_tower(family_towers, llm, tmp_path, monkeypatch, capsys):
    """`mlcd-vl build --tower OPENCLIP_FOLDER`: converted (cached), settings from its processor (squash)."""
    monkeypatch.setenv("MLCD_VL_CACHE", str(tmp_path / "cache"))
    folder, _ = family_towers["dfn5b-openclip"]
    pickle_only = write_tiny_open_clip(tmp_path / "pickle-only", pickle=True)
    common = ["--llm", str(llm), "--pinpoints", "[(42, 84), (84, 42), (84, 84)]"]
    parser = argparse.ArgumentParser()
    build_command.configure_parser(parser)
    assert build_command.run(parser.parse_args([*common, "--tower", str(folder), str(tmp_path / "a")])) == 0
    settings = load_vlm(tmp_path / "a")[2]
    assert (settings.crop_size, settings.resize_mode) == (42, "squash")
    assert cli.main(["build", *common, "--tower", str(pickle_only), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "--allow-pickle" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    argv = [*common, "--tower", str(pickle_only), "--allow-pickle", str(tmp_path / "b")]
    assert build_command.run(parser.parse_args(argv)) == 0


@pytest.mark.parametrize("family", ["siglip", "clip-vitL", "mlcd-rope2d"])
def test_tower_folder_without_preset_gets_its_own_processor_settings(family, family_towers):
    """A tower given only as a folder: crop, resize mode and statistics come from its preprocessor_config.json."""
    from transformers import AutoConfig

    from mlcd_vl.model.build import tower_processor_settings

    folder, preset = family_towers[family]
    config = AutoConfig.from_pretrained(folder)
    assert tower_processor_settings(str(folder), config) == pixels.ProcessorSettings.of_tower(preset)
