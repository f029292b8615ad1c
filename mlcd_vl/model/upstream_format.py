"""The upstream LLaVA checkpoint format: config fields, weight names, pickled projectors and tokenizer files.

Everything here describes the files upstream's `train.py` writes; `convert.py` uses it to move checkpoints in either
direction. Pickled `.bin` files are read only with `allow_pickle=True`, and then with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from mlcd_vl.errors import UsageError

UPSTREAM_BLOCK_KEY = "mlcd_vl_upstream"  # upstream's LLaVA config fields, kept for the way back
UPSTREAM_VOCAB_KEY = "_upstream_vocab_size"  # set when conversion had to add an embedding row for <image>
UPSTREAM_ARCHITECTURE = "LlavaQwenForCausalLM"
HF_MODEL_TYPES = ("llava", "llava_next", "llava_onevision")
PROJECTOR_FILE = "mm_projector.bin"
UPSTREAM_TOWER_PREFIX = "model.vision_tower.vision_tower."
UPSTREAM_PROJECTOR = {"model.mm_projector.0.": "model.multi_modal_projector.linear_1.",
                      "model.mm_projector.2.": "model.multi_modal_projector.linear_2."}
# The Qwen2 fields of an upstream (transformers 4.44) config.json, in the order upstream writes them.
UPSTREAM_QWEN_FIELDS = ("attention_dropout", "bos_token_id", "eos_token_id", "hidden_act", "hidden_size",
                        "initializer_range", "intermediate_size", "max_position_embeddings", "max_window_layers",
                        "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "rms_norm_eps",
                        "rope_scaling", "rope_theta", "sliding_window", "tie_word_embeddings", "torch_dtype",
                        "use_cache", "use_sliding_window", "vocab_size")
# What upstream train() writes beyond the image settings, for models that never were upstream.
UPSTREAM_DEFAULTS = {
    "vision_tower_pretrained": None, "use_mm_proj": True, "mm_projector_type": "mlp2x_gelu",
    "image_crop_resolution": None, "image_split_resolution": None, "tokenizer_padding_side": "right",
    "mm_newline_position": "grid", "mm_resampler_type": None, "mm_spatial_pool_stride": None,
    "mm_spatial_pool_mode": "bilinear", "use_pos_skipping": False, "pos_skipping_range": 4096,
    "add_faster_video": False, "faster_token_stride": 10, "add_time_instruction": False, "force_sample": False,
    "mm_projector_lr": None, "mm_vision_tower_lr": None, "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
}
SELECT_FEATURE_TO_STRATEGY = {"patch": "default", "cls_patch": "full"}
Log = Callable[[str], None]


class ConvertError(UsageError, ValueError):
    """A checkpoint that cannot be converted; the message names the file, key or setting."""


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConvertError(f"{path}: not found") from None
    except json.JSONDecodeError as error:
        raise ConvertError(f"{path}: not valid JSON ({error})") from error


def detect_format(src: str | Path) -> str:
    """'upstream' (LlavaQwen stage 2), 'stage1' (config + mm_projector.bin) or 'hf' (LLaVA composite)."""
    src = Path(src)
    config = read_json(src / "config.json")
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    if model_type in HF_MODEL_TYPES:
        return "hf"
    if UPSTREAM_ARCHITECTURE in architectures or model_type == "llava_qwen":
        return "upstream"
    if "mm_vision_tower" in config and (src / PROJECTOR_FILE).is_file():
        return "stage1"
    if any(a.startswith("Llava") for a in architectures):
        raise ConvertError(f"{src / 'config.json'}: architecture {architectures} is not supported; only "
                           f"{UPSTREAM_ARCHITECTURE} (Qwen2 LLM) checkpoints convert")
    raise ConvertError(f"{src / 'config.json'}: neither an upstream LLaVA checkpoint ({UPSTREAM_ARCHITECTURE}), "
                       f"a stage-1 artifact (mm_* keys + {PROJECTOR_FILE}) nor an HF-native LLaVA folder "
                       f"(model_type {model_type!r})")


def load_pickle(path: Path, allow_pickle: bool) -> dict:
    """A pickled tensor dict, only with explicit permission and then with `weights_only=True`."""
    import torch

    if not allow_pickle:
        raise ConvertError(f"{path} is a pickle file, and unpickling can run arbitrary code. If you trust it, pass "
                           "--allow-pickle (allow_pickle=True); it is then read with torch.load(weights_only=True)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError ...
        raise ConvertError(f"{path}: cannot read ({error})") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvertError(f"{path}: expected a dict of tensors")
    return state


def read_state_dict(folder: Path, allow_pickle: bool) -> dict:
    """All tensors of an upstream checkpoint folder: model.safetensors, sharded safetensors or pickled .bin."""
    from safetensors.torch import load_file

    def safetensors(path: Path) -> dict:
        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types for bad headers
            raise ConvertError(f"{path}: cannot read safetensors ({error})") from error

    if (folder / "model.safetensors").is_file():
        return safetensors(folder / "model.safetensors")
    for index_name, reader in (("model.safetensors.index.json", safetensors),
                               ("pytorch_model.bin.index.json", lambda p: load_pickle(p, allow_pickle))):
        index = folder / index_name
        if index.is_file():
            state = {}
            for shard in sorted(set(read_json(index).get("weight_map", {}).values())):
                state.update(reader(folder / shard))
            return state
    if (folder / "pytorch_model.bin").is_file():
        return load_pickle(folder / "pytorch_model.bin", allow_pickle)
    raise ConvertError(f"{folder}: no model.safetensors, sharded safetensors or pytorch_model.bin")


def _qwen_keys() -> set[str]:
    from transformers import Qwen2Config

    keys = set(Qwen2Config().to_dict()) | {"rope_theta", "rope_scaling", "torch_dtype"}
    return keys - {"architectures", "_name_or_path", "transformers_version", "model_type"}


def split_upstream_config(config: dict) -> tuple[dict, dict]:
    """(Qwen2 fields, LLaVA fields) of an upstream config.json."""
    qwen_keys = _qwen_keys()
    text = {k: v for k, v in config.items() if k in qwen_keys}
    skip = {"architectures", "model_type", "transformers_version"}
    llava = {k: v for k, v in config.items() if k not in qwen_keys and k not in skip}
    return text, llava


def text_config_from_upstream(text_fields: dict):
    from transformers import Qwen2Config

    fields = dict(text_fields)
    if "torch_dtype" in fields:  # the transformers 4.x spelling
        fields.setdefault("dtype", fields.pop("torch_dtype"))
    if fields.get("rope_scaling", 0) is None:  # upstream forces None (plain RoPE); transformers 5 deprecates the key
        fields.pop("rope_scaling")
    config = Qwen2Config.from_dict(fields)
    config.architectures = ["Qwen2ForCausalLM"]
    return config


def settings_from_upstream(config: dict, config_path: Path, tower_name: str, tower_config, crop_size: int,
                           mean, std, template: str, llm: str):
    """Our VLMSettings plus (select strategy, select layer) from an upstream config."""
    from mlcd_vl.model import anyres
    from mlcd_vl.model.build import VLMSettings, model_type_for

    projector = config.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise ConvertError(f"{config_path}: mm_projector_type {projector!r} is not supported (mlp2x_gelu only)")
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_FEATURE_TO_STRATEGY:
        raise ConvertError(f"{config_path}: mm_vision_select_feature {feature!r} is not supported "
                           f"({', '.join(SELECT_FEATURE_TO_STRATEGY)})")
    image_mode = config.get("image_aspect_ratio") or "square"
    merge_type = config.get("mm_patch_merge_type") or "flat"
    try:
        model_type_for(image_mode, merge_type)
        pinpoints = (anyres.parse_pinpoints(config.get("image_grid_pinpoints"), crop_size)
                     if anyres.is_anyres(image_mode) else [])
        settings = VLMSettings(image_mode=image_mode, merge_type=merge_type, pinpoints=pinpoints, template=template,
                               crop_size=crop_size, patch_size=tower_config.patch_size, image_mean=mean,
                               image_std=std, llm=llm, tower=tower_name)
    except ValueError as error:
        raise ConvertError(f"{config_path}: {error}") from error
    if anyres.is_anyres(image_mode) and not pinpoints:
        raise ConvertError(f"{config_path}: image_aspect_ratio {image_mode!r} needs image_grid_pinpoints")
    return settings, SELECT_FEATURE_TO_STRATEGY[feature], int(config.get("mm_vision_select_layer", -2))


def upstream_config_from_hf(config, settings, dtype_name: str, stage1: bool = False) -> dict:
    """An upstream config.json for a composite: Qwen2 fields, the mm_* keys upstream train() writes, pinpoints
    (width, height); fields kept from an upstream original (`mlcd_vl_upstream`) are restored."""
    import transformers

    from mlcd_vl import presets
    from mlcd_vl.model import anyres

    text = config.text_config
    stored = dict(getattr(config, UPSTREAM_BLOCK_KEY, None) or {})
    original_vocab = stored.pop(UPSTREAM_VOCAB_KEY, None)
    out: dict = {"_name_or_path": stored.pop("_name_or_path", presets.resolve_llm(settings.llm or ""))}
    out["architectures"] = ["Qwen2ForCausalLM"] if stage1 else [UPSTREAM_ARCHITECTURE]
    rope = dict(getattr(text, "rope_parameters", None) or {})
    values = {name: getattr(text, name, None) for name in UPSTREAM_QWEN_FIELDS if name != "torch_dtype"}
    values["rope_theta"] = rope.pop("rope_theta", getattr(text, "rope_theta", None))
    values["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    values["torch_dtype"] = dtype_name
    if original_vocab is not None:
        values["vocab_size"] = min(int(original_vocab), values["vocab_size"])
    values["tie_word_embeddings"] = bool(getattr(config, "tie_word_embeddings", False))
    if getattr(text, "pad_token_id", None) is not None:
        values["pad_token_id"] = text.pad_token_id
    feature = {v: k for k, v in SELECT_FEATURE_TO_STRATEGY.items()}.get(config.vision_feature_select_strategy)
    if feature is None:
        raise ConvertError(f"vision_feature_select_strategy {config.vision_feature_select_strategy!r} has no "
                           "upstream equivalent")
    if not isinstance(config.vision_feature_layer, int):
        raise ConvertError(f"vision_feature_layer {config.vision_feature_layer!r}: upstream needs one layer")
    pinpoints = [list(p) for p in settings.pinpoints] if anyres.is_anyres(settings.image_mode) else None
    original_pinpoints = stored.get("image_grid_pinpoints")
    if pinpoints is not None and original_pinpoints is not None:
        try:  # keep the original spelling (e.g. a range string) when it means the same grid
            if anyres.parse_pinpoints(original_pinpoints, settings.crop_size) == [tuple(p) for p in pinpoints]:
                pinpoints = original_pinpoints
        except ValueError:
            pass
    tower = presets.resolve_tower(settings.tower) if settings.tower else stored.get("mm_vision_tower")
    derived = {
        "mm_vision_tower": tower,
        "mm_hidden_size": config.vision_config.hidden_size,
        "mm_vision_select_layer": config.vision_feature_layer,
        "mm_vision_select_feature": feature,
        "mm_projector_type": "mlp2x_gelu",
        "mm_patch_merge_type": settings.merge_type,
        "image_aspect_ratio": settings.image_mode,
        "image_grid_pinpoints": pinpoints,
    }
    llava = {**UPSTREAM_DEFAULTS,
             "tokenizer_model_max_length": getattr(text, "max_position_embeddings", None),
             "mm_tunable_parts": "mm_mlp_adapter" if stage1 else "mm_vision_tower,mm_mlp_adapter,mm_language_model",
             **stored, **derived}
    merged = {**values, **llava}
    out.update({key: merged[key] for key in sorted(merged)})
    out["model_type"] = "qwen2"
    out["transformers_version"] = transformers.__version__
    return out


def upstream_tower_warning(name: str | None, model_type: str) -> str | None:
    """Upstream picks the tower class from substrings of mm_vision_tower (`multimodal_encoder/builder.py`); say when
    the name written would send this tower down the wrong path."""
    if not name:
        return "no mm_vision_tower to write; upstream cannot rebuild the tower"
    if model_type == "mlcd_vision_model" and "mlcd-vit-bigG-patch14" not in name:
        return (f"mm_vision_tower {name!r} lacks 'mlcd-vit-bigG-patch14', so upstream would load this MLCD RoPE "
                "tower as a CLIP tower; rename the tower folder or edit config.json")
    if model_type.startswith("clip") and "mlcd-vit-bigG-patch14" in name:
        return f"mm_vision_tower {name!r} would make upstream load this CLIP-format tower as an MLCD bigG tower"
    lowered = name.lower()
    clip_path = (any(s in lowered for s in ("clip", "mlcd", "unicom", "dfn", "sharegpt4v"))
                 or name.startswith(("openai", "laion", "DeepGlint")))
    if model_type.startswith("clip") and not clip_path:
        return f"mm_vision_tower {name!r} matches none of the names upstream's builder sends to its CLIP tower"
    if model_type.startswith("siglip") and "siglip" not in lowered:
        return f"mm_vision_tower {name!r} lacks 'siglip', which upstream's builder needs for a SigLIP tower"
    return None


def upstream_to_hf_key(key: str, hf_keys) -> str | None:
    """The composite's runtime name for an upstream key (None when it maps nowhere)."""
    if key.startswith(UPSTREAM_TOWER_PREFIX):
        rest = key[len(UPSTREAM_TOWER_PREFIX):]
        bare = rest[len("vision_model."):] if rest.startswith("vision_model.") else rest
        # transformers 5 towers have no `vision_model.` level at runtime; older ones do.
        for candidate in (f"model.vision_tower.{bare}", f"model.vision_tower.vision_model.{bare}"):
            if candidate in hf_keys:
                return candidate
        return f"model.vision_tower.{bare}"
    for old, new in UPSTREAM_PROJECTOR.items():
        if key.startswith(old):
            return new + key[len(old):]
    if key == "model.image_newline" or key == "lm_head.weight":
        return key
    if key.startswith("model.") and not key.startswith(("model.vision_tower.", "model.mm_projector.",
                                                         "model.vision_resampler.")):
        return "model.language_model." + key[len("model."):]
    return None


def hf_to_upstream_key(key: str) -> str:
    if key.startswith("model.vision_tower."):
        rest = key[len("model.vision_tower."):]
        return UPSTREAM_TOWER_PREFIX + (rest if rest.startswith("vision_model.") else "vision_model." + rest)
    for old, new in UPSTREAM_PROJECTOR.items():
        if key.startswith(new):
            return old + key[len(new):]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key in ("model.image_newline", "lm_head.weight"):
        return key
    raise ConvertError(f"model key {key!r} has no upstream name")


def upstream_name(key: str) -> str:
    try:
        return hf_to_upstream_key(key)
    except ConvertError:
        return key


def write_upstream_tokenizer(src: Path, dst: Path, *, padding_side: str = "right") -> None:
    """The HF folder's tokenizer in the files upstream's transformers 4.44 / tokenizers 0.19 read: tokenizer.json
    with string merges, vocab.json + merges.txt, a legacy tokenizer_config.json (chat template inline),
    special_tokens_map.json and added_tokens.json. `<image>` is left out, as upstream adds it per call."""
    from mlcd_vl.vocab import IMAGE_PLACEHOLDER

    if not (src / "tokenizer.json").is_file():
        raise ConvertError(f"{src}: no tokenizer.json")
    data = read_json(src / "tokenizer.json")
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t.get("content") != IMAGE_PLACEHOLDER]
    model = data.get("model", {})
    if model.get("type") == "BPE":
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        if all(len(m.split(" ")) == 2 for m in merges):  # tokenizers < 0.20 reads "a b" strings only
            model["merges"] = merges
        (dst / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False) + "\n")
        (dst / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    (dst / "tokenizer.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    source = read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    if "chat_template" not in source and (src / "chat_template.jinja").is_file():
        source["chat_template"] = (src / "chat_template.jinja").read_text()
    flags = ("lstrip", "normalized", "rstrip", "single_word")
    added = {t["content"]: t for t in data["added_tokens"]}
    extra = source.get("extra_special_tokens", source.get("additional_special_tokens")) or []
    extra = [t["content"] if isinstance(t, dict) else t for t in extra if isinstance(t, (str, dict))]
    extra = [t for t in extra if t != IMAGE_PLACEHOLDER]
    tokenizer_class = source.get("tokenizer_class")
    if tokenizer_class in (None, "TokenizersBackend", "PreTrainedTokenizerFast"):
        tokenizer_class = "Qwen2Tokenizer"
    config = {"add_prefix_space": False,
              "added_tokens_decoder": {str(t["id"]): {**{f: t.get(f, False) for f in flags},
                                                      "content": t["content"], "special": t.get("special", False)}
                                       for t in data["added_tokens"]},
              "additional_special_tokens": extra}
    special_map: dict = {"additional_special_tokens": extra}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = source.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        config[name] = value
        if value is not None:
            token = added.get(value, {})
            special_map[name] = {"content": value, **{f: token.get(f, False) for f in flags}}
    for name in ("chat_template", "clean_up_tokenization_spaces", "errors", "model_max_length",
                 "split_special_tokens"):
        if name in source:
            config[name] = source[name]
    config.update(padding_side=padding_side, tokenizer_class=tokenizer_class)
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (dst / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")
    (dst / "added_tokens.json").write_text(
        json.dumps({t["content"]: t["id"] for t in sorted(data["added_tokens"], key=lambda t: t["content"])},
                   indent=2, ensure_ascii=False) + "\n")
