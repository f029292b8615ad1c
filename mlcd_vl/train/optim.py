"""What trains and how fast: freezing by tunable parts, per-part learning rates, and the projector artifact.

Parts (upstream `mm_tunable_parts`, as its `train()` applies them), on transformers' module names:

| tunable part        | parameters                                                          |
|---------------------|---------------------------------------------------------------------|
| `mm_mlp_adapter`    | `model.multi_modal_projector.*`                                     |
| `mm_vision_tower`   | every parameter of `model.vision_tower.*`                           |
| `mm_language_model` | every other one: `model.language_model.*` (embeddings included),    |
|                     | `lm_head.*`, `model.image_newline`                                  |

A name belongs to a part by its dotted components, so wrappers that add prefixes (PEFT's `base_model.model.`)
keep working. Optimizer groups: the vision tower at `vision_tower_lr`, the projector at `projector_lr`, everything
else at `lr` (None = `lr`, as upstream); with weight decay > 0, the parameters `optim.no_decay_rule` exempts go to
a no-decay group of the same part: by default biases and 1-D tensors (norm weights, `image_newline`, class
embeddings); with "upstream", LLaVATrainer.create_optimizer's rule (transformers 4.44): names containing "bias" and
the parameters of `nn.LayerNorm` modules, so RMSNorm weights, `image_newline` and class embeddings are decayed.
Only trainable parameters enter the optimizer. Counts read `ds_numel` / `ds_shape` when present, so they are right
for ZeRO-3-partitioned models.

The projector artifact of stage 1 is `projector.safetensors` (keys `model.multi_modal_projector.linear_{1,2}.*`);
`load_projector` also reads upstream's pickled `mm_projector.bin` (keys `model.mm_projector.{0,2}.*`, only with
`allow_pickle=True`, then `torch.load(weights_only=True)`) and the projector of any HF-native checkpoint folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mlcd_vl.errors import UsageError
from mlcd_vl.model.gathered import full_shape, gathered
from mlcd_vl.model.upstream_format import PROJECTOR_FILE as UPSTREAM_PROJECTOR_FILE
from mlcd_vl.model.upstream_format import hf_to_upstream_key, upstream_to_hf_key
from mlcd_vl.train.config import TUNABLE_PARTS, OptimConfig

PART_OF_TUNABLE = {"mm_mlp_adapter": "projector", "mm_vision_tower": "vision_tower",
                   "mm_language_model": "language_model"}
PARTS = ("vision_tower", "projector", "language_model")
PROJECTOR_FILE = "projector.safetensors"
PROJECTOR_PREFIX = "model.multi_modal_projector."
PROJECTOR_KEYS = ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")


class ProjectorError(UsageError, ValueError):
    """A projector artifact that cannot be read or does not fit the model; the message names the file and key."""


def module_part(name: str) -> str:
    """'vision_tower', 'projector' or 'language_model' for a parameter name of the composite."""
    components = name.split(".")
    if "vision_tower" in components:
        return "vision_tower"
    if "multi_modal_projector" in components:
        return "projector"
    return "language_model"


def parse_tunable_parts(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
    parts = [p for p in parts if p]
    unknown = [p for p in parts if p not in TUNABLE_PARTS]
    if unknown or not parts:
        raise ValueError(f"tunable parts {spec!r}: use a comma-separated subset of {', '.join(TUNABLE_PARTS)}"
                         + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return parts


def _numel(param: torch.Tensor) -> int:
    return int(getattr(param, "ds_numel", param.numel()))


def _ndim(param: torch.Tensor) -> int:
    return len(getattr(param, "ds_shape", param.shape))


@dataclass
class PartCount:
    trainable: int = 0
    total: int = 0


def apply_tunable_parts(model: nn.Module, tunable_parts: str | list[str]) -> dict[str, PartCount]:
    """Freeze everything, then unfreeze the listed parts; returns the per-part parameter counts."""
    trainable_parts = {PART_OF_TUNABLE[p] for p in parse_tunable_parts(tunable_parts)}
    for name, param in model.named_parameters():
        param.requires_grad_(module_part(name) in trainable_parts)
    return parameter_summary(model)


def unreached_tower_parameters(model: nn.Module) -> list[str]:
    """Vision-tower parameters no loss can reach: encoder layers after `vision_feature_layer` (upstream reads layer
    -2, so the last layer never runs into the projector), `post_layernorm` and a pooling `head`.

    Upstream (DeepSpeed) left them trainable with zero gradients, which AdamW without weight decay never moves;
    DDP instead fails on parameters that get no gradient, so the recipe freezes them (`freeze_unreached`).
    """
    config = model.config
    layers = config.vision_config.num_hidden_layers
    selected = config.vision_feature_layer
    selected = selected if isinstance(selected, (list, tuple)) else [selected]
    last_used = max(index % (layers + 1) for index in selected)  # hidden_states[k] is the output of layer k - 1
    names = []
    for name, _ in model.named_parameters():
        components = name.split(".")
        if "vision_tower" not in components:
            continue
        tower = components[components.index("vision_tower") + 1:]
        if "post_layernorm" in tower or "head" in tower:
            names.append(name)
        elif "layers" in tower and tower[tower.index("layers") - 1] == "encoder":
            if int(tower[tower.index("layers") + 1]) >= last_used:
                names.append(name)
    return names


def freeze_unreached(model: nn.Module) -> list[str]:
    """Freeze `unreached_tower_parameters` (a no-op for stage 1, where the tower is frozen anyway)."""
    names = set(unreached_tower_parameters(model))
    frozen = []
    for name, param in model.named_parameters():
        if name in names and param.requires_grad:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def parameter_summary(model: nn.Module) -> dict[str, PartCount]:
    summary = {part: PartCount() for part in PARTS}
    for name, param in model.named_parameters():
        count = summary[module_part(name)]
        count.total += _numel(param)
        count.trainable += _numel(param) if param.requires_grad else 0
    return summary


def format_parameter_summary(summary: dict[str, PartCount]) -> str:
    lines = [f"{part:>15}: {c.trainable:>14,} trainable / {c.total:>14,}" for part, c in summary.items()]
    trainable, total = sum(c.trainable for c in summary.values()), sum(c.total for c in summary.values())
    lines.append(f"{'all':>15}: {trainable:>14,} trainable / {total:>14,} ({100 * trainable / max(total, 1):.2f}%)")
    return "\n".join(lines)


def part_learning_rates(optim: OptimConfig) -> dict[str, float]:
    base = optim.lr
    if base is None:
        raise ValueError("optim.lr is unset; load the config with mlcd_vl.train.config.load_config")
    return {"vision_tower": optim.vision_tower_lr if optim.vision_tower_lr is not None else base,
            "projector": optim.projector_lr if optim.projector_lr is not None else base,
            "language_model": base}


def layer_norm_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters that live in `nn.LayerNorm` modules (transformers 4.44's ALL_LAYERNORM_LAYERS)."""
    return {f"{module_name}.{name}" if module_name else name
            for module_name, module in model.named_modules() if isinstance(module, nn.LayerNorm)
            for name, _ in module.named_parameters()}


def no_decay_names(model: nn.Module, rule: str = "default") -> set[str]:
    """Parameters exempt from weight decay under `rule` ("default" or "upstream", see the module docstring)."""
    if rule == "upstream":
        return {name for name, _ in model.named_parameters() if "bias" in name} | layer_norm_parameters(model)
    if rule == "default":
        return {name for name, param in model.named_parameters() if name.endswith(".bias") or _ndim(param) < 2}
    raise ValueError(f"no-decay rule {rule!r} is not one of default, upstream")


def build_param_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """Optimizer groups named `<part>` or `<part>.no_decay`, each with its own lr; trainable parameters only."""
    rates = part_learning_rates(optim)
    exempt_names = no_decay_names(model, optim.no_decay_rule) if optim.weight_decay > 0 else set()
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = module_part(name)
        exempt = name in exempt_names
        key = f"{part}.no_decay" if exempt else part
        group = groups.setdefault(key, {"name": key, "params": [], "param_names": [], "lr": rates[part],
                                        "weight_decay": 0.0 if exempt else optim.weight_decay})
        group["params"].append(param)
        group["param_names"].append(name)
    order = [f"{part}{suffix}" for part in PARTS for suffix in ("", ".no_decay")]
    return [groups[key] for key in order if key in groups]


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """Torch AdamW over the part groups (no DeepSpeed optimizer block needed: DeepSpeed wraps this one)."""
    groups = build_param_groups(model, optim)
    if not groups:
        raise ValueError("no trainable parameters: check tunable_parts")
    for group in groups:
        group.pop("param_names")
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.adam_betas), eps=optim.adam_eps,
                             weight_decay=optim.weight_decay)


def warmup_steps(total_steps: int, warmup_ratio: float, fixed: int | None = None) -> int:
    """As transformers' TrainingArguments.get_warmup_steps: `fixed` when > 0, else ceil(total x ratio)."""
    return fixed if fixed else math.ceil(total_steps * warmup_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = warmup_steps(total_steps, optim.warmup_ratio, optim.warmup_steps)
    return get_scheduler(optim.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


# ----------------------------------------------------------------------------------------------------------------
# The projector artifact
# ----------------------------------------------------------------------------------------------------------------


def projector_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The projector's tensors on CPU, keys `model.multi_modal_projector.linear_{1,2}.{weight,bias}`."""
    projector = model.model.multi_modal_projector
    params = dict(projector.named_parameters())
    with gathered(list(params.values())):
        return {PROJECTOR_PREFIX + name: p.detach().to("cpu", copy=True).contiguous() for name, p in params.items()}


def to_upstream_projector(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our projector keys -> upstream's `model.mm_projector.{0,2}.*` (`upstream_format`'s key map)."""
    return {hf_to_upstream_key(key): tensor for key, tensor in state.items()}


def save_projector(model: nn.Module | None, folder: str | Path, *, upstream_bin: bool = False,
                   state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `projector.safetensors` (and upstream's `mm_projector.bin` on request) into folder.

    `state` (keys as `projector_state_dict` returns them, e.g. kept by ZeRO-3's streamed final save)
    replaces reading the model.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = projector_state_dict(model) if state is None else {
        key: tensor.detach().to("cpu").contiguous() for key, tensor in state.items()}
    save_file(state, str(folder / PROJECTOR_FILE), metadata={"format": "pt", "content": "mlcd_vl projector"})
    if upstream_bin:
        torch.save(to_upstream_projector(state), folder / UPSTREAM_PROJECTOR_FILE)
    return folder


def _projector_suffix(key: str) -> str | None:
    """'linear_1.weight' for any of our, transformers' or upstream's projector key spellings; else None."""
    if "mm_projector." in key:  # upstream's spelling, through `upstream_format`'s key map
        key = upstream_to_hf_key("model.mm_projector." + key.split("mm_projector.", 1)[1], ()) or ""
    if "multi_modal_projector." in key:
        return key.split("multi_modal_projector.", 1)[1]
    return None


def _read_safetensors(path: Path, only_projector: bool) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()
                    if not only_projector or _projector_suffix(k) is not None}
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise ProjectorError(f"{path}: cannot read safetensors ({error})") from error


def read_projector(source: str | Path, *, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """The projector tensors (keys `linear_{1,2}.{weight,bias}`) of an artifact file or folder, and the file read.

    A folder is searched for `projector.safetensors`, then `mm_projector.bin`, then a checkpoint's
    `model*.safetensors` (only its projector keys are read).
    """
    path = Path(source)
    if path.is_dir():
        candidates = [path / PROJECTOR_FILE, path / UPSTREAM_PROJECTOR_FILE] + sorted(path.glob("model*.safetensors"))
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise ProjectorError(f"{path}: no {PROJECTOR_FILE}, {UPSTREAM_PROJECTOR_FILE} or model*.safetensors")
        files = found[:1] if found[0].name in (PROJECTOR_FILE, UPSTREAM_PROJECTOR_FILE) else found
    elif path.is_file():
        files = [path]
    else:
        raise ProjectorError(f"{path}: projector artifact not found")
    raw: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            raw.update(_read_safetensors(file, only_projector=file.name != PROJECTOR_FILE))
        else:
            from mlcd_vl.model.convert import ConvertError, load_pickle

            try:
                raw.update(load_pickle(file, allow_pickle))
            except ConvertError as error:
                raise ProjectorError(str(error)) from None
    state = {}
    for key, tensor in raw.items():
        suffix = _projector_suffix(key)
        if suffix not in PROJECTOR_KEYS:
            raise ProjectorError(f"{files[0]}: unexpected key {key!r} (projector keys expected)")
        state[suffix] = tensor
    missing = [k for k in PROJECTOR_KEYS if k not in state]
    if missing:
        raise ProjectorError(f"{files[0]}: projector keys missing: {', '.join(missing)}")
    return state, str(files[0])


def load_projector(model: nn.Module, source: str | Path, *, allow_pickle: bool = False) -> str:
    """Copy a stage-1 projector into `model` (shapes checked, cast to the model's dtype); returns the file read."""
    state, origin = read_projector(source, allow_pickle=allow_pickle)
    params = dict(model.model.multi_modal_projector.named_parameters())
    for key, tensor in state.items():
        expected = full_shape(params[key])
        if tuple(tensor.shape) != expected:
            raise ProjectorError(f"{origin}: {key} has shape {tuple(tensor.shape)}, the model needs {expected} "
                                 "(a projector for another tower or LLM?)")
    with gathered(list(params.values()), modifier_rank=0), torch.no_grad():
        for key, tensor in state.items():
            params[key].copy_(tensor.to(params[key].dtype))
    return origin
