"""Named vision towers, LLMs and image settings: one typed registry, never name matching.

A preset carries what upstream hard-codes in its scripts for that tower (crop size, anyres grid) so that
`--tower DeepGlint-AI/mlcd-vit-bigG-patch14-448` alone gives the recipe's settings. Unknown ids are still usable
(any local folder or hub id of a supported tower class); they just get no defaults beyond their own config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlcd_vl.vocab import Pinpoints


@dataclass(frozen=True)
class TowerPreset:
    """A vision tower and the anyres settings upstream trains it with."""

    name: str
    hub_id: str
    kind: str  # "mlcd" (MLCDVisionModel, 2D RoPE), "clip" (CLIPVisionModel) or "siglip"
    image_size: int
    patch_size: int
    hidden_size: int
    pinpoints: Pinpoints = field(default_factory=list)  # (width, height), upstream's stage-2 grid
    select_layer: int = -2
    select_strategy: str = "default"  # "default" drops the CLS token; SigLIP has none ("full")

    @property
    def tokens_per_crop(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class LLMPreset:
    name: str
    hub_id: str
    hidden_size: int


def upstream_grid(size: int) -> Pinpoints:
    """The 5-pinpoint LLaVA-NeXT grid upstream's scripts use at crop size `size`: 1x2, 2x1, 2x2, 3x1, 1x3 crops
    (no 1x1), as (width, height). The presets, the tiny model and the benches all take their grid from here."""
    return [(size, 2 * size), (2 * size, size), (2 * size, 2 * size), (3 * size, size), (size, 3 * size)]


TOWERS: dict[str, TowerPreset] = {
    preset.name: preset
    for preset in (
        TowerPreset("mlcd-bigG-448", "DeepGlint-AI/mlcd-vit-bigG-patch14-448", "mlcd", 448, 14, 1664,
                    upstream_grid(448)),
        TowerPreset("mlcd-bigG-336", "DeepGlint-AI/mlcd-vit-bigG-patch14-336", "mlcd", 336, 14, 1664,
                    upstream_grid(336)),
        TowerPreset("mlcd-vitL-336", "DeepGlint-AI/mlcd-vit-large-patch14-336", "clip", 336, 14, 1024,
                    upstream_grid(336)),
        TowerPreset("clip-vitL-336", "openai/clip-vit-large-patch14-336", "clip", 336, 14, 1024, upstream_grid(336)),
        TowerPreset("siglip-so400m-384", "google/siglip-so400m-patch14-384", "siglip", 384, 14, 1152,
                    upstream_grid(384), select_strategy="full"),
    )
}

LLMS: dict[str, LLMPreset] = {
    preset.name: preset
    for preset in (
        LLMPreset("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct", 3584),
        LLMPreset("qwen2.5-1.5b-instruct", "Qwen/Qwen2.5-1.5B-Instruct", 1536),
        LLMPreset("qwen2.5-0.5b-instruct", "Qwen/Qwen2.5-0.5B-Instruct", 896),
    )
}

DEFAULT_LLM = "qwen2.5-7b-instruct"
DEFAULT_TOWER = "mlcd-bigG-448"


def _lookup(registry: dict, key: str):
    if key in registry:
        return registry[key]
    for preset in registry.values():
        if preset.hub_id == key:
            return preset
    return None


def tower_preset(key: str) -> TowerPreset | None:
    """The preset for a preset name or its exact hub id; None for anything else (a local folder, another id)."""
    return _lookup(TOWERS, key)


def llm_preset(key: str) -> LLMPreset | None:
    return _lookup(LLMS, key)


def require_tower_preset(key: str) -> TowerPreset:
    preset = tower_preset(key)
    if preset is None:
        known = ", ".join(sorted(TOWERS) + sorted(p.hub_id for p in TOWERS.values()))
        raise KeyError(f"unknown vision tower preset {key!r}; known: {known}")
    return preset


def resolve_llm(key: str) -> str:
    """A preset name becomes its hub id; anything else (hub id, local folder) passes through."""
    preset = llm_preset(key)
    return preset.hub_id if preset else key


def resolve_tower(key: str) -> str:
    preset = tower_preset(key)
    return preset.hub_id if preset else key
