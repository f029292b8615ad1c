"""upstream -> HF-native: an upstream LlavaQwen (stage-2) checkpoint, or a stage-1 artifact (config.json +
`mm_projector.bin`) with its base LLM and tower, becomes an HF-native folder that `load_vlm` reads.

Upstream names map onto the composite's (`upstream_format.upstream_to_hf_key`); every source key must be used and
every model key filled with the right shape, otherwise the error names the key. Towers and base LLMs named in the
upstream config resolve to a local folder first (working directory, SRC and its parents), then to a preset's hub id.
`mlcd_vl.model.convert` picks the direction and holds the CLI.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from mlcd_vl.model.upstream_format import (PROJECTOR_FILE, UPSTREAM_BLOCK_KEY, UPSTREAM_TOWER_PREFIX,
                                            UPSTREAM_VOCAB_KEY, ConvertError, Log, load_pickle, read_json,
                                            read_state_dict, settings_from_upstream, split_upstream_config,
                                            text_config_from_upstream, upstream_name, upstream_to_hf_key)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ reading sources


def find_local(name: str, src: Path) -> Path | None:
    """`name` as a folder: absolute, relative to the working directory, or to SRC and each of its parents."""
    path = Path(name).expanduser()
    if path.is_absolute():
        return path if path.is_dir() else None
    for base in [Path.cwd(), src.resolve(), *src.resolve().parents]:
        if (base / path).is_dir():
            return base / path
    return None


def resolve_source(name: str, src: Path, what: str, preset_lookup: Callable[[str], str]) -> str:
    """A local folder when one exists, else the preset's hub id, else `name` itself (a hub id)."""
    if not name:
        raise ConvertError(f"{src / 'config.json'} names no {what}; pass it explicitly")
    local = find_local(name, src)
    return str(local) if local is not None else preset_lookup(name)


def _hub_error(name: str, resolved: str, what: str, flag: str, src: Path, error: Exception) -> ConvertError:
    where = f"hub id {resolved!r}" if resolved != name else "the hub"
    return ConvertError(
        f"{what} {name!r} could not be loaded: it is no local folder (looked in the working directory, {src} and "
        f"its parents), and loading it from {where} failed ({type(error).__name__}: {error}). Pass {flag} PATH")


def load_tower_info(name: str, src: Path):
    """(path, tower config, crop size, mean, std) for a tower name / folder / hub id."""
    from transformers import AutoConfig

    from mlcd_vl import presets
    from mlcd_vl.model.build import tower_processor_settings

    path = resolve_source(name, src, "vision tower (mm_vision_tower)", presets.resolve_tower)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise _hub_error(name, path, "vision tower", "--vision-tower", src, error) from error
    if config.model_type in ("clip", "siglip"):
        config = config.vision_config
    image = tower_processor_settings(path, config)
    return path, config, image.crop_size, image.mean, image.std


# ---------------------------------------------------------------------------------------------------- weights


def load_upstream_weights(model, state: dict, source: str, log: Log = _stderr) -> None:
    """Put upstream-named tensors into the composite; every key used, every model key filled, shapes equal."""
    import torch

    expected = model.state_dict()
    mapped, origin, ignored = {}, {}, []
    for key, tensor in state.items():
        target = upstream_to_hf_key(key, expected)
        if target is None or target not in expected:
            if key.endswith((".inv_freq", ".position_ids")):  # buffers older versions saved; the model rebuilds them
                ignored.append(key)
                continue
            raise ConvertError(f"{source}: key {key!r} has no place in the {model.config.model_type} model"
                               + (f" (would be {target!r})" if target else ""))
        if target in mapped:
            raise ConvertError(f"{source}: keys {origin[target]!r} and {key!r} both map to {target!r}")
        if tuple(tensor.shape) != tuple(expected[target].shape):
            raise ConvertError(f"{source}: key {key!r} has shape {list(tensor.shape)}, the model expects "
                               f"{list(expected[target].shape)} for {target!r}")
        mapped[target], origin[target] = tensor, key
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied and "lm_head.weight" not in mapped and "model.language_model.embed_tokens.weight" in mapped:
        mapped["lm_head.weight"] = mapped["model.language_model.embed_tokens.weight"]
    missing = [k for k in expected if k not in mapped]
    if missing:
        names = ", ".join(repr(upstream_name(k)) for k in missing[:8])
        raise ConvertError(f"{source}: missing {len(missing)} tensor(s): {names}"
                           + (" ..." if len(missing) > 8 else ""))
    with torch.no_grad():
        model.load_state_dict(mapped, strict=True, assign=True)
    if tied:
        model.tie_weights()
    if ignored:
        log(f"  ignored {len(ignored)} saved buffer(s) the model recomputes: {', '.join(ignored[:3])}")



# ------------------------------------------------------------------------------------------------ conversions


def _resolve_dtype(name: str | None, state: dict):
    """The dtype to build in: the named one, or (auto) the floating dtype most source tensors have."""
    import torch

    if name and name != "auto":
        try:
            return getattr(torch, name)
        except AttributeError:
            raise ConvertError(f"unknown dtype {name!r}") from None
    counts: dict = {}
    for tensor in state.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _compose(text_config, tower_config, settings, strategy: str, layer: int, tokenizer, dtype, log: Log):
    from transformers import AutoModelForImageTextToText
    from transformers.initialization import no_init_weights

    from mlcd_vl.vocab import IMAGE_PLACEHOLDER
    from mlcd_vl.model.build import compose_config

    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    config = compose_config(text_config, tower_config, settings, image_token_id, select_strategy=strategy,
                            select_layer=layer)
    log(f"  building {config.model_type} ({type(tower_config).__name__} tower, {dtype})")
    with no_init_weights():
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    return model


def _ensure_image_token_row(model, log: Log) -> int | None:
    """transformers' forward embeds the `<image>` id, so it needs a row; upstream never does (it splices -200).
    Qwen's vocabularies have spare rows; when the tokenizer fills them all, add rows (the means of the existing
    rows, deterministic) and return the original vocabulary size, which the way back restores."""
    import torch

    vocab = model.config.text_config.vocab_size
    if model.config.image_token_id < vocab:
        return None
    log(f"  warning: the <image> id {model.config.image_token_id} lies beyond the {vocab} embedding rows; adding "
        "rows (logits gain columns that upstream's model does not have)")
    model.resize_token_embeddings(model.config.image_token_id + 1, mean_resizing=False)
    with torch.no_grad():
        for weight in {model.get_input_embeddings().weight, model.get_output_embeddings().weight}:
            weight[vocab:] = weight[:vocab].mean(dim=0)
    return vocab


def _cast(state: dict, dtype) -> dict:
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}


def _load_tokenizer(path: str, template: str, what: str, config=None):
    """The tokenizer with `<image>` added; `config` spares AutoTokenizer from parsing an upstream config.json
    (model_type `llava_qwen` is unknown to transformers)."""
    from transformers import AutoTokenizer

    from mlcd_vl.model.build import prepare_tokenizer

    kwargs = {"config": config} if config is not None else {}
    try:
        return prepare_tokenizer(AutoTokenizer.from_pretrained(path, **kwargs), template)
    except (OSError, ValueError) as error:
        raise ConvertError(f"{path}: cannot load the tokenizer of the {what} ({error})") from error


def _finish_hf(model, tokenizer, settings, dst: Path, generation_source: str | None, upstream_block: dict,
               log: Log) -> Path:
    from transformers import GenerationConfig

    from mlcd_vl.model.checkpoint import save_vlm

    if generation_source is not None:
        try:
            model.generation_config = GenerationConfig.from_pretrained(generation_source)
        except OSError:
            log(f"  no generation_config.json in {generation_source}")
    setattr(model.config, UPSTREAM_BLOCK_KEY, upstream_block)
    model.eval()
    log(f"  saving HF-native {model.config.model_type} folder to {dst}")
    save_vlm(model, tokenizer, settings, dst)
    return dst


def convert_upstream_to_hf(src: str | Path, dst: str | Path, *, vision_tower: str | None = None,
                           allow_pickle: bool = False, dtype: str | None = None, template: str = "qwen_1_5",
                           log: Log = _stderr) -> Path:
    """An upstream LlavaQwen (stage-2) checkpoint -> HF-native folder; weights bit-identical."""
    src, dst = Path(src), Path(dst)
    config_path = src / "config.json"
    config = read_json(config_path)
    text_fields, llava_fields = split_upstream_config(config)
    tower_name = config.get("mm_vision_tower") or config.get("vision_tower") or ""
    log(f"converting upstream checkpoint {src} -> {dst}")
    tower_path, tower_config, crop, mean, std = load_tower_info(vision_tower or tower_name, src)
    log(f"  vision tower {tower_name!r} -> {tower_path} ({tower_config.model_type})")
    settings, strategy, layer = settings_from_upstream(config, config_path, tower_name or str(vision_tower),
                                                       tower_config, crop, mean, std, template,
                                                       config.get("_name_or_path", ""))
    state = read_state_dict(src, allow_pickle)
    log(f"  read {len(state)} tensors")
    torch_dtype = _resolve_dtype(dtype, state)
    text_config = text_config_from_upstream(text_fields)
    tokenizer = _load_tokenizer(str(src), template, "checkpoint", config=text_config)
    model = _compose(text_config, tower_config, settings, strategy, layer, tokenizer, torch_dtype, log)
    load_upstream_weights(model, _cast(state, torch_dtype), str(src), log)
    original_vocab = _ensure_image_token_row(model, log)
    if original_vocab is not None:
        llava_fields[UPSTREAM_VOCAB_KEY] = original_vocab
    return _finish_hf(model, tokenizer, settings, dst, str(src), llava_fields, log)


def convert_stage1_to_hf(src: str | Path, dst: str | Path, *, vision_tower: str | None = None,
                         base_llm: str | None = None, allow_pickle: bool = False, dtype: str | None = None,
                         template: str = "plain", log: Log = _stderr) -> Path:
    """A stage-1 artifact (config.json + mm_projector.bin) + base LLM + tower folder -> HF-native folder."""
    from transformers import AutoModelForCausalLM

    from mlcd_vl import presets
    from mlcd_vl.model.build import load_vision_tower

    src, dst = Path(src), Path(dst)
    config_path = src / "config.json"
    config = read_json(config_path)
    _, llava_fields = split_upstream_config(config)
    log(f"converting stage-1 artifact {src} -> {dst}")
    projector = load_pickle(src / PROJECTOR_FILE, allow_pickle)
    state = {}
    for key, tensor in projector.items():
        if "mm_projector." not in key:
            raise ConvertError(f"{src / PROJECTOR_FILE}: unexpected key {key!r} (mm_projector.* expected)")
        state["model.mm_projector." + key.split("mm_projector.", 1)[1]] = tensor
    llm_name = base_llm or config.get("_name_or_path") or ""
    llm_path = resolve_source(llm_name, src, "base LLM (_name_or_path)", presets.resolve_llm)
    log(f"  base LLM {llm_name!r} -> {llm_path}")
    llm_dtype = _resolve_dtype(dtype, {}) if dtype and dtype != "auto" else "auto"  # auto: the base LLM's own
    try:
        llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=llm_dtype)
    except (OSError, ValueError) as error:
        raise _hub_error(llm_name, llm_path, "base LLM", "--base-llm", src, error) from error
    torch_dtype = llm.dtype
    tower_name = config.get("mm_vision_tower") or ""
    tower_path, tower_config, crop, mean, std = load_tower_info(vision_tower or tower_name, src)
    log(f"  vision tower {tower_name!r} -> {tower_path} ({tower_config.model_type}), weights from that folder")
    tower = load_vision_tower(tower_path, dtype=torch_dtype)
    settings, strategy, layer = settings_from_upstream(config, config_path, tower_name or str(vision_tower),
                                                       tower_config, crop, mean, std, template, llm_name)
    for key, tensor in llm.state_dict().items():
        state[key] = tensor
    for key, tensor in tower.state_dict().items():
        state[UPSTREAM_TOWER_PREFIX + key] = tensor
    tokenizer = _load_tokenizer(llm_path, template, "base LLM")
    model = _compose(llm.config, tower.config, settings, strategy, layer, tokenizer, torch_dtype, log)
    load_upstream_weights(model, _cast(state, torch_dtype), f"{src} + {llm_path} + {tower_path}", log)
    original_vocab = _ensure_image_token_row(model, log)
    if original_vocab is not None:
        llava_fields[UPSTREAM_VOCAB_KEY] = original_vocab
    llava_fields.setdefault("_name_or_path", llm_name)
    return _finish_hf(model, tokenizer, settings, dst, llm_path, llava_fields, log)
