"""OpenCLIP towers (DFN5B's format) converted to transformers' CLIPVisionModel (mlcd_vl.model.openclip).

A tiny random OpenCLIP ViT with QuickGELU and DFN5B's "squash" preprocessing is the reference: OpenCLIP's own
preprocessing and forward against our pixel path and the converted CLIPVisionModel, to 1e-5, for every block's
hidden states (the LLaVA features are layer -2 without CLS) and the pooled, projected image embedding. Then the
cache, the pickle policy, refused architectures and the `mlcd-vl build` path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from tiny_open_clip import TINY_CONFIG, write_tiny_open_clip
from transformers import CLIPVisionModel

from mlcd_vl.model import openclip, pixels, tiny
from mlcd_vl.model.build import resolve_tower_path, tower_processor_settings

TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLCD_VL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_open_clip(tmp_path_factory.mktemp("open-clip") / "tiny-dfn")


@pytest.fixture(scope="module")
def pickle_checkpoint(tmp_path_factory):
    return write_tiny_open_clip(tmp_path_factory.mktemp("open-clip-pickle") / "tiny-dfn", pickle=True)


def _images():
    rng = np.random.default_rng(0)
    sizes = [(42, 42), (97, 31), (20, 160), (333, 250)]
    return [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes]


def test_converted_tower_matches_open_clip_features(checkpoint):
    reference, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{checkpoint}")
    reference.eval()
    folder = openclip.converted_tower(openclip.locate(str(checkpoint)))
    tower = CLIPVisionModel.from_pretrained(folder).eval()
    assert tower.config.hidden_act == "quick_gelu" and tower.config.image_size == 42
    assert (tower.config.num_hidden_layers, tower.config.num_attention_heads) == (3, 2)
    settings = tower_processor_settings(str(folder), tower.config)
    assert settings.resize_mode == "squash" and settings.crop_size == 42
    assert settings.mean == pixels.OPENAI_CLIP_MEAN and settings.std == pixels.OPENAI_CLIP_STD
    for image in _images():
        theirs_pixels = preprocess(image).unsqueeze(0)
        ours_pixels = pixels.process_image(image, settings, pixels.ImageModeSettings("square", "flat")).unsqueeze(0)
        # OpenCLIP divides by 255 in float32, transformers multiplies by 1/255 in float64: at most an ulp apart
        assert (ours_pixels - theirs_pixels).abs().max() <= 1e-6, image.size
        with torch.no_grad():
            ours = tower(ours_pixels, output_hidden_states=True)
            visual = reference.visual
            embeds = visual._embeds(theirs_pixels)
            blocks = visual.forward_intermediates(theirs_pixels, output_fmt="NLC", output_extra_tokens=True,
                                                  intermediates_only=True)
            theirs_hidden = [embeds] + [torch.cat([prefix, patches], dim=1) for prefix, patches in
                                        zip(blocks["image_intermediates_prefix"], blocks["image_intermediates"])]
            theirs_embedding = reference.encode_image(theirs_pixels)
        assert len(ours.hidden_states) == len(theirs_hidden) == 4
        for index, (a, b) in enumerate(zip(ours.hidden_states, theirs_hidden)):
            assert (a - b).abs().max() <= TOLERANCE, (image.size, index, (a - b).abs().max())
        llava_features = ours.hidden_states[-2][:, 1:]
        assert (llava_features - blocks["image_intermediates"][-2]).abs().max() <= TOLERANCE
        # the projection is not part of the tower; the pooled CLS through OpenCLIP's projection gives its embedding
        projected = ours.pooler_output @ reference.visual.proj
        assert (projected - theirs_embedding).abs().max() <= TOLERANCE


def test_conversion_is_cached_and_redone_when_the_weights_change(checkpoint, tmp_path):
    source_folder = tmp_path / "source"
    shutil.copytree(checkpoint, source_folder)
    first = openclip.converted_tower(openclip.locate(str(source_folder)))
    stamp = json.loads((first / openclip.STAMP_NAME).read_text())
    written = (first / "model.safetensors").stat().st_mtime_ns
    assert openclip.converted_tower(openclip.locate(str(source_folder))) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == written  # reused, not converted again
    write_tiny_open_clip(source_folder, seed=1)  # new weights in the same place
    again = openclip.converted_tower(openclip.locate(str(source_folder)))
    assert again == first
    assert json.loads((again / openclip.STAMP_NAME).read_text())["sha256"] != stamp["sha256"]
    changed = CLIPVisionModel.from_pretrained(again).pre_layrnorm.weight
    original = CLIPVisionModel.from_pretrained(openclip.converted_tower(openclip.locate(str(checkpoint))))
    assert not torch.equal(changed, original.pre_layrnorm.weight)
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no scratch folders left behind


def test_pickle_weights_need_allow_pickle(checkpoint, pickle_checkpoint):
    with pytest.raises(openclip.OpenCLIPError, match="--allow-pickle"):
        openclip.locate(str(pickle_checkpoint))
    source = openclip.OpenCLIPSource("tiny", pickle_checkpoint / openclip.CONFIG_NAME,
                                     pickle_checkpoint / openclip.PICKLE_WEIGHTS_NAME)
    with pytest.raises(openclip.OpenCLIPError, match="--allow-pickle"):
        openclip.converted_tower(source)
    from_pickle = openclip.converted_tower(openclip.locate(str(pickle_checkpoint), allow_pickle=True),
                                           allow_pickle=True)
    assert sorted(p.name for p in from_pickle.iterdir() if p.suffix in (".bin", ".pt")) == []
    from_safetensors = openclip.converted_tower(openclip.locate(str(checkpoint)))
    a = CLIPVisionModel.from_pretrained(from_pickle).state_dict()
    b = CLIPVisionModel.from_pretrained(from_safetensors).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hub_repo_with_only_pickle_weights(pickle_checkpoint, monkeypatch):
    """The DFN5B hub layout (config + pickle only), served from a folder: refused without the flag, then converted."""
    def fake_hub_file(repo_id, filename):
        assert repo_id == "apple/DFN5B-CLIP-ViT-H-14-378"
        path = pickle_checkpoint / filename
        return path if path.is_file() else None

    monkeypatch.setattr(openclip, "_hub_file", fake_hub_file)
    with pytest.raises(openclip.OpenCLIPError, match="only pickle weights; pass --allow-pickle"):
        openclip.locate("apple/DFN5B-CLIP-ViT-H-14-378")
    source = openclip.locate("apple/DFN5B-CLIP-ViT-H-14-378", allow_pickle=True)
    assert source.weights_file.name == openclip.PICKLE_WEIGHTS_NAME
    folder = openclip.converted_tower(source, allow_pickle=True)
    assert folder.name.startswith("apple--DFN5B-CLIP-ViT-H-14-378-")
    assert json.loads((folder / openclip.STAMP_NAME).read_text())["source"] == "apple/DFN5B-CLIP-ViT-H-14-378"


@pytest.mark.parametrize("change, message", [
    ({"vision_cfg": {**TINY_CONFIG["vision_cfg"], "ls_init_value": 0.1}}, "ls_init_value"),
    ({"vision_cfg": {**TINY_CONFIG["vision_cfg"], "attentional_pool": True}}, "attentional_pool"),
    ({"vision_cfg": {**TINY_CONFIG["vision_cfg"], "timm_model_name": "vit_base_patch16_224"}}, "timm_model_name"),
    ({"vision_cfg": {**TINY_CONFIG["vision_cfg"], "layers": [3, 4, 6, 3]}}, "ResNet"),
])
def test_unsupported_architectures_are_named(change, message):
    with pytest.raises(openclip.OpenCLIPError, match=message):
        openclip.vision_config_from_open_clip({"model_cfg": {**TINY_CONFIG, **change}}, "cfg.json")


def test_unsupported_preprocessing_and_broken_weights_are_named(checkpoint, tmp_path):
    with pytest.raises(openclip.OpenCLIPError, match="interpolation 'bilinear'"):
        openclip.image_processor_from_open_clip({"preprocess_cfg": {"interpolation": "bilinear"}}, 42)
    with pytest.raises(openclip.OpenCLIPError, match="resize mode 'longest'"):
        openclip.image_processor_from_open_clip({"preprocess_cfg": {"resize_mode": "longest"}}, 42)
    from safetensors.torch import load_file, save_file

    state = load_file(str(checkpoint / openclip.SAFE_WEIGHTS_NAME))
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    save_file({k: v for k, v in state.items() if "resblocks.1.mlp.c_fc" not in k},
              str(broken / openclip.SAFE_WEIGHTS_NAME))
    with pytest.raises(openclip.OpenCLIPError, match="missing vision tensors for encoder.layers.1.mlp.fc1"):
        openclip.converted_tower(openclip.locate(str(broken)))
    save_file({**state, "visual.attn_pool.query": torch.zeros(2, 2)}, str(broken / openclip.SAFE_WEIGHTS_NAME))
    with pytest.raises(openclip.OpenCLIPError, match="visual.attn_pool.query"):
        openclip.converted_tower(openclip.locate(str(broken)))
    (broken / openclip.SAFE_WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(openclip.OpenCLIPError, match="corrupt or truncated"):
        openclip.converted_tower(openclip.locate(str(broken)))


def test_resolve_tower_path_converts_open_clip_folders_only(checkpoint, tmp_path):
    converted = Path(resolve_tower_path(str(checkpoint)))
    assert converted.parent == tmp_path / "cache" / "towers" and (converted / "config.json").is_file()
    hf_tower = tiny.write_tiny_tower(tmp_path / "hf-tower", "clip")
    assert resolve_tower_path(str(hf_tower)) == str(hf_tower)


def test_dfn5b_config_converts_to_the_preset():
    """OpenCLIP's own DFN5B ViT-H-14-378 config and preprocessing give the tower the dfn5b preset describes."""
    from mlcd_vl import presets
    from mlcd_vl.model.build import check_tower_fits_preset

    pretrained = open_clip.get_pretrained_cfg("ViT-H-14-378-quickgelu", "dfn5b")
    assert pretrained["hf_hub"].rstrip("/") == presets.TOWERS["dfn5b-vitH-378"].hub_id
    hub_config = {"model_cfg": open_clip.get_model_config("ViT-H-14-378-quickgelu"),
                  "preprocess_cfg": {key: pretrained[key] for key in ("mean", "std", "interpolation", "resize_mode")}}
    config = openclip.vision_config_from_open_clip(hub_config)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (32, 1280, 16)
    assert (config.intermediate_size, config.image_size, config.patch_size) == (5120, 378, 14)
    preset = presets.TOWERS["dfn5b-vitH-378"]
    check_tower_fits_preset(config, preset, "DFN5B")
    processor = openclip.image_processor_from_open_clip(hub_config, config.image_size)
    assert (processor.do_center_crop, processor.size["height"], processor.size["width"]) == (False, 378, 378)
    assert (tuple(processor.image_mean), tuple(processor.image_std)) == (preset.mean, preset.std)
