"""The recipe's VLM: where the LLM and the tower come from, the composite, its attention and the stage-1 projector
(or, with `model.checkpoint`, an HF-native VLM folder continued as it is).

`model.llm` / `model.tower` take a preset name, hub id or folder; `tiny` is the locally written tiny preset
(`model.tiny`, under `$MLCD_VL_TINY_DIR` or `<output_dir>/tiny-assets`). The attention implementation is the one
`TrainConfig.attention` decides (packed rows on plain SDPA run `sdpa_varlen`). Under ZeRO-3 with `model.sharded_init`
the model is built partitioned (`model.sharded`, given the filled DeepSpeed JSON): `fetch_sources` first, on the main
process before the others, then `build_model` on every rank at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mlcd_vl import presets
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


def fetch_sources(config: TrainConfig) -> None:
    """What a partitioned build reads, made ready on disk (run it on the main process first; the build itself runs on
    every rank at once): the tiny preset, a converted OpenCLIP tower, the safetensors files of a hub id."""
    from mlcd_vl.model.build import resolve_tower_path
    from mlcd_vl.model.sharded import weight_files

    if config.model.checkpoint:
        weight_files(config.model.checkpoint)
        return
    llm, tower = resolve_sources(config)
    weight_files(presets.resolve_llm(llm))
    weight_files(resolve_tower_path(tower, presets.tower_preset(tower), config.model.allow_pickle))


def llm_hidden_size(config: TrainConfig) -> int:
    """The LLM's hidden size from its config alone (DeepSpeed's bucket sizes depend on it)."""
    from transformers import AutoConfig

    if config.model.checkpoint:
        return AutoConfig.from_pretrained(config.model.checkpoint).text_config.hidden_size
    return AutoConfig.from_pretrained(presets.resolve_llm(resolve_sources(config)[0])).hidden_size


def build_model(config: TrainConfig, zero3_config: dict | None = None):
    """The composite for this stage, the stage-1 projector loaded when `model.init_from` is set; or, with
    `model.checkpoint`, that HF-native folder as it is (weights, tokenizer and image settings). With `zero3_config`
    (the filled DeepSpeed JSON) it is built partitioned under ZeRO-3; every rank must call it at once.

    Returns (model, tokenizer, settings, projector file read or None).
    """
    from mlcd_vl.model import sharded

    if config.model.checkpoint:
        from mlcd_vl.model.checkpoint import load_vlm

        model, tokenizer, settings = (load_vlm(config.model.checkpoint, dtype=torch.float32) if zero3_config is None
                                      else sharded.load_vlm_partitioned(config.model.checkpoint, zero3_config))
    else:
        llm, tower = resolve_sources(config)
        spec = VLMSpec(llm=llm, tower=tower, image_mode=config.model.image_mode, merge_type=config.model.merge_type,
                       pinpoints=config.model.pinpoints, template=config.model.template, dtype="float32",
                       seed=config.seed, allow_pickle=config.model.allow_pickle)
        model, tokenizer, settings = (build_vlm(spec) if zero3_config is None
                                      else sharded.build_vlm_partitioned(spec, zero3_config))
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
