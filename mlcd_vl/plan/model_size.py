"""The recipe's composite built on the meta device: exact parameter counts and the shapes the memory model needs.

The LLM and tower configs come from `architectures` for the presets (no download) or from a local folder / the HF
cache; the composite is `build.compose_config` + `from_config` under `torch.device("meta")` (no memory, no weights),
the same class training builds. What trains is decided by training's own code on that model:
`optim.apply_tunable_parts`, `optim.freeze_unreached` and, with `lora.enabled`, `lora.apply_lora`, so the trainable
count is the one `mlcd-vl train` prints.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

from mlcd_vl.errors import UsageError
from mlcd_vl.plan import architectures

PARTS = ("vision_tower", "projector", "language_model")


class PlanInputError(UsageError, ValueError):
    """A recipe whose models cannot be sized here; the message names the model."""


@dataclass(frozen=True)
class LLMShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int  # rows of the LM head: the logits per token

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class TowerShape:
    hidden: int
    intermediate: int
    layers_used: int  # encoder layers whose output reaches the projector (vision_feature_layer)
    heads: int
    tokens_per_crop: int  # patches + CLS
    crop_size: int
    patch_size: int
    rotary: bool = False  # MLCD's 2D RoPE (fp32, with a trainable class position embedding)


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts per part (total, trainable) and the dimensions activations depend on."""

    total: dict[str, int]
    trainable: dict[str, int]
    llm: LLMShape
    tower: TowerShape
    projector_in: int
    projector_out: int
    model_class: str
    param_numels: tuple[int, ...] = field(repr=False, default=())  # every parameter tensor (ZeRO-3 partitions)
    optimizer_groups: tuple[tuple[int, ...], ...] = field(repr=False, default=())  # trainable sizes per group
    largest_module: int = 0  # direct parameters of the largest module (ZeRO-3 gathers a module at a time)
    lm_head: object = field(repr=False, compare=False, default=None)  # the meta head the loss is decided on
    head_trainable: int = 0  # trainable parameters of the LM head

    @property
    def params(self) -> int:
        return sum(self.total.values())

    @property
    def trainable_params(self) -> int:
        return sum(self.trainable.values())

    def trains(self, part: str) -> bool:
        return self.trainable[part] > 0

    def to_dict(self) -> dict:
        return {"class": self.model_class, "parameters": self.total, "trainable": self.trainable,
                "llm": self.llm.__dict__, "tower": self.tower.__dict__,
                "projector": {"in": self.projector_in, "out": self.projector_out},
                "largest_module_parameters": self.largest_module}


def _resolve(config) -> tuple[str, str]:
    """(llm, tower) as hub ids or folders; `tiny` is written (once) where training would find it with
    `$MLCD_VL_TINY_DIR` set, else in the temporary folder (a plan writes nothing into the run's output folder)."""
    from mlcd_vl import presets
    from mlcd_vl.train.models import resolve_sources

    llm, tower = resolve_sources(config, tiny_root=os.path.join(tempfile.gettempdir(), "mlcd_vl_tiny"))
    return presets.resolve_llm(llm), presets.resolve_tower(tower)


def _auto_config(source: str, what: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise PlanInputError(f"{what} {source!r}: no preset architecture and no readable config.json "
                             f"(give a local folder or a preset; {type(error).__name__})") from None


def _llm_config_and_image_token(source: str):
    """(text config, id of `<image>`); a preset needs nothing on disk, a folder's tokenizer is read."""
    config = architectures.llm_config(source)
    if config is not None:
        return config, architectures.LLM_TOKENIZER_SIZES[source]
    config = _auto_config(source, "LLM")
    from transformers import AutoTokenizer

    from mlcd_vl.vocab import IMAGE_PLACEHOLDER

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        return config, config.vocab_size - 1  # no tokenizer at hand: assume `<image>` fits the embeddings
    vocab = tokenizer.get_vocab()
    return config, vocab[IMAGE_PLACEHOLDER] if IMAGE_PLACEHOLDER in vocab else len(tokenizer)


def _tower_config(source: str):
    config = architectures.tower_config(source)
    if config is None:
        config = _auto_config(source, "vision tower")
        config = getattr(config, "vision_config", None) or config  # a full CLIP / SigLIP model keeps its tower
    return config


def build_meta_model(config):
    """The composite for `config` (a TrainConfig) on the meta device, frozen as training freezes it: from the
    recipe's LLM and tower with `build_vlm`'s image settings, or the `model.checkpoint` folder's own config."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from mlcd_vl import presets
    from mlcd_vl.model.build import VLMSpec, compose_config, image_settings
    from mlcd_vl.train import optim

    if config.model.checkpoint:
        from mlcd_vl.model.checkpoint import read_settings

        try:
            composite, settings = AutoConfig.from_pretrained(config.model.checkpoint), \
                read_settings(config.model.checkpoint)
        except (OSError, ValueError, KeyError) as error:
            raise PlanInputError(f"model.checkpoint {config.model.checkpoint!r}: not a saved mlcd-vl model folder "
                                 f"({type(error).__name__})") from None
    else:
        llm_source, tower_source = _resolve(config)
        text_config, image_token_id = _llm_config_and_image_token(llm_source)
        if image_token_id >= text_config.vocab_size:  # build_vlm resizes the embeddings to the tokenizer
            text_config.vocab_size = image_token_id + 1
        vision_config = _tower_config(tower_source)
        spec = VLMSpec(llm=config.model.llm, tower=config.model.tower, image_mode=config.model.image_mode,
                       merge_type=config.model.merge_type, pinpoints=config.model.pinpoints,
                       template=config.model.template)
        try:
            settings, strategy, layer = image_settings(spec, vision_config, tower_source,
                                                       presets.tower_preset(config.model.tower))
        except ValueError as error:  # a tower that does not fit its preset
            raise PlanInputError(str(error)) from None
        composite = compose_config(text_config, vision_config, settings, image_token_id, select_strategy=strategy,
                                   select_layer=layer)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(composite)
    optim.apply_tunable_parts(model, config.tunable_parts)
    optim.freeze_unreached(model)
    if config.lora.enabled:
        from mlcd_vl.train import lora

        with torch.device("meta"):
            lora.apply_lora(model, config.lora, config.tunable_parts_list, config.seed)
    return model, settings


def measure(model, settings, optim_config) -> ModelShape:
    """Counts and shapes of a built composite (meta or real); `optim_config` makes the optimizer groups."""
    from mlcd_vl.train import optim

    summary = optim.parameter_summary(model)
    text, vision = model.config.text_config, model.config.vision_config
    layers = vision.num_hidden_layers
    selected = model.config.vision_feature_layer
    selected = selected if isinstance(selected, (list, tuple)) else [selected]
    layers_used = max(index % (layers + 1) for index in selected)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    lm_head = model.lm_head  # the module training's loss runs (`step.forward_loss`)
    projector = model.model.multi_modal_projector
    numels = tuple(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
    groups = tuple(tuple(int(getattr(p, "ds_numel", p.numel())) for p in group["params"])
                   for group in optim.build_param_groups(model, optim_config))
    largest = max(sum(int(p.numel()) for p in module.parameters(recurse=False)) for module in model.modules())
    cls_token = 0 if model.config.vision_feature_select_strategy == "full" else 1
    return ModelShape(
        total={part: summary[part].total for part in PARTS},
        trainable={part: summary[part].trainable for part in PARTS},
        llm=LLMShape(hidden=text.hidden_size, intermediate=text.intermediate_size, layers=text.num_hidden_layers,
                     heads=text.num_attention_heads,
                     kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
                     head_dim=head_dim, vocab=int(lm_head.weight.shape[0])),
        tower=TowerShape(hidden=vision.hidden_size, intermediate=vision.intermediate_size, layers_used=layers_used,
                         heads=vision.num_attention_heads,
                         tokens_per_crop=(settings.crop_size // settings.patch_size) ** 2 + cls_token,
                         crop_size=settings.crop_size, patch_size=settings.patch_size,
                         rotary=vision.model_type == "mlcd_vision_model"),
        projector_in=projector.linear_1.in_features, projector_out=projector.linear_2.out_features,
        model_class=type(model).__name__, param_numels=numels,
        optimizer_groups=groups, largest_module=largest, lm_head=lm_head,
        head_trainable=sum(int(getattr(p, "ds_numel", p.numel())) for p in lm_head.parameters() if p.requires_grad))


def model_shape(config) -> tuple[ModelShape, object]:
    """(ModelShape, VLMSettings) of a TrainConfig's composite."""
    model, settings = build_meta_model(config)
    return measure(model, settings, config.optim), settings
