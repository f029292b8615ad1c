"""DeepSpeed specifics of the recipe: its JSON with every "auto" filled, one-process launches, the ZeRO stage, and a
ZeRO-3 run's final weights.

ZeRO-1/2 keep every parameter whole on every rank, so the module itself is saved as without DeepSpeed.

ZeRO-3 partitions parameters across ranks (from the start: `model.sharded` builds the model partitioned). The final
save (`save_streamed`) writes the HF-native safetensors shards (about `SHARD_SIZE` each, with the index json, the key
layout `save_pretrained` writes) tensor by tensor: every rank takes part in gathering one parameter at a time, the
whole fp32 master weight of a trainable parameter (`deepspeed.utils.safe_get_full_fp32_param`, what the optimizer
holds) or the module's tensor of a frozen one, and the main process keeps it until its shard is written. So no
process ever holds more than one shard, nothing is written but the folder itself (no scratch checkpoint), and the
output folder need not be shared between nodes. LoRA adapters are merged as the layers stream (`lora.merged_layout`).
The tensors equal what DeepSpeed's `zero_to_fp32` rebuilds from a sharded checkpoint bit for bit
(tests/test_zero3_sharded.py); each gather is one collective on one parameter, with every rank walking the same list,
so no gather outlasts the collective timeout as a whole-model gather onto rank 0 can (anchors section 3, "Hang or
NCCL timeout at final save"). `stage3_gather_16bit_weights_on_model_save` in the JSON configs is left as upstream had
it and is not relied on.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch

from mlcd_vl.model.gathered import full_shape, gathered, is_main_rank, release_freed_memory
from mlcd_vl.model.sharded import persistent_buffers
from mlcd_vl.train.config import TrainConfig

SHARD_SIZE = "2GB"  # the final save's shards: the most the main process holds at once
WEIGHTS_PATTERN, INDEX_FILE = "model{suffix}.safetensors", "model.safetensors.index.json"  # save_pretrained's names


def deepspeed_config(config: TrainConfig, hidden_size: int, world_size: int, precision: str) -> dict:
    """The DeepSpeed JSON with every "auto" filled from the recipe (as the HF Trainer would)."""
    ds = json.loads(Path(config.deepspeed).read_text())
    fill = {"train_micro_batch_size_per_gpu": 1 if config.data.packing else config.batch.per_device_batch_size,
            "gradient_accumulation_steps": config.batch.grad_accum,
            "gradient_clipping": config.optim.max_grad_norm or 0.0}
    fill["train_batch_size"] = fill["train_micro_batch_size_per_gpu"] * world_size * config.batch.grad_accum
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    for key, enabled in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        if key in ds and ds[key].get("enabled") == "auto":
            ds[key]["enabled"] = enabled
    zero = ds.get("zero_optimization", {})
    sizes = {"reduce_bucket_size": hidden_size * hidden_size,
             "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
             "stage3_param_persistence_threshold": 10 * hidden_size}
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ValueError(f"{config.deepspeed}: remove the {section!r} block; the recipe builds torch AdamW and "
                             "the schedule (optim.*)")
    return ds


def single_process_launch_env() -> bool:
    """Make a plain `python -m mlcd_vl.train` with a DeepSpeed config a one-process distributed run (as torchrun
    with one process would): DeepSpeed needs a process group. Returns whether anything was set."""
    if "LOCAL_RANK" in os.environ or "RANK" in os.environ:
        return False
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    return True


def zero_stage(accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0


def zero3_requested(config: TrainConfig) -> bool:
    """The recipe's DeepSpeed JSON asks for ZeRO stage 3."""
    if not config.deepspeed:
        return False
    stage = json.loads(Path(config.deepspeed).read_text()).get("zero_optimization", {}).get("stage", 0)
    return int(stage) == 3


def _whole(tensor: torch.Tensor, buffer: bool, main: bool) -> torch.Tensor | None:
    """A parameter's or buffer's whole value on the CPU for the main process (None elsewhere); every rank calls it
    for every parameter in the same order (collectives)."""
    from deepspeed.utils import safe_get_full_fp32_param

    if buffer:  # never partitioned; saved in fp32 as zero_to_fp32 restores them
        return tensor.detach().to("cpu", torch.float32 if tensor.is_floating_point() else None, copy=True) \
            if main else None
    value = safe_get_full_fp32_param(tensor)  # the optimizer's fp32 master weight of a trainable parameter
    if value is not None:
        return value.to("cpu", copy=True) if main else None
    with gathered([tensor]):  # frozen: the module's own tensor
        return tensor.detach().to("cpu", copy=True) if main else None


def _saved_dtype(tensor: torch.Tensor, buffer: bool) -> torch.dtype:
    if buffer:
        return torch.float32 if tensor.is_floating_point() else tensor.dtype
    return torch.float32 if tensor.requires_grad else tensor.dtype


def save_streamed(vlm, folder: str | Path, *, scalings: dict[str, float] | None = None,
                  keep_prefix: str | None = None, max_shard_size: int | str | None = None) -> dict[str, torch.Tensor]:
    """Write a ZeRO-3 model's weights into `folder` shard by shard (module docstring); every rank must call it.

    `vlm` is the unwrapped model (LoRA still injected when `scalings`, `lora.layer_scalings`, is given: the adapters
    are merged). The main process writes the files and returns the tensors whose names start with `keep_prefix`
    (e.g. the projector, for stage 1's artifact); other ranks return {}. Call `save_vlm(..., weights=False)` first:
    `save_pretrained` clears older weight files.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers.core_model_loading import revert_weight_conversion

    from mlcd_vl.train import lora

    folder, main = Path(folder), is_main_rank()
    params = dict(vlm.named_parameters())  # tied aliases once, under the name save_pretrained keeps
    buffers = {name: tensor for name, tensor in persistent_buffers(vlm).items() if name not in params}
    names = [*params, *buffers]
    layout = lora.merged_layout(names, scalings) if scalings else [(name, [name]) for name in names]
    layout = [(name, sources) for name, sources in layout if name not in (vlm._keys_to_ignore_on_save or ())]
    meta = {}
    for name, sources in layout:  # the base weight decides a merged tensor's dtype
        tensor = params.get(sources[0], buffers.get(sources[0]))
        meta[name] = torch.empty(full_shape(tensor), dtype=_saved_dtype(tensor, sources[0] in buffers),
                                 device="meta")
    saved_as = {id(tensor): key for key, tensor in revert_weight_conversion(vlm, dict(meta)).items()}
    if len(saved_as) != len(meta):
        raise ValueError("transformers' save layout merges or splits tensors of this model; streamed save unsupported")
    plan = {saved_as[id(meta[name])]: (name, sources) for name, sources in layout}
    split = split_torch_state_dict_into_shards({key: meta[name] for key, (name, _) in plan.items()},
                                               filename_pattern=WEIGHTS_PATTERN,
                                               max_shard_size=max_shard_size or SHARD_SIZE)
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        for old in [*folder.glob("model*.safetensors"), folder / INDEX_FILE]:
            if old.is_file() and old.name not in split.filename_to_tensors:
                old.unlink()
    kept: dict[str, torch.Tensor] = {}
    for file_name, keys in split.filename_to_tensors.items():
        shard = {}
        for key in keys:
            name, sources = plan[key]
            values = {source: _whole(params.get(source, buffers.get(source)), source in buffers, main)
                      for source in sources}
            if main:
                value = values[sources[0]] if len(sources) == 1 else lora.merge_state_dict(values, scalings)[name]
                shard[key] = value.contiguous()
                if keep_prefix and name.startswith(keep_prefix):
                    kept[name] = value
            del values
            release_freed_memory()  # the gathered buffers (module docstring of model.gathered)
        if main:
            save_file(shard, str(folder / file_name), metadata={"format": "pt"})
        del shard
        release_freed_memory()
    if main and split.is_sharded:
        total = sum(meta[name].numel() for name, sources in layout if sources[0] in params)
        index = {"metadata": {"total_parameters": total, **split.metadata}, "weight_map": split.tensor_to_filename}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return kept
