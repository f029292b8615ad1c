"""HF-native checkpoint folders: save and load a VLM with its tokenizer, chat template and processor.

A saved folder is plain transformers: `AutoModelForImageTextToText.from_pretrained(dir)` and
`AutoProcessor.from_pretrained(dir)` work without `trust_remote_code`. Our own settings (image mode, merge, pinpoints
in upstream's (width, height), template) ride along in config.json under `mlcd_vl`; when they are absent (a LLaVA
model from elsewhere) they are derived from the transformers config. Classes are chosen from config.json only.
Weights are safetensors; a corrupt or truncated file fails with the file named, and weights that do not fit the
model config.json describes (wrong shapes, missing tensors) fail with the offending keys listed; tensors the model
does not use are named in a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForImageTextToText, AutoTokenizer, PreTrainedModel,
                          PreTrainedTokenizerBase)

from mlcd_vl.errors import UsageError, UserError, first_line
from mlcd_vl.model import anyres
from mlcd_vl.model.build import SETTINGS_KEY, VLMSettings, model_type_for, prepare_tokenizer
from mlcd_vl.model.sources import model_source

SUPPORTED_MODEL_TYPES = ("llava", "llava_next", "llava_onevision")
log = logging.getLogger("mlcd_vl.checkpoint")


class CheckpointError(UsageError, ValueError):
    """A checkpoint folder that cannot be loaded; the message names the folder or file."""


def settings_from_config(config) -> VLMSettings:
    """Our settings from a composite config: the `mlcd_vl` block, else derived from transformers' fields."""
    stored = getattr(config, SETTINGS_KEY, None)
    if stored:
        return VLMSettings.from_dict(stored)
    vision = config.vision_config
    if config.model_type == "llava":
        mode, merge, pinpoints = "square", "flat", []
    elif config.model_type == "llava_next":
        mode, merge = "anyres", "spatial_unpad"
        pinpoints = anyres.swap_pinpoints([tuple(p) for p in config.image_grid_pinpoints])
    elif config.model_type == "llava_onevision":
        mode, merge = config.vision_aspect_ratio, "spatial_unpad"
        pinpoints = anyres.swap_pinpoints([tuple(p) for p in config.image_grid_pinpoints])
    else:
        raise CheckpointError(f"model type {config.model_type!r} is not a LLaVA composite")
    return VLMSettings(image_mode=mode, merge_type=merge, pinpoints=pinpoints, crop_size=vision.image_size,
                       patch_size=vision.patch_size)


def build_hf_processor(tokenizer: PreTrainedTokenizerBase, settings: VLMSettings, model_type: str,
                       select_strategy: str = "default"):
    """The transformers processor matching the model class, so `AutoProcessor.from_pretrained(dir)` works.

    transformers' processors resize with torchvision by default; pass `backend="pil"` to reproduce upstream's
    pixels exactly (our own pixel path always does).
    """
    crop = {"height": settings.crop_size, "width": settings.crop_size}
    # "squash" resizes every crop straight to SxS: transformers spells it as a height/width size without centre crop.
    squash = settings.resize_mode == "squash"
    size = dict(crop) if squash else {"shortest_edge": settings.crop_size}
    common = dict(size=size, crop_size=crop, image_mean=list(settings.image_mean), image_std=list(settings.image_std),
                  resample=3, do_convert_rgb=True, **({"do_center_crop": False} if squash else {}))
    extra_tokens = 1 if select_strategy == "default" else 0
    chat_template = tokenizer.chat_template
    if model_type == "llava":
        from transformers import LlavaImageProcessor, LlavaProcessor

        image_processor = LlavaImageProcessor(do_pad=settings.image_mode == "pad", **common)
        return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=settings.patch_size,
                              vision_feature_select_strategy=select_strategy, chat_template=chat_template,
                              image_token="<image>", num_additional_image_tokens=extra_tokens)
    pinpoints_hw = [list(p) for p in anyres.swap_pinpoints(settings.pinpoints)]
    if model_type == "llava_next":
        from transformers import LlavaNextImageProcessor, LlavaNextProcessor

        image_processor = LlavaNextImageProcessor(image_grid_pinpoints=pinpoints_hw, do_pad=True, **common)
        return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  patch_size=settings.patch_size, vision_feature_select_strategy=select_strategy,
                                  chat_template=chat_template, image_token="<image>",
                                  num_additional_image_tokens=extra_tokens)
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    image_processor = LlavaOnevisionImageProcessor(image_grid_pinpoints=pinpoints_hw, do_pad=True, **common)
    video_processor = LlavaOnevisionVideoProcessor(size=size, image_mean=list(settings.image_mean),
                                                   image_std=list(settings.image_std))
    unit = settings.crop_size // settings.patch_size
    # transformers' LLaVA processors count the CLS token in num_image_tokens: patches + 1.
    return LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   video_processor=video_processor, num_image_tokens=unit * unit + extra_tokens,
                                   vision_feature_select_strategy=select_strategy, chat_template=chat_template,
                                   image_token="<image>", vision_aspect_ratio=settings.image_mode)


def save_vlm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: VLMSettings,
             folder: str | Path, *, state_dict: dict | None = None, weights: bool = True) -> Path:
    """Write an HF-native folder: config (with `mlcd_vl` settings), safetensors, tokenizer, processor.

    `state_dict` replaces the model's own tensors. `weights=False` writes everything but the weights (a ZeRO-3
    model's are streamed into the folder afterwards by `train.zero.save_streamed`; `save_pretrained` would delete
    weight files written before it).
    """
    folder = Path(folder)
    expected = model_type_for(settings.image_mode, settings.merge_type)
    if model.config.model_type != expected:
        raise CheckpointError(f"settings {settings.image_mode}/{settings.merge_type} need a {expected} model, "
                              f"got {model.config.model_type}")
    setattr(model.config, SETTINGS_KEY, settings.to_dict())
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict if weights else {})
    tokenizer.padding_side = "left"  # batched generation pads on the left; training sets its own side
    processor = build_hf_processor(tokenizer, settings, expected, model.config.vision_feature_select_strategy)
    processor.save_pretrained(folder)
    return folder


def _check_config(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json (not a model folder)")


def _check_folder(folder: Path) -> None:
    _check_config(folder)
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key)
        except Exception as error:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{weights}: corrupt or truncated safetensors file ({error})") from error


MAX_LISTED_KEYS = 10  # per kind; a wrong config can mismatch hundreds of tensors and the first few tell the story


def _listed(lines: list[str]) -> list[str]:
    extra = len(lines) - MAX_LISTED_KEYS
    return lines[:MAX_LISTED_KEYS] + ([f"    ... and {extra} more"] if extra > 0 else [])


def describe_weight_mismatch(info: dict, kinds: tuple[str, ...] = ("missing_keys", "unexpected_keys")) -> str:
    """The problems in transformers' loading info (`output_loading_info=True`) as indented lines; "" when none.

    Shape mismatches always, then the key lists named in `kinds`. Keys are the model's parameter names; the file
    may store them under transformers' older names.
    """
    sections = []
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        lines = [f"    {key}: model expects {list(expected)}, file has {list(found)}"
                 for key, found, expected in mismatched]
        sections += [f"  {len(mismatched)} tensor(s) with the wrong shape:", *_listed(lines)]
    for kind, what in (("missing_keys", "missing from the file"), ("unexpected_keys", "not in the model")):
        keys = sorted(info.get(kind) or ()) if kind in kinds else []
        if keys:
            sections += [f"  {len(keys)} tensor(s) {what}:", *_listed([f"    {key}" for key in keys])]
    return "\n".join(sections)


def load_vlm(folder: str | Path, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
             attn_implementation: str | None = None,
             ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, VLMSettings]:
    """Load an HF-native folder (ours or any LLaVA / LLaVA-NeXT / OneVision one) or hub id with our settings."""
    folder = Path(model_source(folder))
    if folder.exists():
        _check_folder(folder)
    config = _read_config(folder)
    settings = check_model_type(folder, config)
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        # Mismatches are collected rather than raised so the error can name them; transformers alone only logs them
        # (and would silently keep random values for missing tensors).
        model, info = AutoModelForImageTextToText.from_pretrained(folder, ignore_mismatched_sizes=True,
                                                                  output_loading_info=True, **kwargs)
    except (OSError, RuntimeError) as error:
        raise CheckpointError(f"{folder}: cannot load weights ({error})") from error
    problems = describe_weight_mismatch(info, kinds=("missing_keys",))
    if problems:
        raise CheckpointError(f"{folder}: the weights do not fit the {config.model_type} model its config.json "
                              f"describes (shape mismatch or missing tensors):\n{problems}")
    extra = describe_weight_mismatch({"unexpected_keys": info.get("unexpected_keys")})
    if extra:  # unused tensors change nothing the model computes: worth a warning, not a refusal
        log.warning("%s: tensors the %s model does not use were ignored:\n%s", folder, config.model_type, extra)
    model.to(device).eval()
    return model, checkpoint_tokenizer(folder, model.config, settings), settings


def check_model_type(folder: str | Path, config) -> VLMSettings:
    """A folder's config is one of the LLaVA composites; returns its settings."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{folder}: model type {config.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}; "
                              "upstream LLaVA checkpoints need `mlcd-vl convert` first")
    return settings_from_config(config)


def checkpoint_tokenizer(folder: str | Path, config, settings: VLMSettings) -> PreTrainedTokenizerBase:
    """The folder's tokenizer with our template, its <image> id checked against the model config."""
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(folder), settings.template)
    if tokenizer.convert_tokens_to_ids("<image>") != config.image_token_id:
        raise CheckpointError(f"{folder}: tokenizer's <image> id differs from config image_token_id "
                              f"{config.image_token_id}")
    return tokenizer


def read_settings(folder: str | Path) -> VLMSettings:
    """Settings of a saved folder (or hub id) without loading weights."""
    folder = model_source(folder)
    if Path(folder).exists():
        _check_config(Path(folder))
    return settings_from_config(_read_config(folder))


def _read_config(folder: str | Path):
    """config.json of a folder or hub id; the hub's many-line failures (offline, not found) become one line."""
    try:
        return AutoConfig.from_pretrained(folder)
    except OSError as error:
        raise UserError(f"{folder}: cannot read config.json ({first_line(error)})") from error
