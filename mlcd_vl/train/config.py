"""The training configuration: typed dataclasses, loaded from a YAML recipe plus dotted command-line overrides.

    config = load_config("configs/recipes/mlcd_bigG448_stage2.yaml", ["optim.lr=2e-5", "batch.grad_accum=4"])
    save_resolved(config, config.output_dir)        # writes <output_dir>/train_config.yaml

Every key of a recipe or an override must name a field; an unknown key or a value of the wrong type is a
`ConfigError` that names the dotted key (and suggests the closest known one). Values are coerced by the field's
type only where that is unambiguous: "1e-3" becomes a float (PyYAML reads `1e-3` as a string), "q_proj,v_proj"
a list of strings, "None" / "null" None for optional fields. The resolved config (defaults filled in, stage
learning rate chosen) is written back as YAML and loads again to an equal config.

Defaults follow the upstream MLCD recipe (upstream's scripts) with two visible departures, each a single setting
that reproduces upstream when set: `optim.max_grad_norm` 1.0 (upstream silently trained unclipped: 0 or None),
`optim.loss_normalisation` "global" (token mean over the whole optimizer step; "upstream" = per-micro-batch mean).
The README's "same experiment as upstream" lists every switch that restores upstream's optimizer step.
`model.llm` / `model.tower` take a preset name, hub id or folder; the value `tiny` means the locally written tiny
preset (`mlcd_vl.model.tiny`).

Each section is the config of the part that uses it: `data` is `mlcd_vl.data.config.DataConfig` itself, so a recipe's
`data:` keys are that class's fields. What a recipe's values mean for a run is decided once, by `TrainConfig`'s
properties: the stage (`stage1`), the attention the model gets (`attention`, `text_attention`) and whether packed
rows need the 4D block mask (`packed_4d_mask`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from mlcd_vl.data.config import DataConfig
from mlcd_vl.errors import UsageError

RESOLVED_CONFIG_FILE = "train_config.yaml"
TUNABLE_PARTS = ("mm_mlp_adapter", "mm_vision_tower", "mm_language_model")
STAGE1_LR, STAGE2_LR = 1e-3, 1e-5
# The overrides that make our optimizer step upstream's where we differ on purpose (README "Same experiment as
# upstream"); tests/test_upstream_trajectory.py replays upstream's own trainer with these and the run's settings.
UPSTREAM_STEP_OVERRIDES = ("optim.loss_normalisation=upstream", "data.label_mode=upstream", "optim.max_grad_norm=0",
                           "optim.no_decay_rule=upstream", "data.upstream_image_convert=true")


class ConfigError(UsageError, ValueError):
    """A recipe or override that does not fit the config; the message names the dotted key."""


@dataclass
class ModelConfig:
    llm: str = "Qwen/Qwen2.5-7B-Instruct"
    tower: str = "DeepGlint-AI/mlcd-vit-bigG-patch14-448"
    image_mode: str = "anyres"  # square | pad | anyres | anyres_max_N
    merge_type: str = "spatial_unpad"  # flat (square/pad) | spatial_unpad (anyres)
    pinpoints: list[list[int]] | str | None = None  # (width, height) pairs or "(1x1),...,(3x3)"; None: preset grid
    template: str = "qwen_1_5"
    init_from: str | None = None  # stage-1 projector artifact (folder or file) or a checkpoint folder
    checkpoint: str | None = None  # an HF-native VLM folder to continue from (all weights, tokenizer, image settings)
    allow_pickle: bool = False  # permit pickle (weights_only=True): upstream's mm_projector.bin, DFN5B's OpenCLIP tower
    attn_implementation: str = "sdpa"  # sdpa (packed rows: per-sample sdpa_varlen) | sdpa_varlen | eager | flash_attention_2
    # ZeRO-3 only: build the VLM partitioned (zero.Init + safetensors read tensor by tensor, `model.sharded`); false
    # builds the whole fp32 model on every rank first (more host memory per rank; reads any weight format)
    sharded_init: bool = True


@dataclass
class OptimConfig:
    lr: float | None = None  # None: 1e-3 when only the projector trains (stage 1), else 1e-5
    vision_tower_lr: float | None = 2e-6  # None: lr
    projector_lr: float | None = None  # None: lr
    weight_decay: float = 0.0  # when > 0, the no_decay_rule's parameters are not decayed
    no_decay_rule: str = "default"  # default (biases, 1-D tensors) | upstream (biases, nn.LayerNorm; LLaVATrainer)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    lr_scheduler: str = "cosine"  # cosine | linear | constant_with_warmup
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None  # when > 0, overrides warmup_ratio (as transformers' TrainingArguments)
    max_grad_norm: float | None = 1.0  # 0 or None: no clipping (upstream's MLCD runs)
    loss_normalisation: str = "global"  # global (tokens of the whole step) | upstream (per micro-batch mean)
    loss_impl: str = "auto"  # full | chunked | liger | auto (chunked above loss_chunk_tokens where that saves memory)
    loss_chunk_tokens: int = 1024  # LM-head positions per loss chunk (bounds the logits' memory), auto's threshold
    num_epochs: float = 1.0
    max_steps: int | None = None  # overrides num_epochs when set


@dataclass
class BatchConfig:
    per_device_batch_size: int = 2
    grad_accum: int = 8
    global_batch_size: int | None = None  # when set, the run checks per_device x world x grad_accum against it

    def global_batch(self, world_size: int) -> int:
        return self.per_device_batch_size * world_size * self.grad_accum

    def describe(self, world_size: int) -> str:
        return (f"global batch {self.global_batch(world_size)} = {self.per_device_batch_size} per device x "
                f"{world_size} process(es) x {self.grad_accum} accumulation step(s)")

    def check(self, world_size: int) -> None:
        if self.global_batch_size is not None and self.global_batch(world_size) != self.global_batch_size:
            raise ConfigError(f"batch.global_batch_size: the recipe expects {self.global_batch_size} but "
                              f"{self.describe(world_size)}; change batch.grad_accum or batch.per_device_batch_size")


@dataclass
class LoraConfig:
    """LoRA on the language model (PEFT); off by default, as upstream's MLCD recipe."""

    enabled: bool = False
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tunable_parts: str = "mm_vision_tower,mm_mlp_adapter,mm_language_model"  # upstream's mm_tunable_parts
    batch: BatchConfig = field(default_factory=BatchConfig)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    gradient_checkpointing: bool = True
    deepspeed: str | None = None  # a JSON config, e.g. configs/deepspeed/zero3.json
    output_dir: str = "checkpoints/run"
    seed: int = 42
    logging_steps: int = 1
    save_steps: int | None = None  # None: only the final save
    save_total_limit: int | None = None
    save_upstream_projector: bool = False  # stage 1: also write upstream's pickled mm_projector.bin
    resume: str = "latest"  # latest (newest checkpoint in output_dir, if any) | never | a checkpoint folder
    report_to: str = "none"  # none | tensorboard | wandb
    lora: LoraConfig = field(default_factory=LoraConfig)

    @property
    def tunable_parts_list(self) -> list[str]:
        return [part.strip() for part in self.tunable_parts.split(",") if part.strip()]

    @property
    def stage1(self) -> bool:
        """Stage 1 = only the projector trains (upstream's pretraining)."""
        return self.tunable_parts_list == ["mm_mlp_adapter"]

    @property
    def attention(self) -> str | dict:
        """What the composite's `set_attn_implementation` gets: packed rows on plain SDPA run `sdpa_varlen`."""
        from mlcd_vl.model.varlen import composite_attention

        return composite_attention(self.model.attn_implementation, self.data.packing)

    @property
    def text_attention(self) -> str:
        """The language model's attention implementation (what packed rows meet)."""
        return self.attention["text_config"] if isinstance(self.attention, dict) else self.attention

    @property
    def packed_4d_mask(self) -> bool:
        """Whether packed rows need the O(T^2) block-diagonal mask (the attention cannot bound samples itself)."""
        from mlcd_vl.model.varlen import MASK_FREE_IMPLEMENTATIONS

        return self.data.packing and self.text_attention not in MASK_FREE_IMPLEMENTATIONS

    def precision_for(self, device_type: str) -> str:
        """The precision actually used on a device type ("cuda" or "cpu")."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if device_type == "cuda" else "fp32"


CHOICES = {
    "optim.lr_scheduler": ("cosine", "linear", "constant_with_warmup"),
    "optim.loss_normalisation": ("global", "upstream"),
    "optim.no_decay_rule": ("default", "upstream"),
    "optim.loss_impl": ("auto", "full", "chunked", "liger"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "report_to": ("none", "tensorboard", "wandb"),
    "model.merge_type": ("flat", "spatial_unpad"),
}
NONE_STRINGS = ("None", "none", "null", "~")


# ----------------------------------------------------------------------------------------------------------------
# Coercion of plain YAML values into the typed dataclasses
# ----------------------------------------------------------------------------------------------------------------


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value in NONE_STRINGS)):
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                errors.append(_type_name(option))
        raise ConfigError(f"{key}: expected {' or '.join(errors + (['None'] if type(None) in args else []))}, "
                          f"got {value!r} ({type(value).__name__})")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {hint.__name__} fields, got {value!r}")
        return _build(hint, value, key)
    if origin is list:
        if isinstance(value, str) and args and args[0] is str:
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
        return [_coerce(item, args[0], f"{key}[{index}]") if args else item for index, item in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{key}: unsupported field type {hint!r}")
    raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def _unknown_key(key: str, known: Sequence[str]) -> ConfigError:
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {key[: -len(name)]}{close[0]}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (known here: {', '.join(known)})")


def _build(cls: type, data: dict, prefix: str) -> Any:
    """An instance of dataclass `cls` from defaults updated by `data` (strict keys, coerced types)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise _unknown_key(f"{prefix}.{key}" if prefix else str(key), names)
    defaults = cls()
    kwargs = {}
    for name in names:
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            kwargs[name] = getattr(defaults, name)
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _coerce(data[name] if data[name] is not None else {}, hints[name], key)
        else:
            kwargs[name] = _coerce(data[name], hints[name], key)
    try:
        return cls(**kwargs)
    except ValueError as error:  # the section's own checks (`DataConfig.__post_init__`)
        raise ConfigError(f"{prefix or 'config'}: {error}") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Place `value` at `a.b.c` in a nested dict, creating levels; keys are checked later by `_build`."""
    node = tree
    parts = dotted.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {'.'.join(parts[:depth + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`optim.lr=2e-5` -> ("optim.lr", "2e-5" coerced later); values are read as YAML scalars or lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    dotted = dotted.strip().removeprefix("--")
    if not dotted:
        raise ConfigError(f"override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return dotted, value


# ----------------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------------


def validate(config: TrainConfig) -> TrainConfig:
    """Choices, ranges and cross-field rules; fills the stage learning rate. Returns the same config."""
    from mlcd_vl.model import anyres

    for dotted, allowed in CHOICES.items():
        value = config
        for part in dotted.split("."):
            value = getattr(value, part)
        if value not in allowed:
            raise ConfigError(f"{dotted}: {value!r} is not one of {', '.join(allowed)}")
    try:
        anyres.validate_image_mode(config.model.image_mode, config.model.merge_type)
    except ValueError as error:
        raise ConfigError(f"model.image_mode / model.merge_type: {error}") from None
    if config.model.pinpoints is not None:
        try:
            anyres.parse_pinpoints(config.model.pinpoints, 1)
        except ValueError as error:
            raise ConfigError(f"model.pinpoints: {error}") from None
    parts = config.tunable_parts_list
    if not parts or any(part not in TUNABLE_PARTS for part in parts):
        raise ConfigError(f"tunable_parts: {config.tunable_parts!r}; use a comma-separated subset of "
                          f"{', '.join(TUNABLE_PARTS)}")
    positive = {"batch.per_device_batch_size": config.batch.per_device_batch_size,
                "batch.grad_accum": config.batch.grad_accum, "logging_steps": config.logging_steps,
                "lora.r": config.lora.r, "optim.loss_chunk_tokens": config.optim.loss_chunk_tokens}
    for dotted, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{dotted}: must be positive, got {value}")
    if not 0.0 <= config.optim.warmup_ratio < 1.0:
        raise ConfigError(f"optim.warmup_ratio: must lie in [0, 1), got {config.optim.warmup_ratio}")
    if len(config.optim.adam_betas) != 2:
        raise ConfigError(f"optim.adam_betas: expected two values, got {config.optim.adam_betas}")
    if config.optim.warmup_steps is not None and config.optim.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps: must not be negative, got {config.optim.warmup_steps}")
    if config.model.checkpoint and config.model.init_from:
        raise ConfigError("model.init_from: a run continuing from model.checkpoint already has its projector")
    if config.optim.lr is None:
        config.optim.lr = STAGE1_LR if config.stage1 else STAGE2_LR
    return config


def config_from_dict(data: dict | None) -> TrainConfig:
    """A validated config from a nested dict (defaults for what it leaves out)."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"a training recipe must be a mapping of sections, got {type(data).__name__}")
    return validate(_build(TrainConfig, data or {}, ""))


def load_config(recipe: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults <- YAML recipe <- `section.key=value` overrides, validated."""
    data: dict = {}
    if recipe is not None:
        try:
            data = yaml.safe_load(Path(recipe).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{recipe}: recipe not found") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{recipe}: not valid YAML ({error})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{recipe}: a recipe must be a mapping of sections")
    for text in overrides:
        try:
            dotted, value = parse_override(text)
            _set_dotted(data, dotted, value)
        except ConfigError as error:
            raise ConfigError(f"override {text!r}: {error}") from None
    try:
        return config_from_dict(data)
    except ConfigError as error:
        where = f"{recipe}" + (" + overrides" if overrides else "") if recipe else "overrides"
        raise ConfigError(f"{where}: {error}") from None


def config_to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def save_resolved(config: TrainConfig, output_dir: str | Path) -> Path:
    """Write the resolved config as `<output_dir>/train_config.yaml`; `load_config(path)` gives it back."""
    path = Path(output_dir) / RESOLVED_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# resolved training config written by mlcd_vl.train.config\n"
                    + yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False))
    return path
