"""OpenCLIP vision towers as transformers `CLIPVisionModel` folders, converted once and cached.

Some towers of the MLCD encoder table ship only as OpenCLIP checkpoints: `apple/DFN5B-CLIP-ViT-H-14-378` holds
`open_clip_config.json` and pickle weights (`open_clip_pytorch_model.bin`; its extra HF-format `config.json` +
`pytorch_model.bin` are pickle too and come without an image-processor config). A plain OpenCLIP ViT is the CLIP
architecture under other names, so its image tower maps one to one onto `CLIPVisionModel`:

| OpenCLIP (`visual.`)                           | transformers `CLIPVisionModel`                            |
|------------------------------------------------|-----------------------------------------------------------|
| conv1, class_embedding, positional_embedding   | embeddings.patch_embedding / class_embedding / position_embedding |
| ln_pre, ln_post                                | pre_layrnorm, post_layernorm                              |
| transformer.resblocks.i.ln_1 / ln_2            | encoder.layers.i.layer_norm1 / layer_norm2                |
| ...attn.in_proj_{weight,bias} (q, k, v stacked) | ...self_attn.{q,k,v}_proj                                |
| ...attn.out_proj, mlp.c_fc, mlp.c_proj         | ...self_attn.out_proj, mlp.fc1, mlp.fc2                   |

`quick_gelu` becomes `hidden_act="quick_gelu"`; the image projection `visual.proj` and the text tower are not part
of a vision tower and are dropped. The OpenCLIP preprocessing (`preprocess_cfg`) becomes a `CLIPImageProcessor`
config: "squash" is `size={"height": S, "width": S}` with `do_center_crop=False`. Architectures this table does
not cover (timm trunks, attention pooling, layer scale, custom blocks, non-bicubic resizing) are refused by name.

Weights are read from `open_clip_model.safetensors`, or from the pickle `open_clip_pytorch_model.bin` only with
`allow_pickle=True` (loaded with `weights_only=True`); the converted folder is safetensors. Conversions are cached
under `$MLCD_VL_CACHE/towers` (default `~/.cache/mlcd_vl/towers`) and reused while the source weights file (path,
size, modification time) is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlcd_vl.errors import UsageError

CONFIG_NAME = "open_clip_config.json"
SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"
PICKLE_WEIGHTS_NAME = "open_clip_pytorch_model.bin"
STAMP_NAME = "mlcd_vl_conversion.json"

# Vision-config keys whose non-default values change the architecture away from a plain CLIP ViT.
_PLAIN_VIT_DEFAULTS = {
    "timm_model_name": None, "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
    "pos_embed_type": "learnable", "final_ln_after_pool": False, "pool_type": "tok", "act_kwargs": None,
    "norm_kwargs": None, "block_type": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
    "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
}
_BLOCK_MAP = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOP_MAP = {
    "visual.conv1.weight": "embeddings.patch_embedding.weight",
    "visual.class_embedding": "embeddings.class_embedding",
    "visual.positional_embedding": "embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "pre_layrnorm.weight",
    "visual.ln_pre.bias": "pre_layrnorm.bias",
    "visual.ln_post.weight": "post_layernorm.weight",
    "visual.ln_post.bias": "post_layernorm.bias",
}
_DROPPED = ("visual.proj",)  # the contrastive image projection; LLaVA uses hidden states
_BLOCK_KEY = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)$")  # in_proj_weight too


class OpenCLIPError(UsageError, ValueError):
    """An OpenCLIP source that cannot be converted; the message names the source and the reason."""


@dataclass(frozen=True)
class OpenCLIPSource:
    """An OpenCLIP checkpoint on disk: its config file and its weights file."""

    name: str  # what the user gave (hub id or folder), for messages and provenance
    config_file: Path
    weights_file: Path


def is_open_clip_folder(path: str | os.PathLike) -> bool:
    """A folder holding an OpenCLIP checkpoint and no transformers config.json."""
    folder = Path(path).expanduser()
    return (folder / CONFIG_NAME).is_file() and not (folder / "config.json").is_file()


def vision_config_from_open_clip(config: dict, name: str = "OpenCLIP config"):
    """The `CLIPVisionConfig` of an OpenCLIP model config (`open_clip_config.json`'s `model_cfg`, or the file)."""
    from transformers import CLIPVisionConfig

    model_cfg = config.get("model_cfg", config)
    vision = dict(model_cfg.get("vision_cfg") or {})
    changed = sorted(key for key, default in _PLAIN_VIT_DEFAULTS.items() if vision.get(key, default) != default)
    if changed:
        raise OpenCLIPError(f"{name}: vision tower is not a plain CLIP ViT ({', '.join(changed)} set); "
                            "only plain OpenCLIP ViTs convert to CLIPVisionModel")
    layers = vision.get("layers", 12)
    if not isinstance(layers, int):
        raise OpenCLIPError(f"{name}: vision tower with layers={layers!r} is a ResNet, not a ViT")
    width, head_width = int(vision.get("width", 768)), int(vision.get("head_width", 64))
    image_size, patch_size = vision.get("image_size", 224), vision.get("patch_size", 16)
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise OpenCLIPError(f"{name}: non-square image size {image_size} is not supported")
        image_size = image_size[0]
    if width % head_width:
        raise OpenCLIPError(f"{name}: width {width} is not a multiple of head_width {head_width}")
    return CLIPVisionConfig(
        hidden_size=width, intermediate_size=int(width * float(vision.get("mlp_ratio", 4.0))),
        num_hidden_layers=layers, num_attention_heads=width // head_width, image_size=int(image_size),
        patch_size=int(patch_size), hidden_act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        layer_norm_eps=1e-5, projection_dim=int(model_cfg.get("embed_dim", 512)))


def image_processor_from_open_clip(config: dict, image_size: int, name: str = "OpenCLIP config"):
    """The `CLIPImageProcessor` that reproduces OpenCLIP's eval preprocessing (`preprocess_cfg`)."""
    from transformers import CLIPImageProcessor

    from mlcd_vl.model.pixels import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    preprocess = config.get("preprocess_cfg") or {}
    interpolation = preprocess.get("interpolation", "bicubic")
    if interpolation != "bicubic":
        raise OpenCLIPError(f"{name}: interpolation {interpolation!r} is not supported (bicubic only)")
    resize_mode = preprocess.get("resize_mode", "shortest")
    crop = {"height": image_size, "width": image_size}
    if resize_mode == "squash":
        size, center_crop = dict(crop), False
    elif resize_mode == "shortest":
        size, center_crop = {"shortest_edge": image_size}, True
    else:
        raise OpenCLIPError(f"{name}: resize mode {resize_mode!r} is not supported (squash or shortest)")
    return CLIPImageProcessor(size=size, crop_size=crop, do_center_crop=center_crop, resample=3,
                              image_mean=list(preprocess.get("mean", OPENAI_CLIP_MEAN)),
                              image_std=list(preprocess.get("std", OPENAI_CLIP_STD)), do_convert_rgb=True)


def convert_state_dict(state: dict, num_layers: int, name: str = "OpenCLIP weights") -> dict:
    """OpenCLIP `visual.*` tensors -> `CLIPVisionModel` names; every vision tensor used, none missing."""
    import torch

    out, unused = {}, []
    for key, tensor in state.items():
        if not key.startswith("visual.") or key in _DROPPED:
            continue
        if key in _TOP_MAP:
            out[_TOP_MAP[key]] = tensor
            continue
        match = _BLOCK_KEY.match(key)
        if match is None:
            unused.append(key)
            continue
        index, part, kind = int(match.group(1)), match.group(2), match.group(3)
        prefix = f"encoder.layers.{index}."
        if part == "attn.in_proj":  # nn.MultiheadAttention's stacked q, k, v
            for proj, chunk in zip(("q_proj", "k_proj", "v_proj"), torch.chunk(tensor, 3, dim=0)):
                out[f"{prefix}self_attn.{proj}.{kind}"] = chunk.contiguous()
        elif part in _BLOCK_MAP:
            out[f"{prefix}{_BLOCK_MAP[part]}.{kind}"] = tensor
        else:
            unused.append(key)
    if unused:
        raise OpenCLIPError(f"{name}: vision tensors with no CLIPVisionModel counterpart: {', '.join(unused[:8])}"
                            + (f" (+{len(unused) - 8} more)" if len(unused) > 8 else ""))
    expected = set(_TOP_MAP.values()) | {
        f"encoder.layers.{i}.{module}.{kind}" for i in range(num_layers) for kind in ("weight", "bias")
        for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", *_BLOCK_MAP.values())}
    missing = sorted(expected - set(out))
    if missing:
        raise OpenCLIPError(f"{name}: missing vision tensors for {', '.join(missing[:8])}"
                            + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
    return out


def read_weights(path: Path, *, allow_pickle: bool = False) -> dict:
    """Tensors of a safetensors file, or of a pickle file when explicitly allowed (weights only)."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types for bad headers
            raise OpenCLIPError(f"{path}: corrupt or truncated safetensors file ({error})") from error
    if not allow_pickle:
        raise OpenCLIPError(f"{path}: pickle weights are only read with --allow-pickle (weights_only loading); "
                            "prefer a safetensors copy")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad pickle
        raise OpenCLIPError(f"{path}: cannot read pickle weights ({error})") from error
    return state.get("state_dict", state) if isinstance(state, dict) else state


def convert(source: OpenCLIPSource, out_dir: str | Path, *, allow_pickle: bool = False) -> Path:
    """Write `CLIPVisionModel` safetensors + config + image-processor config for an OpenCLIP checkpoint."""
    from transformers import CLIPVisionModel
    from transformers.initialization import no_init_weights

    try:
        config = json.loads(source.config_file.read_text())
    except (OSError, ValueError) as error:
        raise OpenCLIPError(f"{source.config_file}: cannot read OpenCLIP config ({error})") from error
    vision_config = vision_config_from_open_clip(config, str(source.config_file))
    processor = image_processor_from_open_clip(config, vision_config.image_size, str(source.config_file))
    state = read_weights(source.weights_file, allow_pickle=allow_pickle)
    converted = convert_state_dict(state, vision_config.num_hidden_layers, str(source.weights_file))
    with no_init_weights():
        model = CLIPVisionModel(vision_config)
    expected = model.state_dict()
    if "vision_model.pre_layrnorm.weight" in expected:  # older transformers wrap it in `vision_model`
        converted = {f"vision_model.{key}": tensor for key, tensor in converted.items()}
    wrong = [f"{key} {tuple(tensor.shape)} != {tuple(expected[key].shape)}" for key, tensor in converted.items()
             if tuple(tensor.shape) != tuple(expected[key].shape)]
    if wrong:
        raise OpenCLIPError(f"{source.weights_file}: tensor shapes do not fit {source.config_file}: "
                            + "; ".join(wrong[:4]))
    model.load_state_dict({key: tensor.float() for key, tensor in converted.items()}, strict=True, assign=True)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


def cache_root() -> Path:
    return Path(os.environ.get("MLCD_VL_CACHE", Path.home() / ".cache" / "mlcd_vl")).expanduser() / "towers"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _source_key(weights: Path) -> dict:
    status = weights.stat()
    return {"weights": str(weights.resolve()), "size": status.st_size, "mtime_ns": status.st_mtime_ns}


def converted_tower(source: OpenCLIPSource, *, allow_pickle: bool = False, cache: Path | None = None) -> Path:
    """The cached `CLIPVisionModel` folder of an OpenCLIP checkpoint, converting it the first time."""
    cache = cache or cache_root()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", source.name.strip("/").replace("/", "--"))[-80:]
    key = _source_key(source.weights_file)
    folder = cache / f"{slug}-{hashlib.sha256(key['weights'].encode()).hexdigest()[:10]}"
    stamp_file = folder / STAMP_NAME
    if stamp_file.is_file():
        stamp = json.loads(stamp_file.read_text())
        if {k: stamp.get(k) for k in key} == key and (folder / "model.safetensors").is_file():
            return folder
    cache.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{slug}-", dir=cache))
    try:
        convert(source, scratch, allow_pickle=allow_pickle)
        stamp = {"source": source.name, **key, "sha256": _sha256(source.weights_file),
                 "config": str(source.config_file.resolve())}
        (scratch / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        scratch.rename(folder)  # atomic on one file system: an interrupted conversion leaves no half folder
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return folder


def _weights_in(folder: Path, name: str, allow_pickle: bool) -> Path:
    safe, pickle = folder / SAFE_WEIGHTS_NAME, folder / PICKLE_WEIGHTS_NAME
    if safe.is_file():
        return safe
    if pickle.is_file():
        if not allow_pickle:
            raise OpenCLIPError(f"{name}: only pickle weights ({PICKLE_WEIGHTS_NAME}); pass --allow-pickle to "
                                "convert them once (weights_only loading) into a safetensors CLIPVisionModel")
        return pickle
    raise OpenCLIPError(f"{name}: no {SAFE_WEIGHTS_NAME} or {PICKLE_WEIGHTS_NAME} next to {CONFIG_NAME}")


def _hub_file(repo_id: str, filename: str) -> Path | None:
    """A file of a hub repo (downloaded or cached); None when the repo has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename))
    except EntryNotFoundError:  # absent in the repo, or (offline) absent from the cache
        return None
    except OSError as error:
        raise OpenCLIPError(f"{repo_id}: cannot fetch {filename} ({type(error).__name__}: {error})") from error


def locate(name: str, *, allow_pickle: bool = False) -> OpenCLIPSource:
    """The config and weights of an OpenCLIP checkpoint given as a local folder or a hub id."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / CONFIG_NAME).is_file():
            raise OpenCLIPError(f"{name}: no {CONFIG_NAME} (not an OpenCLIP checkpoint folder)")
        return OpenCLIPSource(name, folder / CONFIG_NAME, _weights_in(folder, name, allow_pickle))
    config = _hub_file(name, CONFIG_NAME)
    if config is None:
        raise OpenCLIPError(f"{name}: no {CONFIG_NAME} on the hub or in the local hub cache")
    weights = _hub_file(name, SAFE_WEIGHTS_NAME)
    if weights is None:
        if not allow_pickle:
            raise OpenCLIPError(f"{name}: the hub repo has no {SAFE_WEIGHTS_NAME}, only pickle weights; pass "
                                "--allow-pickle to convert them once (weights_only loading) into safetensors")
        weights = _hub_file(name, PICKLE_WEIGHTS_NAME)
        if weights is None:
            raise OpenCLIPError(f"{name}: neither {SAFE_WEIGHTS_NAME} nor {PICKLE_WEIGHTS_NAME} could be fetched")
    return OpenCLIPSource(name, config, weights)
