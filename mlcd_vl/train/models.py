"""The recipe's VLM: where the LLM and the tower come from, the composite, its attention and the stage-1 projector
(or, with `model.checkpoint`, an HF-native VLM folder continued as it is).

`model.llm` / `model.tower` take a preset name, hub id or folder; `tiny` is the locally written tiny preset
(`model.tiny`, under `$MLCD_VL_TINY_DIR` or `<output_dir>/tiny-assets`). The attention implementation is the one
`TrainConfig.attention` decides (packed rows on plain SDPA run `sdpa_varlen`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mlcd_vl.model.build import VLMSpec, build_vlm
from mlcd_vl.train import optim
from mlcd_vl.train.config import TrainConfig
from mlcd_vl.train.inputs import TINY

TINY_DIR_ENV = "MLCD_VL_TINY_DIR"  # where `tiny` assets are written (default: <output_dir>/tiny-assets)


def resolve_sources(config: TrainConfig, tiny_root: str | None = None) -> tuple[str, str]:
    """(llm, tower) paths or ids; `tiny` becomes the locally written tiny preset (reused when already there), under
    `$MLCD_VL_TINY_DIR`, else `tiny_root`, else `<output_dir>/tiny-assets`."""
    llm, tower = config.model.llm, config.model.tower
    if TINY in (llm, tower):
        from mlcd_vl.model.tiny import write_tiny_assets

        root = os.environ.get(TINY_DIR_ENV) or tiny_root or str(Path(config.output_dir) / "tiny-assets")
        paths = write_tiny_assets(root)
        llm = str(paths["llm"]) if llm == TINY else llm
        tower = str(paths["tower"]) if tower == TINY else tower
    return llm, tower


def build_model(config: TrainConfig):
    """The composite for this stage, the stage-1 projector loaded when `model.init_from` is set; or, with
    `model.checkpoint`, that HF-native folder as it is (weights, tokenizer and image settings).

    Returns (model, tokenizer, settings, projector file read or None).
    """
    if config.model.checkpoint:
        from mlcd_vl.model.checkpoint import load_vlm

        model, tokenizer, settings = load_vlm(config.model.checkpoint, dtype=torch.float32)
    else:
        llm, tower = resolve_sources(config)
        spec = VLMSpec(llm=llm, tower=tower, image_mode=config.model.image_mode, merge_type=config.model.merge_type,
                       pinpoints=config.model.pinpoints, template=config.model.template, dtype="float32",
                       seed=config.seed, allow_pickle=config.model.allow_pickle)
        model, tokenizer, settings = build_vlm(spec)
        settings.llm, settings.tower = config.model.llm, config.model.tower  # provenance as the recipe names them
    model.set_attn_implementation(config.attention)
    origin = None
    if config.model.init_from:
        origin = optim.load_projector(model, config.model.init_from, allow_pickle=config.model.allow_pickle)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer, settings, origin


def tokens_per_crop(model) -> int:
    """Tokens one crop puts through the vision tower (patches + CLS), for the FLOPs estimate."""
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + 1
