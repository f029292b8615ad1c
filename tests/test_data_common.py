"""Helpers for the data tests (this module holds no tests): tiny tokenizer and settings, synthetic images, records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mlcd_vl.model.build import VLMSettings, VLMSpec, build_vlm, load_tokenizer
from mlcd_vl.model.tiny import TinyShapes, write_tiny_assets

CROP = TinyShapes().image_size  # 56 px crops of 4x4 patches
PATCH = TinyShapes().patch_size


def five_pinpoints(size: int = CROP) -> list[tuple[int, int]]:
    """Upstream's 5-pinpoint grid shape (no 1x1), at the tiny crop size."""
    return [(size, 2 * size), (2 * size, size), (2 * size, 2 * size), (3 * size, size), (size, 3 * size)]


def grid_pinpoints(n: int = 3, size: int = CROP) -> list[tuple[int, int]]:
    return [(i * size, j * size) for i in range(1, n + 1) for j in range(1, n + 1)]


def tiny_settings(image_mode: str = "anyres", template: str = "qwen_1_5", merge_type: str | None = None,
                  pinpoints: list | None = None) -> VLMSettings:
    merge = merge_type or ("flat" if image_mode in ("square", "pad") else "spatial_unpad")
    if pinpoints is None:
        pinpoints = grid_pinpoints() if image_mode.startswith("anyres_max") else five_pinpoints()
    return VLMSettings(image_mode=image_mode, merge_type=merge, pinpoints=pinpoints, template=template,
                       crop_size=CROP, patch_size=PATCH)


def tiny_tokenizer(root: Path, template: str = "qwen_1_5"):
    return load_tokenizer(str(write_tiny_assets(root)["llm"]), template)


def tiny_vlm(root: Path, image_mode: str = "anyres", attn: str = "sdpa"):
    """A float32 tiny composite built with build_vlm, in eval mode: (model, tokenizer, settings)."""
    paths = write_tiny_assets(root)
    settings = tiny_settings(image_mode)
    model, tokenizer, settings = build_vlm(VLMSpec(
        llm=str(paths["llm"]), tower=str(paths["tower"]), image_mode=settings.image_mode,
        merge_type=settings.merge_type, pinpoints=settings.pinpoints if settings.pinpoints else None))
    model.set_attn_implementation(attn)
    return model.eval(), tokenizer, settings


def write_image(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    Image.fromarray(array, "RGBA").convert(mode).save(path)
    return path


def record(record_id: str, *turns: str, image=None) -> dict:
    """A LLaVA record; turns alternate human, gpt."""
    data = {"id": record_id, "conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": text}
                                               for i, text in enumerate(turns)]}
    if image is not None:
        data["image"] = image
    return data


def supervised_runs(sample, tokenizer) -> list[str]:
    """Decoded text of each contiguous run of supervised labels."""
    labels = sample.labels.tolist()
    runs, current = [], []
    for label in labels + [-100]:
        if label != -100:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def collapsed_text(sample, tokenizer) -> str:
    """The sample's text with each image block shown as one `<image>`."""
    ids = sample.input_ids.tolist()
    parts, cursor = [], 0
    for start, count in sample.image_spans:
        parts.append(tokenizer.decode(ids[cursor:start]) + "<image>")
        cursor = start + count
    return "".join(parts) + tokenizer.decode(ids[cursor:])
