"""Build or load a VLM partitioned under DeepSpeed ZeRO-3, so that no process ever holds the whole model.

`build_vlm_partitioned(spec, ds_config)` is `build.build_vlm` for ZeRO-3 runs (`model.sharded_init`, the default):

1. the plan (`build.plan_vlm`): tokenizer, configs and image settings, no weights;
2. the composite is created under `deepspeed.zero.Init(config_dict_or_path=ds_config)` in the training dtype (the
   JSON's bf16 / fp16 / fp32), every parameter partitioned as soon as its module exists (transformers' weight init
   is skipped: every tensor is loaded or set below);
3. the LLM's and the tower's tensors are read from their safetensors files one at a time (`safe_open`: only the
   header is read up front; rank 0 reads each value) into the partitioned parameters, one parameter gathered at a
   time (`GatheredParameters([p], modifier_rank=0)`). A file key becomes a composite name by transformers' own
   renaming for the part's class (a hub MLCD / CLIP tower stores `vision_model.*`), then by `build.composite_key`,
   the map the whole-model build uses too;
4. a new `<image>` token grows the embeddings (transformers' ZeRO-3-aware `resize_token_embeddings`, whose new
   embedding matrices are whole on every rank until `zero.Init(module=...)` partitions them right after), then the
   projector and image_newline get `init_projector_and_newline`'s seeded values. The whole-model build does the
   same steps in the same order, so both draw the same random numbers (the new token's row, the tower's
   constructors) and leave the generator in the same state.

`load_vlm_partitioned(folder, ds_config)` does the same for an HF-native VLM folder (`model.checkpoint`), with
transformers' renaming for the composite (our folders keep transformers' saved key layout).

So a rank holds its partition of the model, one whole parameter while it is loaded, and transformers' construction
of one module at a time (the host memory each of those freed is handed back at once, `gathered.release_freed_memory`;
measured in bench/zero3_memory.py). The result equals the whole-model build tensor for tensor
(tests/test_zero3_sharded.py). Only safetensors weights can be read this way; `model.sharded_init=false` builds the
whole model first, as before.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

from mlcd_vl.model.build import (VLMSpec, check_composite_keys, composite_key, init_projector_and_newline,
                                 plan_vlm)
from mlcd_vl.model.gathered import full_shape, gathered, is_main_rank, is_partitioned, release_freed_memory

INDEX_FILE, SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"


def weight_files(source: str | Path) -> list[Path]:
    """The safetensors files of a model folder or hub id (its index's shards, or `model.safetensors`); a hub id is
    downloaded (weights and configs only), a bad path or a failed download is one line (`sources.local_folder`)."""
    from mlcd_vl.model.sources import local_folder

    folder = local_folder(source, allow_patterns=["*.safetensors", INDEX_FILE, "*.json"])
    if (folder / INDEX_FILE).is_file():
        names = json.loads((folder / INDEX_FILE).read_text())["weight_map"].values()
        return [folder / name for name in sorted(set(names))]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    raise ValueError(f"{source}: no {SINGLE_FILE} or {INDEX_FILE}; ZeRO-3 sharded initialisation reads safetensors "
                     "weights only (model.sharded_init=false builds the whole model and reads other formats)")


def persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The buffers that belong in a state dict (transformers' rotary `inv_freq` and the like do not)."""
    found = {}
    for module_name, module in model.named_modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                found[f"{module_name}.{name}" if module_name else name] = buffer
    return found


def model_names(model: torch.nn.Module) -> list[str]:
    """Every parameter name (tied aliases included) and persistent buffer name, in the module's order."""
    return [name for name, _ in model.named_parameters(remove_duplicate=False)] + list(persistent_buffers(model))


def source_keys(files: list[Path], model: torch.nn.Module) -> dict[str, tuple[Path, str]]:
    """The model's names -> (file, key) of the files' tensors, renamed as transformers' `from_pretrained` would for
    this model's class; tensors the model has no place for are left out (as `from_pretrained` ignores them)."""
    from safetensors import safe_open
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    expected = dict.fromkeys(model_names(model), True)
    found: dict[str, tuple[Path, str]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                name, converter = rename_source_key(key, renamings, converters,
                                                    base_model_prefix=model.base_model_prefix,
                                                    meta_state_dict=expected)
                if converter is not None:
                    raise ValueError(f"{file}: {key} needs transformers' weight conversion {converter!r}, which "
                                     "sharded initialisation does not apply (set model.sharded_init=false)")
                if name in expected:
                    found.setdefault(name, (file, key))
    return found


def load_partitioned(model: torch.nn.Module, sources: dict[str, tuple[Path, str]]) -> list[str]:
    """Copy the `sources` tensors into `model` one at a time (a partitioned parameter gathered for its copy, rank 0
    reading the value; buffers and ordinary parameters on every rank). Returns the parameter names left unset.

    Each tensor's file is opened for that tensor only: `get_tensor` maps the file and the pages it touches stay
    resident while the file is open, so an open handle would end up holding the whole file. The host memory freed by
    each gather is handed back at once (`release_freed_memory`), so the peak is the partition plus one tensor."""
    from safetensors import safe_open

    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    reader = is_main_rank()
    done: set[int] = set()
    for name in model_names(model):
        target = params.get(name, buffers.get(name))
        if name not in sources or id(target) in done:  # a tied alias is loaded once, under its first name
            continue
        file, key = sources[name]
        with safe_open(str(file), framework="pt") as handle:
            shape = tuple(handle.get_slice(key).get_shape())
            if shape != full_shape(target):
                raise ValueError(f"{file}: {key} has shape {list(shape)}, the model's {name} needs "
                                 f"{list(full_shape(target))}")
            if is_partitioned(target):
                with gathered([target], modifier_rank=0), torch.no_grad():
                    if reader:
                        target.copy_(handle.get_tensor(key))
            else:
                with torch.no_grad():
                    target.copy_(handle.get_tensor(key))
        release_freed_memory()
        done.add(id(target))
    return [name for name, param in params.items() if id(param) not in done]


def zero_init_dtype(ds_config: dict) -> torch.dtype:
    """The dtype `deepspeed.zero.Init` gives parameters under this JSON (its bf16 / fp16 sections)."""
    if ds_config.get("bf16", {}).get("enabled") is True:
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled") is True:
        return torch.float16
    return torch.float32


def compose_partitioned(config, ds_config: dict) -> torch.nn.Module:
    """The composite of `config` created under `deepspeed.zero.Init`, its weights not initialised."""
    import deepspeed
    from transformers.initialization import no_init_weights
    from transformers.integrations import is_deepspeed_zero3_enabled
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    if is_deepspeed_zero3_enabled():  # transformers would nest its own zero.Init and initialise every weight
        raise RuntimeError("compose the partitioned model before transformers' DeepSpeed integration is active "
                           "(before the Accelerator is created)")
    if not deepspeed.comm.is_initialized():  # DeepSpeed's view of the process group (its JSON checks the world size)
        import torch.distributed as dist

        deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else None)
    with no_init_weights(), prevent_arange_dtype_change(), _partitioning_init(ds_config):
        return AutoModelForImageTextToText.from_config(config, dtype=zero_init_dtype(ds_config))


def _partitioning_init(ds_config: dict):
    """`deepspeed.zero.Init` that hands each module's whole-parameter memory back to the system once it is
    partitioned (each module is built whole, then partitioned by DeepSpeed's post-init hook; without the release
    the freed blocks would pile up on the host, `model.gathered`)."""
    import deepspeed

    class ReleasingInit(deepspeed.zero.Init):
        def _post_init_method(self, module):
            super()._post_init_method(module)
            if next(module.parameters(recurse=False), None) is not None:
                release_freed_memory()

    return ReleasingInit(config_dict_or_path=ds_config)


@contextlib.contextmanager
def transformers_zero3(ds_config: dict):
    """transformers' DeepSpeed integration active for the block (its ZeRO-3 paths, e.g. in resizing embeddings)."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    active = HfDeepSpeedConfig(ds_config)  # noqa: F841  (transformers keeps only a weak reference)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def _meta_model(model_class, config) -> torch.nn.Module:
    """An instance on the meta device: its class's key renaming and names, no memory."""
    with torch.device("meta"):
        return model_class.from_config(config)


def llm_generation_config(path: str, llm_config) -> GenerationConfig:
    """The generation config `from_pretrained` gives the LLM: its generation_config.json, else from its config."""
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return GenerationConfig.from_model_config(llm_config)


def build_vlm_partitioned(spec: VLMSpec, ds_config: dict):
    """`build_vlm(spec)` under ZeRO-3 (module docstring); every rank calls it at once. Returns (model, tokenizer,
    settings)."""
    plan = plan_vlm(spec)
    sources: dict[str, tuple[Path, str]] = {}
    for part, path, model_class, part_config in (("llm", plan.llm_path, AutoModelForCausalLM, plan.llm_config),
                                                 ("tower", plan.tower_path, AutoModel, plan.tower_config)):
        found = source_keys(weight_files(path), _meta_model(model_class, part_config))
        sources.update({composite_key(part, name): where for name, where in found.items()
                        if composite_key(part, name) is not None})
    model = compose_partitioned(plan.composite_config(), ds_config)
    check_composite_keys(load_partitioned(model, sources))
    if plan.resize_to is not None:
        import deepspeed

        with transformers_zero3(ds_config):
            model.resize_token_embeddings(plan.resize_to)
        deepspeed.zero.Init(module=model, config_dict_or_path=ds_config)  # the grown embeddings partitioned too
    init_projector_and_newline(model, spec.seed)
    model.generation_config = llm_generation_config(plan.llm_path, plan.llm_config)
    model.tie_weights()
    return model, plan.tokenizer, plan.settings


def load_vlm_partitioned(folder: str | Path, ds_config: dict):
    """An HF-native VLM folder loaded partitioned under ZeRO-3 (`checkpoint.load_vlm`'s checks and tokenizer);
    every rank calls it at once. Returns (model, tokenizer, settings)."""
    from mlcd_vl.model.checkpoint import CheckpointError, check_model_type, checkpoint_tokenizer

    config = AutoConfig.from_pretrained(folder)
    settings = check_model_type(folder, config)
    model = compose_partitioned(config, ds_config)
    try:
        missing = load_partitioned(model, source_keys(weight_files(folder), model))
    except ValueError as error:
        raise CheckpointError(f"{folder}: {error}") from None
    if missing:
        raise CheckpointError(f"{folder}: {len(missing)} tensor(s) of the {config.model_type} model are missing from "
                              f"the file, e.g. {missing[:5]}")
    if (Path(folder) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model, checkpoint_tokenizer(folder, model.config, settings), settings
