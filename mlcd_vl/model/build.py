"""Compose a fresh VLM from an LLM and a vision tower (hub ids or local folders).

The composite is one of transformers' own LLaVA classes, chosen by the image settings (and only by them):

| image mode + merge          | class                                    |
|-----------------------------|------------------------------------------|
| square or pad, flat         | LlavaForConditionalGeneration (stage 1)  |
| anyres, spatial_unpad       | LlavaNextForConditionalGeneration        |
| anyres_max_N, spatial_unpad | LlavaOnevisionForConditionalGeneration   |

so a saved model loads with plain `AutoModelForImageTextToText`. The projector is a 2-layer GELU MLP
(vision hidden -> LLM hidden -> LLM hidden, with biases, PyTorch's default init as upstream), features come from
hidden layer -2 with CLS dropped, `image_newline` starts as randn(h)/sqrt(h) as upstream.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from transformers import (AddedToken, AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                          AutoTokenizer, CLIPVisionModel, PreTrainedModel, PreTrainedTokenizerBase,
                          SiglipVisionModel)
from transformers.initialization import no_init_weights

from mlcd_vl import presets
from mlcd_vl.model.templates import get_template
from mlcd_vl.vocab import IMAGE_PLACEHOLDER
from mlcd_vl.model import anyres
from mlcd_vl.model.gathered import full_shape, gathered
from mlcd_vl.model.pixels import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageModeSettings, ProcessorSettings

SETTINGS_KEY = "mlcd_vl"  # our block inside config.json; plain transformers ignores it


@dataclass
class VLMSettings:
    """Everything beyond the weights that decides how inputs are built; stored in config.json under `mlcd_vl`."""

    image_mode: str = "anyres"
    merge_type: str = "spatial_unpad"
    pinpoints: list[tuple[int, int]] = field(default_factory=list)  # (width, height)
    template: str = "qwen_1_5"
    crop_size: int = 336
    patch_size: int = 14
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    llm: str = ""  # where the LLM came from (provenance only)
    tower: str = ""
    resize_mode: str = "shortest_edge"  # or "squash" (SigLIP, DFN5B): see pixels.ProcessorSettings
    data_manifest: str = ""  # hash of the data manifest the weights were trained on (provenance only)

    def __post_init__(self) -> None:
        self.pinpoints = [tuple(p) for p in self.pinpoints]
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        anyres.validate_image_mode(self.image_mode, self.merge_type)

    @property
    def processor(self) -> ProcessorSettings:
        return ProcessorSettings(self.crop_size, self.patch_size, mean=self.image_mean, std=self.image_std,
                                 resize_mode=self.resize_mode)

    @property
    def mode(self) -> ImageModeSettings:
        return ImageModeSettings(self.image_mode, self.merge_type, list(self.pinpoints))

    def to_dict(self) -> dict:
        data = dict(self.__dict__)
        data["pinpoints"] = [list(p) for p in self.pinpoints]
        data["image_mean"], data["image_std"] = list(self.image_mean), list(self.image_std)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "VLMSettings":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def model_type_for(image_mode: str, merge_type: str) -> str:
    """The transformers model type that represents these image settings exactly."""
    anyres.validate_image_mode(image_mode, merge_type)
    if image_mode in ("square", "pad") and merge_type == "flat":
        return "llava"
    if image_mode == "anyres" and merge_type == "spatial_unpad":
        return "llava_next"
    if anyres.anyres_max_patches(image_mode) is not None and merge_type == "spatial_unpad":
        return "llava_onevision"
    raise ValueError(
        f"image mode {image_mode!r} with merge {merge_type!r} has no transformers class; use square/pad with flat, "
        "anyres or anyres_max_N with spatial_unpad")


def load_tokenizer(path: str, template: str = "qwen_1_5", **kwargs) -> PreTrainedTokenizerBase:
    """The LLM's tokenizer with `<image>` added as a special token (at id len(tokenizer), as upstream) and the
    template's chat template attached."""
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    return prepare_tokenizer(tokenizer, template)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, template: str) -> PreTrainedTokenizerBase:
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        # A special added token at id len(tokenizer), as upstream (151665 for Qwen2.5: no embedding resize).
        tokenizer.add_tokens([AddedToken(IMAGE_PLACEHOLDER, special=True, normalized=False)], special_tokens=True)
    tokenizer.chat_template = get_template(template).jinja()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tower_class(path: str):
    """(model class, its config) of a tower folder or hub id: a full CLIP/SigLIP model gives its vision part."""
    config = AutoConfig.from_pretrained(path)
    if config.model_type in ("clip", "clip_vision_model"):
        return CLIPVisionModel, CLIPVisionModel.config_class.from_pretrained(path)
    if config.model_type in ("siglip", "siglip_vision_model"):
        return SiglipVisionModel, SiglipVisionModel.config_class.from_pretrained(path)
    if config.model_type == "mlcd_vision_model":
        return AutoModel, config
    raise ValueError(f"{path}: unsupported vision tower type {config.model_type!r} (mlcd, clip or siglip expected)")


def load_tower_config(path: str):
    """The config of the tower `load_vision_tower` would build, without its weights."""
    return _tower_class(path)[1]


def load_vision_tower(path: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A vision tower from a folder or hub id, whatever its saved class (full CLIP/SigLIP models keep the tower)."""
    model_class, _ = _tower_class(path)
    return model_class.from_pretrained(path, dtype=dtype)


def tower_processor_settings(path: str, tower_config) -> ProcessorSettings:
    """The image settings in a tower's preprocessor_config.json (crop size, resize mode, mean/std), else defaults.

    A processor with a height/width size and no centre crop (SigLIP's, a converted OpenCLIP "squash" tower's)
    resizes straight to that size: resize mode "squash"."""
    from transformers import AutoImageProcessor

    patch_size = tower_config.patch_size
    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError):
        return ProcessorSettings(tower_config.image_size, patch_size)
    mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    size = getattr(processor, "size", None)
    if not getattr(processor, "do_center_crop", False) and getattr(size, "height", None):
        return ProcessorSettings(int(size.height), patch_size, mean=mean, std=std, resize_mode="squash")
    crop = getattr(processor, "crop_size", None)
    crop_size = crop["height"] if isinstance(crop, dict) else getattr(crop, "height", None) or tower_config.image_size
    return ProcessorSettings(int(crop_size), patch_size, mean=mean, std=std)


_TOWER_MODEL_TYPES = {"mlcd": "mlcd_vision_model", "clip": "clip_vision_model", "siglip": "siglip_vision_model"}


def check_tower_fits_preset(tower_config, preset: presets.TowerPreset, source: str) -> None:
    """The loaded tower is the architecture the preset describes (class, sizes, activation), else a named error."""
    wrong = [] if tower_config.model_type == _TOWER_MODEL_TYPES[preset.kind] else [
        f"model type {tower_config.model_type} != {_TOWER_MODEL_TYPES[preset.kind]}"]
    for field_name in ("image_size", "patch_size", "hidden_size", "hidden_act"):
        value, expected = getattr(tower_config, field_name, None), getattr(preset, field_name)
        if value != expected:
            wrong.append(f"{field_name} {value} != {expected}")
    if wrong:
        raise ValueError(f"vision tower {source!r} does not fit preset {preset.name!r}: {'; '.join(wrong)}")


def resolve_tower_path(tower: str, preset: presets.TowerPreset | None = None, allow_pickle: bool = False) -> str:
    """A folder or hub id transformers loads: OpenCLIP checkpoints (a local folder, or the hub repo of an
    `open_clip` preset) become a cached CLIPVisionModel folder, converted once (model/openclip.py)."""
    from mlcd_vl.model import openclip

    path = presets.resolve_tower(tower)
    from_hub = preset is not None and preset.source_format == "open_clip" and not os.path.isdir(path)
    if from_hub or openclip.is_open_clip_folder(path):
        source = openclip.locate(path, allow_pickle=allow_pickle)
        return str(openclip.converted_tower(source, allow_pickle=allow_pickle))
    return path


def _portable(config: dict) -> dict:
    """A sub-config without the local path it was loaded from (provenance lives in VLMSettings.llm / .tower)."""
    config.pop("_name_or_path", None)
    return config


def compose_config(text_config, vision_config, settings: VLMSettings, image_token_id: int,
                   select_strategy: str = "default", select_layer: int = -2):
    """The transformers config of the composite; `settings` is stored under `mlcd_vl`."""
    model_type = model_type_for(settings.image_mode, settings.merge_type)
    kwargs = dict(
        text_config=_portable(text_config.to_dict()),
        vision_config=_portable(vision_config.to_dict()),
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        vision_feature_layer=select_layer,
        vision_feature_select_strategy=select_strategy,
        tie_word_embeddings=getattr(text_config, "tie_word_embeddings", False),
    )
    kwargs[SETTINGS_KEY] = settings.to_dict()
    if model_type != "llava":
        kwargs["image_grid_pinpoints"] = [list(p) for p in anyres.swap_pinpoints(settings.pinpoints)]
    if model_type == "llava_onevision":
        kwargs["vision_aspect_ratio"] = settings.image_mode
    config_class = AutoConfig.for_model(model_type).__class__
    return config_class(**kwargs)


def init_projector_and_newline(model: PreTrainedModel, seed: int | None = None) -> None:
    """Upstream init: nn.Linear defaults for the projector, randn(h)/sqrt(h) for image_newline.

    The values are drawn on the CPU in float32 (fresh `nn.Linear`s reset in turn, then the newline), so they are the
    same whatever device, dtype or ZeRO-3 partitioning the model has; a partitioned model takes rank 0's draw."""
    generator_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    projector = model.model.multi_modal_projector
    values = {}
    for name in ("linear_1", "linear_2"):
        layer = getattr(projector, name)
        fresh = torch.nn.utils.skip_init(torch.nn.Linear, layer.in_features, layer.out_features,
                                         bias=layer.bias is not None)
        fresh.reset_parameters()
        values.update({layer.weight: fresh.weight, **({layer.bias: fresh.bias} if layer.bias is not None else {})})
    newline = getattr(model.model, "image_newline", None)
    if newline is not None:
        size = full_shape(newline)[0]
        values[newline] = torch.randn(size, dtype=torch.float32) / math.sqrt(size)
    if seed is not None:
        torch.random.set_rng_state(generator_state)
    with gathered(list(values), modifier_rank=0), torch.no_grad():
        for param, value in values.items():
            param.copy_(value)


@dataclass
class VLMSpec:
    """What to build: LLM and tower (preset name, hub id or folder) and the image settings."""

    llm: str = presets.DEFAULT_LLM
    tower: str = presets.DEFAULT_TOWER
    image_mode: str = "anyres"
    merge_type: str = "spatial_unpad"
    pinpoints: list | str | None = None  # default: the tower preset's upstream grid
    template: str = "qwen_1_5"
    dtype: str = "float32"
    seed: int | None = 0
    tower_preset: presets.TowerPreset | None = None  # image settings for a tower given as a folder (e.g. shrunk)
    allow_pickle: bool = False  # an OpenCLIP tower with only pickle weights may be converted


def image_settings(spec: VLMSpec, tower_config, tower_path: str,
                   tower_preset: presets.TowerPreset | None) -> tuple[VLMSettings, str, int]:
    """(settings, feature select strategy, feature layer) of the composite: a preset's image settings (once the tower
    is checked to fit it), so a study changes only the tower; else the tower's own processor config.
    `mlcd-vl plan` sizes the composite from these too, on the meta device."""
    if tower_preset is not None:
        check_tower_fits_preset(tower_config, tower_preset, spec.tower)
        image = ProcessorSettings.of_tower(tower_preset)
        strategy, layer = tower_preset.select_strategy, tower_preset.select_layer
    else:
        image = tower_processor_settings(tower_path, tower_config)
        strategy, layer = ("full" if tower_config.model_type.startswith("siglip") else "default"), -2
    pinpoints = spec.pinpoints if spec.pinpoints is not None else (tower_preset.pinpoints if tower_preset else [])
    settings = VLMSettings(
        image_mode=spec.image_mode, merge_type=spec.merge_type,
        pinpoints=anyres.parse_pinpoints(pinpoints, image.crop_size) if anyres.is_anyres(spec.image_mode) else [],
        template=spec.template, crop_size=image.crop_size, patch_size=tower_config.patch_size,
        image_mean=image.mean, image_std=image.std, llm=spec.llm, tower=spec.tower, resize_mode=image.resize_mode)
    return settings, strategy, layer


# Where the parts' own tensors sit in the composite (both build paths use this map): the causal LM's `model.*` and
# `lm_head.*`, the tower's every key under `model.vision_tower.`. The rest is new: the projector and image_newline.
LLM_KEY_PREFIXES = (("model.", "model.language_model."), ("lm_head.", "lm_head."))
TOWER_KEY_PREFIX = "model.vision_tower."
NEW_KEY_PREFIXES = ("model.multi_modal_projector.", "model.image_newline")


def composite_key(part: str, key: str) -> str | None:
    """The composite's name for `key` of the LLM (`part="llm"`) or the tower (`"tower"`); None: not one of ours."""
    if part == "tower":
        return TOWER_KEY_PREFIX + key
    for prefix, target in LLM_KEY_PREFIXES:
        if key.startswith(prefix):
            return target + key[len(prefix):]
    return None


def check_composite_keys(missing: set[str] | list[str], unexpected: set[str] | list[str] = ()) -> None:
    """After loading the parts: every tensor but the new ones came from them, and nothing else was given."""
    left = sorted(key for key in missing if not key.startswith(NEW_KEY_PREFIXES))
    if left or unexpected:
        raise ValueError(f"the LLM and tower weights do not fill the composite: {len(left)} missing (e.g. "
                         f"{left[:3]}), {len(unexpected)} not in it (e.g. {sorted(unexpected)[:3]})")


@dataclass
class VLMPlan:
    """What a build composes before any weight is read: sources, tokenizer, image settings, the parts' configs."""

    llm_path: str
    tower_path: str
    tokenizer: PreTrainedTokenizerBase
    settings: VLMSettings
    llm_config: object
    tower_config: object
    select_strategy: str
    select_layer: int
    image_token_id: int
    resize_to: int | None  # the LLM's vocabulary grows to this when <image> is a new token

    def composite_config(self):
        """The composite's config, at the LLM's own vocabulary size (a resize follows the loading)."""
        return compose_config(self.llm_config, self.tower_config, self.settings, self.image_token_id,
                              select_strategy=self.select_strategy, select_layer=self.select_layer)


def plan_vlm(spec: VLMSpec) -> VLMPlan:
    """Resolve the sources and read the configs, tokenizer and image settings (no weights)."""
    tower_preset = spec.tower_preset or presets.tower_preset(spec.tower)
    llm_path = presets.resolve_llm(spec.llm)
    tower_path = resolve_tower_path(spec.tower, tower_preset, spec.allow_pickle)
    tokenizer = load_tokenizer(llm_path, spec.template)
    llm_config = AutoConfig.from_pretrained(llm_path)
    tower_config = load_tower_config(tower_path)
    settings, strategy, layer = image_settings(spec, tower_config, tower_path, tower_preset)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    resize_to = len(tokenizer) if image_token_id >= llm_config.vocab_size else None
    return VLMPlan(llm_path, tower_path, tokenizer, settings, llm_config, tower_config, strategy, layer,
                   image_token_id, resize_to)


def build_vlm(spec: VLMSpec) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, VLMSettings]:
    """A fresh composite with the LLM's and tower's pretrained weights, a new projector and image_newline.

    Every part is loaded whole in this process; under ZeRO-3, `model.sharded.build_vlm_partitioned` builds the same
    model partitioned."""
    dtype = getattr(torch, spec.dtype)
    plan = plan_vlm(spec)
    llm = AutoModelForCausalLM.from_pretrained(plan.llm_path, dtype=dtype)
    tower = load_vision_tower(plan.tower_path, dtype=dtype)
    with no_init_weights():
        model = AutoModelForImageTextToText.from_config(plan.composite_config(), dtype=dtype)
    state = {composite_key(part, key): tensor for part, module in (("llm", llm), ("tower", tower))
             for key, tensor in module.state_dict().items() if composite_key(part, key) is not None}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    check_composite_keys(missing, unexpected)
    if plan.resize_to is not None:  # on the composite, after it exists: the random draws come in one order in both
        model.resize_token_embeddings(plan.resize_to)  # builds (constructing the tower draws from the generator)
    init_projector_and_newline(model, spec.seed)
    if llm.generation_config is not None:
        model.generation_config = llm.generation_config
    model.tie_weights()
    del llm, tower, state
    return model, plan.tokenizer, plan.settings
