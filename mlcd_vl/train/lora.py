"""LoRA on the language model (PEFT), merged back on export so the saved folder is a plain HF-native model.

The recipe's `lora` section (`enabled`, `r`, `alpha`, `dropout`, `target_modules`) puts LoRA adapters on the
named linear layers of the LLM only (`model.language_model.*`; the tower's and projector's layers never match).
`tunable_parts` still decides the rest: with LoRA, `mm_language_model` means "the LLM's adapters" (its base
weights, embeddings and LM head stay frozen; `image_newline`, a new parameter, still trains), the projector trains
fully with `mm_mlp_adapter`, the vision tower only with `mm_vision_tower`.

The adapters are injected in place (`peft.LoraModel` over the VLM, no `PeftModel` wrapper), so the training forward,
checkpoints (`accelerator.save_state` holds the adapter weights under their PEFT names; under DeepSpeed the engine's
checkpoint) and resume are those of an ordinary run. Before the final save the adapters are folded into the base
weights, so the saved folder is the plain model:

* `merge`: PEFT's `merge_and_unload` on the module, when it holds its weights (one process, DDP, ZeRO-1/2);
* under ZeRO-3 the module's parameters are partitioned (empty on every rank), so the merge is done on the tensors as
  the final save streams them (`train.zero.save_streamed`): `merged_layout` says which PEFT tensors make each tensor
  of the plain model, `merge_state_dict` merges one layer's (W = W_base + (B @ A) * scaling, PEFT's own per-layer
  scaling), and the module is only un-injected afterwards (`unload`) so its structure is the plain model's again.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from mlcd_vl.train.config import ConfigError, LoraConfig
from mlcd_vl.train.optim import module_part

ADAPTER = "default"
LLM_PREFIX = "model.language_model."
TRAINS_WITH_LLM = ("model.image_newline",)  # language-model part, but new: trains with adapters too


def target_pattern(target_modules: list[str]) -> str:
    """A PEFT `target_modules` regex (full match on module names) restricted to the language model."""
    names = "|".join(re.escape(name) for name in target_modules)
    return rf"{re.escape(LLM_PREFIX)}.*\.({names})"


def apply_lora(model: nn.Module, config: LoraConfig, tunable_parts: list[str], seed: int = 0):
    """Inject adapters into `model` (on the CPU) in place, after `optim.apply_tunable_parts`; returns the PEFT tuner.

    The adapters' random init (lora_A) is drawn from the CPU RNG seeded with `seed` and the global RNG state is
    restored afterwards, so it does not depend on what the process drew before (only the main process writes the
    tiny preset, say) and the rest of the run draws what it would without LoRA.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import LoraModel

    if "mm_language_model" not in tunable_parts:
        raise ConfigError("lora.enabled: LoRA trains the language model; add mm_language_model to tunable_parts")
    before = {name: param.requires_grad for name, param in model.named_parameters()}
    peft_config = PeftLoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                 target_modules=target_pattern(config.target_modules), bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tuner = LoraModel(model, peft_config, ADAPTER)
    adapters = 0
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.requires_grad_(True)
            adapters += 1
            continue
        base_name = name.replace(".base_layer.", ".")
        llm_base = module_part(base_name) == "language_model" and base_name not in TRAINS_WITH_LLM
        param.requires_grad_(before.get(base_name, False) and not llm_base)
    if not adapters:
        raise ConfigError(f"lora.target_modules: {config.target_modules} match no layer of the language model")
    return tuner


def merge(tuner) -> nn.Module:
    """Fold the adapters into the base weights and remove them; returns the plain VLM (the same object)."""
    return tuner.merge_and_unload()


def layer_scalings(model: nn.Module, adapter: str = ADAPTER) -> dict[str, float]:
    """PEFT's scaling of each adapted layer, by module name: `lora_alpha / r` (`/ sqrt(r)` with rsLoRA), read from
    the layers themselves rather than recomputed, so the tensor merge uses exactly what the forward used."""
    from peft.tuners.lora import LoraLayer

    return {name: module.scaling[adapter] for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and adapter in module.scaling}


def merge_state_dict(state: dict[str, torch.Tensor], scalings: dict[str, float],
                     adapter: str = ADAPTER) -> dict[str, torch.Tensor]:
    """The plain model's state dict from one with injected adapters (PEFT names), as `merge_and_unload` would give.

    For every adapted layer `L` (a key of `scalings`): `L.weight = L.base_layer.weight + (B @ A) * scaling` with
    `A = L.lora_A.<adapter>.weight`, `B = L.lora_B.<adapter>.weight`; the lora tensors are dropped and the other
    `L.base_layer.*` tensors (the bias) renamed to `L.*`. Dropout plays no part in a merge. The merged weights are
    updated in place in `state`'s tensors (as PEFT updates the module's), so no second copy of the language model is
    held: `state` is consumed. A lora tensor of no listed layer, or a listed layer without its A/B, is an error.
    """
    merged: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, tensor in state.items():
        if ".lora_" in key:
            continue
        layer, found, name = key.rpartition(".base_layer.")
        if not found:
            merged[key] = tensor
            continue
        if layer not in scalings:
            raise ValueError(f"{key}: a base layer with no adapter scaling (not an adapted layer?)")
        if name == "weight":
            lora_a, lora_b = f"{layer}.lora_A.{adapter}.weight", f"{layer}.lora_B.{adapter}.weight"
            if lora_a not in state or lora_b not in state:
                raise ValueError(f"{layer}: adapter {adapter!r} tensors missing from the state dict")
            # PEFT's arithmetic (get_delta_weight + `+=`), in fp32 for 16-bit tensors as PEFT does on CPU
            delta = (state[lora_b].float() @ state[lora_a].float()) * scalings[layer]
            tensor.add_(delta.to(tensor.dtype))
            used.update((lora_a, lora_b))
        merged[f"{layer}.{name}"] = tensor
    left = sorted(key for key in state if ".lora_" in key and key not in used)
    if left:
        raise ValueError(f"{len(left)} lora tensor(s) of no merged layer, e.g. {left[:3]}")
    return merged


def merged_layout(names: list[str], scalings: dict[str, float],
                  adapter: str = ADAPTER) -> list[tuple[str, list[str]]]:
    """The plain model's tensor names in the order of `names` (PEFT names), each with the tensors it is made from:
    an adapted layer's weight from its base weight and its A and B (to `merge_state_dict` together), any other
    tensor from itself (`base_layer.` dropped from its name). A lora tensor of no adapted layer is an error."""
    layout, used = [], set()
    for name in names:
        if ".lora_" in name:
            continue
        layer, found, rest = name.rpartition(".base_layer.")
        if not found:
            layout.append((name, [name]))
            continue
        if layer not in scalings:
            raise ValueError(f"{name}: a base layer with no adapter scaling (not an adapted layer?)")
        sources = [name] + ([f"{layer}.lora_A.{adapter}.weight", f"{layer}.lora_B.{adapter}.weight"]
                            if rest == "weight" else [])
        layout.append((f"{layer}.{rest}", sources))
        used.update(sources)
    left = sorted(name for name in names if ".lora_" in name and name not in used)
    if left:
        raise ValueError(f"{len(left)} lora tensor(s) of no merged layer, e.g. {left[:3]}")
    return layout
