"""HF-native -> upstream: an HF-native folder (llava, llava_next, llava_onevision with a Qwen2 LLM) becomes an
upstream `LlavaQwenForCausalLM` checkpoint (config.json, safetensors, tokenizer, generation_config.json), or with
`projector_only` a stage-1 artifact (config.json + `mm_projector.bin`) for upstream's `--pretrain_mm_mlp_adapter`.

Embedding rows that upstream -> HF-native conversion added for `<image>` are dropped again, so a round trip gives
back bit-identical tensors. `mlcd_vl.model.convert` picks the direction and holds the CLI.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from mlcd_vl.model.upstream_format import (HF_MODEL_TYPES, PROJECTOR_FILE, UPSTREAM_ARCHITECTURE, UPSTREAM_BLOCK_KEY,
                                            UPSTREAM_VOCAB_KEY, ConvertError, Log, hf_to_upstream_key,
                                            upstream_config_from_hf, upstream_tower_warning,
                                            write_upstream_tokenizer)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
