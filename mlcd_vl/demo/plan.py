"""The sizes of a demo run and of the demo's tiny model."""

from __future__ import annotations

from dataclasses import dataclass

REQUIRED_SKILLS = ("colour", "chart")  # what the demo promises to learn clearly above chance


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run."""

    train_images: int
    heldout_per_skill: int
    stage1_steps: int
    stage2_steps: int
    batch_size: int
    eval_batch_size: int = 32


# Stage 2 at the recipe's batch of 16 (see recipes/demo_stage2.yaml for why, and for its learning rates): both
# plans end well after the model has started to read images on every seed and CPU measured.
PLANS = {"full": DemoPlan(train_images=2400, heldout_per_skill=60, stage1_steps=100, stage2_steps=500, batch_size=16),
         "quick": DemoPlan(train_images=2400, heldout_per_skill=24, stage1_steps=50, stage2_steps=350, batch_size=16)}


def demo_shapes():
    """The demo's tiny model: a 3-layer, 128-wide Qwen2 LLM and a 3-layer, 64-wide MLCD tower (56-px crops)."""
    from mlcd_vl.model.tiny import TinyShapes  # torch: not at `mlcd-vl --help` time

    return TinyShapes(llm_hidden=128, llm_layers=3, llm_heads=4, llm_kv_heads=2, llm_intermediate=384,
                      tower_hidden=64, tower_layers=3, tower_heads=4, tower_intermediate=256)
