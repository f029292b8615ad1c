"""The towers of a study, and the only recipe settings a tower changes: the tower and its own image settings.

Full-size towers (GPU runs) are the presets of the MLCD table (`presets.TOWERS`). A stage's tower overrides are
`model.tower=<preset name>`, from which `build_vlm` takes the crop size, resize mode, mean/std, feature layer and CLS
handling, and in stage 2 (anyres) `model.pinpoints=<the preset's grid>`: upstream's five-crop grid at the tower's
own crop size (the recipes list bigG-448's). DFN5B's hub weights are pickle only, so its runs also get
`model.allow_pickle=true`, only when the study is told `--allow-pickle`.

Tiny towers (the CPU study) are the same families shrunk with `TowerPreset.shrunk`: one eighth of the preset's patch
grid with the crop's remainder kept (448 -> 56, 336 -> 42, 384 = 27x14+6 -> 3x14+6 = 48, 378 -> 42) at one width
for all (the demo's tower), written as tiny random towers of the real class (`model.tiny.write_preset_tower`) whose
image-processor config carries the preset's resize mode and mean/std. Their overrides name that folder and the grid
at the tiny crop size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlcd_vl import presets
from mlcd_vl.errors import UsageError
from mlcd_vl.eval.summarize import PUBLISHED_TOWERS

TINY_FAMILIES = ("mlcd-bigG-448", "clip-vitL-336", "siglip-so400m-384")  # MLCD RoPE2D, CLIP quick_gelu, SigLIP
TINY_GRID_DIVISOR = 8
# What the study sets per tower; a user override of these keys would undo "only the tower changes".
TOWER_KEYS = ("model.tower", "model.pinpoints", "model.init_from", "output_dir")


class StudyError(UsageError, ValueError):
    """A study that cannot run or compare as asked; the message is one line and says what to do (exit 2)."""


def tiny_crop(preset: presets.TowerPreset) -> int:
    """The tiny crop size: 1/8 of the patch grid (at least 2 patches a side), the crop's remainder kept."""
    units = max(2, (preset.image_size // preset.patch_size) // TINY_GRID_DIVISOR)
    return units * preset.patch_size + preset.image_size % preset.patch_size


@dataclass(frozen=True)
class StudyTower:
    """One row of a study: a preset, or its tiny version (`tiny`), and the folder name its runs go into."""

    preset: presets.TowerPreset  # the full-size tower (its published row)
    tiny: presets.TowerPreset | None = None  # the shrunk preset the CPU study trains

    @property
    def key(self) -> str:
        return (self.tiny or self.preset).name

    @property
    def used(self) -> presets.TowerPreset:
        return self.tiny or self.preset

    @property
    def label(self) -> str:
        name = PUBLISHED_TOWERS.get(self.preset.name, self.preset.name)
        return f"{name}, tiny" if self.tiny else name

    def overrides(self, stage: int, tower_source: str | Path | None = None,
                  allow_pickle: bool = False) -> list[str]:
        """The stage's tower overrides; `tower_source` is the tiny tower's folder (tiny towers only)."""
        if self.tiny is not None and tower_source is None:
            raise ValueError(f"{self.key}: a tiny tower needs the folder it was written to")
        values = [f"model.tower={tower_source if self.tiny is not None else self.preset.name}"]
        if stage == 2:
            grid = ",".join(f"[{width},{height}]" for width, height in self.used.pinpoints)
            values.append(f"model.pinpoints=[{grid}]")
        if allow_pickle and self.preset.source_format == "open_clip" and self.tiny is None:
            values.append("model.allow_pickle=true")
        return values


def parse_towers(text: str | None, tiny: bool, tower_width: int = 64) -> list[StudyTower]:
    """`--towers a,b,c` (preset names or hub ids; `all`: the six) as study rows; default: the six, or with `tiny`
    the three tiny families."""
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not names:
        names = list(TINY_FAMILIES) if tiny else list(presets.TOWERS)
    if names == ["all"]:
        names = list(presets.TOWERS)
    towers = []
    for name in names:
        preset = presets.tower_preset(name)
        if preset is None:
            raise StudyError(f"--towers: {name!r} is not a tower preset; a study compares presets: "
                             f"{', '.join(presets.TOWERS)}")
        tower = StudyTower(preset, preset.shrunk(tiny_crop(preset), tower_width) if tiny else None)
        if tower.key in {t.key for t in towers}:
            raise StudyError(f"--towers: {name!r} is listed twice")
        towers.append(tower)
    return towers
