"""Convert upstream LLaVA-format checkpoints to HF-native folders and back.

    mlcd-vl convert SRC DST [--vision-tower PATH] [--base-llm PATH] [--allow-pickle] [--to hf|upstream]
                            [--projector-only] [--dtype auto|float32|bfloat16|float16]

The direction comes from SRC/config.json (never from a path):

* upstream stage-2 checkpoint (`architectures: [LlavaQwenForCausalLM]`, model_type `qwen2` or `llava_qwen`)
  -> HF-native folder: anyres / anyres_max_N + spatial_unpad become LLaVA-NeXT / LLaVA-OneVision, square / pad + flat
  become LLaVA (reference-spec 9). Every vision weight comes from the checkpoint; the tower named in
  `mm_vision_tower` only supplies its config and image-processor settings.
* upstream stage-1 artifact (config.json with mm_* keys + `mm_projector.bin`) -> HF-native LLaVA folder, with the
  base LLM (`_name_or_path` or --base-llm) and the tower weights from the tower folder.
* HF-native folder (llava, llava_next, llava_onevision) -> upstream `LlavaQwenForCausalLM` checkpoint
  (config.json, model.safetensors, tokenizer, generation_config.json); with --projector-only, a stage-1 artifact
  (config.json + `mm_projector.bin`) for upstream's `--pretrain_mm_mlp_adapter`.

Weight names (reference-spec 2.4 and 9): `model.vision_tower.vision_tower.vision_model.X` <-> `model.vision_tower.X`,
`model.mm_projector.{0,2}.*` <-> `model.multi_modal_projector.linear_{1,2}.*`, `model.image_newline` and
`lm_head.weight` unchanged, any other `model.X` <-> `model.language_model.X`. Every source key must be used and
every model key filled with the right shape; otherwise the error names the key. Upstream pinpoints are
(width, height) and stay so in our settings; the transformers config gets (height, width) (compose_config swaps).
The LLaVA-only fields of the upstream config ride along in config.json under `mlcd_vl_upstream`, so a round trip
upstream -> HF-native -> upstream gives back the same config fields and bit-identical tensors.

Pickled `.bin` files run code when unpickled: they are read only with --allow-pickle (`allow_pickle=True`), and
then with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Callable
from mlcd_vl.model.upstream_format import (HF_MODEL_TYPES, PROJECTOR_FILE, UPSTREAM_ARCHITECTURE, UPSTREAM_BLOCK_KEY,
                                            UPSTREAM_TOWER_PREFIX, UPSTREAM_VOCAB_KEY, ConvertError, detect_format,
                                            hf_to_upstream_key, load_pickle, Log, read_json, read_state_dict,
                                            settings_from_upstream, split_upstream_config, text_config_from_upstream,
                                            upstream_config_from_hf, upstream_name, upstream_to_hf_key,
                                            upstream_tower_warning, write_upstream_tokenizer)



def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------------------------------------


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
    crop_size, mean, std = tower_processor_settings(path, config)
    return path, config, crop_size, mean, std


# --------------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------------
# Weight names
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# upstream -> HF-native
# --------------------------------------------------------------------------------------------------------------------


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

    from mlcd_vl.data.templates import IMAGE_PLACEHOLDER
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


# --------------------------------------------------------------------------------------------------------------------
# HF-native -> upstream
# --------------------------------------------------------------------------------------------------------------------


def convert_hf_to_upstream(src: str | Path, dst: str | Path, *, projector_only: bool = False,
                           dtype: str | None = None, log: Log = _stderr) -> Path:
    """An HF-native folder -> upstream LlavaQwen checkpoint, or (projector_only) a stage-1 artifact."""
    import torch
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoConfig, AutoModelForImageTextToText

    from mlcd_vl.model.checkpoint import settings_from_config

    src, dst = Path(src), Path(dst)
    log(f"converting HF-native folder {src} -> upstream {'stage-1 artifact' if projector_only else 'checkpoint'} "
        f"{dst}")
    hf_config = AutoConfig.from_pretrained(src)
    if hf_config.model_type not in HF_MODEL_TYPES:
        raise ConvertError(f"{src / 'config.json'}: model type {hf_config.model_type!r} is not a LLaVA composite")
    if hf_config.text_config.model_type != "qwen2":
        raise ConvertError(f"{src / 'config.json'}: the LLM is {hf_config.text_config.model_type!r}; upstream "
                           f"{UPSTREAM_ARCHITECTURE} needs a Qwen2 LLM")
    settings = settings_from_config(hf_config)
    kwargs = {"dtype": getattr(torch, dtype) if dtype and dtype != "auto" else "auto"}
    try:
        model = AutoModelForImageTextToText.from_pretrained(src, **kwargs)
    except (OSError, RuntimeError, ValueError) as error:
        raise ConvertError(f"{src}: cannot load weights ({error})") from error
    state = {}
    for key, tensor in model.state_dict().items():
        state[hf_to_upstream_key(key)] = tensor.detach().contiguous()
    original_vocab = (getattr(model.config, UPSTREAM_BLOCK_KEY, None) or {}).get(UPSTREAM_VOCAB_KEY)
    if original_vocab is not None:  # drop the rows conversion added for <image>
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            if key in state:
                state[key] = state[key][:int(original_vocab)].clone()
    floating = [t.dtype for t in state.values() if t.is_floating_point()]
    dtype_name = str(max(set(floating), key=floating.count)).replace("torch.", "") if floating else "float32"
    dst.mkdir(parents=True, exist_ok=True)
    config = upstream_config_from_hf(model.config, settings, dtype_name, stage1=projector_only)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    warning = upstream_tower_warning(config["mm_vision_tower"], hf_config.vision_config.model_type)
    if warning:
        log(f"  warning: {warning}")
    if projector_only:
        projector = {k: v.clone() for k, v in state.items() if k.startswith("model.mm_projector.")}
        torch.save(projector, dst / PROJECTOR_FILE)
        log(f"  wrote {PROJECTOR_FILE} ({len(projector)} tensors) and config.json")
        return dst
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_torch_state_dict(state, str(dst), max_shard_size="5GB", metadata={"format": "pt"})
    log(f"  wrote {len(state)} tensors, config.json")
    write_upstream_tokenizer(src, dst, padding_side=config.get("tokenizer_padding_side") or "right")
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", dst / "generation_config.json")
    log("  wrote tokenizer and generation_config.json")
    return dst


# --------------------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------------------


def convert(src: str | Path, dst: str | Path, *, to: str | None = None, vision_tower: str | None = None,
            base_llm: str | None = None, allow_pickle: bool = False, projector_only: bool = False,
            dtype: str | None = None, template: str | None = None, overwrite: bool = False,
            log: Log = _stderr) -> Path:
    """Convert SRC into DST in the direction SRC's config.json implies (checked against `to` when given)."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConvertError(f"{src}: not a folder")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ConvertError(f"{dst}: exists and is not empty (pass --overwrite to write into it)")
    kind = detect_format(src)
    direction = "upstream" if kind == "hf" else "hf"
    if to is not None and to != direction:
        raise ConvertError(f"{src} is {'an HF-native folder' if kind == 'hf' else 'an upstream checkpoint'}; "
                           f"it converts to {direction}, not {to}")
    if projector_only and kind != "hf":
        raise ConvertError("--projector-only applies to HF-native -> upstream conversion")
    if kind == "upstream":
        return convert_upstream_to_hf(src, dst, vision_tower=vision_tower, allow_pickle=allow_pickle, dtype=dtype,
                                      template=template or "qwen_1_5", log=log)
    if kind == "stage1":
        return convert_stage1_to_hf(src, dst, vision_tower=vision_tower, base_llm=base_llm,
                                    allow_pickle=allow_pickle, dtype=dtype, template=template or "plain", log=log)
    return convert_hf_to_upstream(src, dst, projector_only=projector_only, dtype=dtype, log=log)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("src", metavar="SRC", help="checkpoint folder to convert (upstream, stage-1 or HF-native)")
    parser.add_argument("dst", metavar="DST", help="output folder (created)")
    parser.add_argument("--to", choices=("hf", "upstream"), default=None,
                        help="expected direction; detected from SRC/config.json, this only checks it")
    parser.add_argument("--vision-tower", metavar="PATH",
                        help="tower folder, preset or hub id overriding mm_vision_tower (config and processor "
                             "settings; stage-1 also takes its weights)")
    parser.add_argument("--base-llm", metavar="PATH",
                        help="stage-1 artifacts: the base LLM (default: _name_or_path of SRC/config.json)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow reading pickled .bin files (mm_projector.bin, pytorch_model.bin) with "
                             "torch.load(weights_only=True); only for files you trust")
    parser.add_argument("--projector-only", action="store_true",
                        help="HF-native -> upstream: write a stage-1 artifact (config.json + mm_projector.bin) "
                             "for upstream's --pretrain_mm_mlp_adapter")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weight dtype of the output (default auto: keep the source's)")
    parser.add_argument("--template", default=None,
                        help="chat template stored with the tokenizer (default: qwen_1_5, plain for stage-1)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")


def run(args: argparse.Namespace) -> int:
    try:
        convert(args.src, args.dst, to=args.to, vision_tower=args.vision_tower, base_llm=args.base_llm,
                allow_pickle=args.allow_pickle, projector_only=args.projector_only, dtype=args.dtype,
                template=args.template, overwrite=args.overwrite)
    except ConvertError as error:
        _stderr(f"mlcd-vl convert: error: {error}")
        return 2
    _stderr(f"done: {args.dst}")
    return 0
