"""Helpers for tests against the upstream parity vectors: everything is read from manifest.json, nothing hard-coded.

A sample is rebuilt from the stored upstream ids (-200 placeholders) and our own pixels; `run_sample` returns our
logits, inputs_embeds and per-crop features so the tests can compare them with the stored tensors or sketches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mlcd_vl.model import multimodal, pixels
from mlcd_vl.model.build import VLMSettings

UPSTREAM_IMAGE_INDEX = -200
IGNORE_INDEX = -100


def select_best_resolution(original_size, possible_resolutions):
    """Upstream's `mm_utils.select_best_resolution`, written out again (independent of `model.anyres`)."""
    original_width, original_height = original_size
    best_fit, max_effective, min_wasted = None, 0, float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (width, height)
    return best_fit


def stage2_models(manifest: dict) -> list[str]:
    return [name for name, model in manifest["models"].items() if str(model.get("kind", "")).startswith("stage2")]


def stage1_models(manifest: dict) -> list[str]:
    return [name for name, model in manifest["models"].items() if str(model.get("kind", "")).startswith("stage1")]


def base_llm_name(manifest: dict, model_name: str, vectors_dir: Path | None = None) -> str:
    """The base LLM the stage-1 artefact was trained from: its `--model_name_or_path` training argument, else the
    `_name_or_path` of its config.json."""
    argv = str(manifest.get("training_argv", {}).get(model_name, "")).split()
    if "--model_name_or_path" in argv:
        return argv[argv.index("--model_name_or_path") + 1]
    assert vectors_dir is not None, f"no base LLM recorded for {model_name}"
    return upstream_config(vectors_dir, manifest, model_name)["_name_or_path"]


def upstream_config(vectors_dir: Path, manifest: dict, model_name: str) -> dict:
    return json.loads((vectors_dir / manifest["models"][model_name]["path"] / "config.json").read_text())


def tower_folder(vectors_dir: Path, manifest: dict, model_name: str) -> Path:
    """The tower folder named by the model's config (resolved against the vectors folder, as upstream did)."""
    return vectors_dir / upstream_config(vectors_dir, manifest, model_name)["mm_vision_tower"]


def load_vectors(vectors_dir: Path, manifest: dict, model_name: str) -> dict[str, torch.Tensor]:
    return load_file(str(vectors_dir / manifest["models"][model_name]["tensor_file"]))


def sha256_f32(tensor: torch.Tensor) -> str:
    return hashlib.sha256(np.ascontiguousarray(tensor.numpy(), dtype="<f4").tobytes()).hexdigest()


def sample_images(vectors_dir: Path, sample: dict, settings: VLMSettings) -> list[multimodal.ImageInput]:
    """The sample's images as our model inputs: multi-image samples use 'pad' (as upstream's dataset), a single
    image uses the checkpoint's mode, a text-only sample gets none."""
    names = sample["images"]
    mode = "pad" if len(names) > 1 or sample.get("dataset_image_mode") == "pad" else settings.image_mode
    mode_settings = pixels.ImageModeSettings(mode, settings.merge_type,
                                             list(settings.pinpoints) if mode == settings.image_mode else [])
    images = []
    for name in names:
        image = pixels.load_rgb(vectors_dir / "images" / name, upstream_convert=True)
        images.append(multimodal.ImageInput(pixels.process_image(image, settings.processor, mode_settings),
                                            image.size, mode))
    return images


def expand_ids(upstream_ids: torch.Tensor, images: list[multimodal.ImageInput], settings: VLMSettings,
               image_token_id: int) -> torch.Tensor:
    """Upstream ids with each -200 replaced by as many image tokens as that image's block has."""
    positions = (upstream_ids == UPSTREAM_IMAGE_INDEX).nonzero().flatten().tolist()
    assert len(positions) == len(images), f"{len(positions)} placeholders for {len(images)} images"
    pieces, start = [], 0
    for position, image in zip(positions, images):
        pieces.append(upstream_ids[start:position])
        pieces.append(torch.full((multimodal.expected_tokens(image, settings),), image_token_id,
                                 dtype=upstream_ids.dtype))
        start = position + 1
    pieces.append(upstream_ids[start:])
    return torch.cat(pieces)


@dataclass
class SampleOutput:
    input_ids: torch.Tensor  # [L]
    inputs_embeds: torch.Tensor  # [L, D]
    logits: torch.Tensor  # [L, V]
    vision_features: torch.Tensor | None  # [crops, T, Dv]
    projected_features: torch.Tensor | None  # [crops, T, D]


@torch.no_grad()
def run_sample(model, settings: VLMSettings, upstream_ids: torch.Tensor,
               images: list[multimodal.ImageInput]) -> SampleOutput:
    ids = expand_ids(upstream_ids, images, settings, model.config.image_token_id)
    embeds = multimodal.embed_inputs(model, settings, ids[None], images)[0]
    logits = model(inputs_embeds=embeds[None], attention_mask=torch.ones_like(ids)[None]).logits[0]
    vision = projected = None
    if images:
        crops = torch.cat([image.crops for image in images])
        vision = multimodal.vision_tower_features(model, crops)
        projected = model.model.multi_modal_projector(vision)
    return SampleOutput(ids, embeds, logits, vision, projected)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF's loss: mean cross-entropy of position t predicting label t+1, over labels != -100."""
    return F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE_INDEX)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def compare_float(vectors: dict, key: str, ours: torch.Tensor, columns: torch.Tensor, atol: float,
                  diffs: dict) -> None:
    """Compare with the full stored tensor and/or its `_cols` sketch, whichever is present (at least one must be)."""
    found = False
    if key in vectors:
        diffs[key] = max_diff(ours, vectors[key])
        found = True
    if f"{key}_cols" in vectors:
        diffs[f"{key}_cols"] = max_diff(ours[..., columns], vectors[f"{key}_cols"])
        found = True
    assert found, f"neither {key} nor {key}_cols is stored"
    bad = {k: v for k, v in diffs.items() if k.startswith(key) and v > atol}
    assert not bad, f"max abs diff above {atol}: {bad}"


# --------------------------------------------------------------------------------------------------------------------
# Converted checkpoints, shared by the test modules of one session
# --------------------------------------------------------------------------------------------------------------------

_CONVERTED: dict[tuple[str, str], Path] = {}
_LOADED: dict[str, tuple] = {}


def quiet(message: str) -> None:
    """A convert() logger that drops progress messages."""


def converted(tmp_root: Path, vectors_dir: Path, manifest: dict, name: str) -> Path:
    """The HF-native conversion of one manifest model (cached for the session). The tower resolves relative to the
    vectors folder (SRC's parent); stage-1 artefacts get the base LLM of their training arguments."""
    from mlcd_vl.model.convert import convert

    key = (str(vectors_dir), name)
    if key not in _CONVERTED:
        info = manifest["models"][name]
        dst = tmp_root / f"hf_{name}"
        kwargs = {}
        if str(info.get("kind", "")).startswith("stage1"):
            kwargs = dict(allow_pickle=True, base_llm=str(vectors_dir / base_llm_name(manifest, name, vectors_dir)))
        convert(vectors_dir / info["path"], dst, log=quiet, **kwargs)
        _CONVERTED[key] = dst
    return _CONVERTED[key]


def loaded(folder: Path):
    """(model, tokenizer, settings) of a converted folder, float32 eval mode (cached; do not modify)."""
    from mlcd_vl.model.checkpoint import load_vlm

    if str(folder) not in _LOADED:
        _LOADED[str(folder)] = load_vlm(folder, dtype=torch.float32)
    return _LOADED[str(folder)]
