"""LoRA on the language model (PEFT), merged back on export so the saved folder is a plain HF-native model.

The recipe's `lora` section (`enabled`, `r`, `alpha`, `dropout`, `target_modules`) puts LoRA adapters on the
named linear layers of the LLM only (`model.language_model.*`; the tower's and projector's layers never match).
`tunable_parts` still decides the rest: with LoRA, `mm_language_model` means "the LLM's adapters" (its base
weights, embeddings and LM head stay frozen; `image_newline`, a new parameter, still trains), the projector trains
fully with `mm_mlp_adapter`, the vision tower only with `mm_vision_tower`.

The adapters are injected in place (`peft.LoraModel` over the VLM, no `PeftModel` wrapper), so the training forward,
checkpoints (`accelerator.save_state` holds the adapter weights under their PEFT names) and resume are those of an
ordinary run; `merge` folds them into the base weights (`merge_and_unload`) before the final save.
"""

from __future__ import annotations

import re

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


def apply_lora(model: nn.Module, config: LoraConfig, tunable_parts: list[str]):
    """Inject adapters into `model` in place, after `optim.apply_tunable_parts`; returns the PEFT tuner."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import LoraModel

    if "mm_language_model" not in tunable_parts:
        raise ConfigError("lora.enabled: LoRA trains the language model; add mm_language_model to tunable_parts")
    before = {name: param.requires_grad for name, param in model.named_parameters()}
    peft_config = PeftLoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                 target_modules=target_pattern(config.target_modules), bias="none")
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
