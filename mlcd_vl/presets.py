"""Named vision towers, LLMs and image settings: one typed registry, never name matching.

A tower preset carries what upstream's LLaVA-NeXT training used for that tower (crop size, anyres grid, feature
layer, CLS handling, resize mode, mean/std) so that `--tower DeepGlint-AI/mlcd-vit-bigG-patch14-448` alone gives the
recipe's settings and a study changes only the tower. The six towers of the MLCD encoder table are here. Unknown ids
are still usable (any local folder or hub id of a supported tower class); their settings come from their own config
and image-processor config.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mlcd_vl.vocab import Pinpoints

# Image statistics the towers were trained with (model/pixels.py normalises with them).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def upstream_grid(size: int) -> Pinpoints:
    """The 5-pinpoint LLaVA-NeXT grid upstream's scripts use at crop size `size`: 1x2, 2x1, 2x2, 3x1, 1x3 crops
    (no 1x1), as (width, height); it scales with the crop. The presets, the tiny model and the benches all take
    their grid from here."""
    return [(size, 2 * size), (2 * size, size), (2 * size, 2 * size), (3 * size, size), (size, 3 * size)]


@dataclass(frozen=True)
class TowerPreset:
    """A vision tower with the image settings its LLaVA-NeXT training used, so a study changes only the tower.

    Architecture facts (`kind`, sizes, `hidden_act`) are checked against the loaded tower's config at build time;
    `pixels.ProcessorSettings.of_tower(preset)` turns the image settings into the pixel path's.
    """

    name: str
    hub_id: str
    kind: str  # "mlcd" (MLCDVisionModel, 2D RoPE), "clip" (CLIPVisionModel) or "siglip" (SiglipVisionModel)
    image_size: int  # the crop size S
    patch_size: int
    hidden_size: int
    hidden_act: str
    select_layer: int = -2
    select_strategy: str = "default"  # "default" drops the CLS token; SigLIP has none ("full")
    resize_mode: str = "shortest_edge"  # how one crop is resized: "shortest_edge" + centre crop, or "squash" to SxS
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    source_format: str = "hf"  # "open_clip": the hub repo holds OpenCLIP weights, converted once (model/openclip.py)

    @property
    def pinpoints(self) -> Pinpoints:
        """Upstream's stage-2 anyres grid at this tower's crop size."""
        return upstream_grid(self.image_size)

    @property
    def tokens_per_crop(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def shrunk(self, image_size: int, hidden_size: int) -> "TowerPreset":
        """The same tower family and image settings (layer, CLS, resize, mean/std; the grid follows the crop) at a
        tiny size, for CPU tests and studies with tiny random towers."""
        return replace(self, name=f"{self.name}-tiny", hub_id="", image_size=image_size, hidden_size=hidden_size)


@dataclass(frozen=True)
class LLMPreset:
    name: str
    hub_id: str
    hidden_size: int


TOWERS: dict[str, TowerPreset] = {
    preset.name: preset
    for preset in (
        # The six towers of the MLCD table, in its order. CLIP-format towers use CLS-dropped features of layer -2.
        TowerPreset("clip-vitL-336", "openai/clip-vit-large-patch14-336", "clip", 336, 14, 1024, "quick_gelu"),
        # LLaVA-NeXT / OneVision's SigLIP tower: no CLS token (all 729 patches kept), the last block dropped (= layer
        # -2), SigLipImageProcessor's plain 384x384 resize and 0.5 mean/std.
        TowerPreset("siglip-so400m-384", "google/siglip-so400m-patch14-384", "siglip", 384, 14, 1152,
                    "gelu_pytorch_tanh", select_strategy="full", resize_mode="squash", mean=SIGLIP_MEAN,
                    std=SIGLIP_STD),
        # Apple's DFN5B ViT-H-14-378 is an OpenCLIP model (QuickGELU, "squash" resize, OpenAI CLIP statistics).
        TowerPreset("dfn5b-vitH-378", "apple/DFN5B-CLIP-ViT-H-14-378", "clip", 378, 14, 1280, "quick_gelu",
                    resize_mode="squash", source_format="open_clip"),
        TowerPreset("mlcd-vitL-336", "DeepGlint-AI/mlcd-vit-large-patch14-336", "clip", 336, 14, 1024, "quick_gelu"),
        TowerPreset("mlcd-bigG-336", "DeepGlint-AI/mlcd-vit-bigG-patch14-336", "mlcd", 336, 14, 1664, "gelu"),
        TowerPreset("mlcd-bigG-448", "DeepGlint-AI/mlcd-vit-bigG-patch14-448", "mlcd", 448, 14, 1664, "gelu"),
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
