"""Estimated cost of the encoder study per tower (stage 1 + stage 2 of the MLCD bigG-448 recipes with the tower
swapped, on 8 GPUs): an ESTIMATE from training's own FLOPs model, nothing measured on a GPU.

    python bench/study_cost.py [--mfu 0.40] [--peak 989e12] [--gpus 8] [--out bench/results]

* FLOPs: `mlcd_vl.train.metrics.FlopsModel`, the model behind training's MFU figure: 6 x (LLM + projector
  parameters) x LLM tokens + 6 x tower parameters x tower tokens (crops x (patches + 1)). In stage 1 the LLM and the
  tower are frozen (no weight gradients), so the stage-1 figure is an upper bound, about 1.5x the work.
* Parameters: the real architectures (the hub configs' fields below) built on the meta device and counted as
  training's parameter summary counts them: Qwen2.5-7B-Instruct (language model + head), the 2-layer projector, the
  whole vision tower.
* Tokens per record: visual tokens and crops from `anyres.image_layout` (the function training counts with) at each
  tower's crop size and grid; stage 1 square (one crop), stage 2 anyres + spatial_unpad over the image sizes and
  weights of the benchmarks' own LLaVA-NeXT-Data-shaped mix (`bench/common.py` ASPECTS) with 10% text-only records
  (as its default mixture). Text tokens per record are assumptions, stated in the result (`--stage1-text`,
  `--stage2-text`): BLIP captions in the plain template, LLaVA-NeXT-Data conversations in the chat template.
* Records: LCS-558K 558,128, LLaVA-NeXT-Data 779,289 (the dataset cards), one epoch each, as the recipes.
* Time: FLOPs / (MFU x peak FLOP/s x GPUs); default MFU 0.40 (not measured here: no GPU has run this project's
  training yet; `bench/gpu_step.py` measures it once one does) and the H100/H200 dense bf16 peak.
"""

from __future__ import annotations

import argparse
import os

import common

RECORDS = {1: 558_128, 2: 779_289}  # LCS-558K, LLaVA-NeXT-Data (one epoch each, as the recipes)
TEXT_ONLY = 0.10  # common.Mixture's default text-only share, stage 2
LLM = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
           num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)
# Vision towers: the hub configs' fields (DFN5B: the CLIPVisionModel its OpenCLIP weights convert to).
CLIP_L = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
              num_attention_heads=16, patch_size=14)
MLCD_BIGG = dict(model_type="mlcd_vision_model", hidden_size=1664, intermediate_size=8192, num_hidden_layers=48,
                 num_attention_heads=16, patch_size=14)
TOWER_FIELDS = {
    "clip-vitL-336": CLIP_L, "mlcd-vitL-336": CLIP_L, "mlcd-bigG-336": MLCD_BIGG, "mlcd-bigG-448": MLCD_BIGG,
    "siglip-so400m-384": dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                              num_hidden_layers=27, num_attention_heads=16, patch_size=14),
    "dfn5b-vitH-378": dict(model_type="clip_vision_model", hidden_size=1280, intermediate_size=5120,
                           num_hidden_layers=32, num_attention_heads=16, patch_size=14),
}


def count_parameters(fields: dict, **extra) -> int:
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    fields = dict(fields, **extra)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = (AutoModelForCausalLM if config.model_type == "qwen2" else AutoModel).from_config(config)
    return sum(p.numel() for p in model.parameters())


def tokens_per_record(preset, stage: int, text: float) -> tuple[float, float]:
    """(LLM tokens, tower tokens) of an average record of the stage."""
    from mlcd_vl.model import anyres

    patches = (preset.image_size // preset.patch_size) ** 2 + 1  # what training counts per crop
    if stage == 1:
        layout = anyres.image_layout((640, 480), image_mode="square", merge_type="flat",
                                     crop_size=preset.image_size, patch_size=preset.patch_size)
        return layout.tokens + text, layout.num_crops * patches
    sizes, weights = zip(*common.ASPECTS)
    layouts = [anyres.image_layout(size, image_mode="anyres", merge_type="spatial_unpad",
                                   crop_size=preset.image_size, patch_size=preset.patch_size,
                                   pinpoints=preset.pinpoints) for size in sizes]
    visual = sum(w * layout.tokens for w, layout in zip(weights, layouts)) / sum(weights)
    crops = sum(w * layout.num_crops for w, layout in zip(weights, layouts)) / sum(weights)
    return (1 - TEXT_ONLY) * visual + text, (1 - TEXT_ONLY) * crops * patches


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation assumed (default 0.40)")
    parser.add_argument("--peak", type=float, default=989e12, help="peak FLOP/s per GPU (default H100/H200 bf16)")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--stage1-text", type=float, default=20.0, help="text tokens per LCS-558K record (assumed)")
    parser.add_argument("--stage2-text", type=float, default=300.0,
                        help="text tokens per LLaVA-NeXT-Data record (assumed)")
    parser.add_argument("--out", default=str(common.RESULTS))
    args = parser.parse_args(argv)

    from mlcd_vl import presets
    from mlcd_vl.train.metrics import FlopsModel, StepCounts

    load_before = common.load_average()
    llm = count_parameters(LLM)
    rows = ["| tower | tower parameters | visual tokens / record (stage 1 / 2) | PFLOPs (stage 1 / 2) | "
            f"GPU-hours at MFU {args.mfu:.2f} (stage 1 / 2) | wall time on {args.gpus} GPUs |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, preset in presets.TOWERS.items():
        tower = count_parameters(TOWER_FIELDS[name], image_size=preset.image_size)
        projector = preset.hidden_size * LLM["hidden_size"] + LLM["hidden_size"] ** 2 + 3 * LLM["hidden_size"]
        flops = FlopsModel(llm + projector, tower)
        stage_flops, visual = [], []
        for stage, text in ((1, args.stage1_text), (2, args.stage2_text)):
            llm_tokens, tower_tokens = tokens_per_record(preset, stage, text)
            visual.append(llm_tokens - text)
            counts = StepCounts(tokens=round(llm_tokens * RECORDS[stage]),
                                tower_tokens=round(tower_tokens * RECORDS[stage]))
            stage_flops.append(flops.step_flops(counts))
        hours = [f / (args.mfu * args.peak) / 3600 for f in stage_flops]
        rows.append(f"| {name} | {tower / 1e6:.0f}M | {visual[0]:.0f} / {visual[1]:.0f} | "
                    f"{stage_flops[0] / 1e15:,.0f} / {stage_flops[1] / 1e15:,.0f} | "
                    f"{hours[0]:,.0f} / {hours[1]:,.0f} | {sum(hours) / args.gpus:.1f} h |")
    lines = common.header(
        "Encoder study cost, ESTIMATED (FlopsModel at a stated MFU; nothing measured on a GPU)",
        common.command_line("study_cost.py", argv), load_before,
        [f"LLM Qwen2.5-7B-Instruct: {llm / 1e9:.2f}B parameters (with embeddings and head, as training counts them)",
         f"records: stage 1 {RECORDS[1]:,} (LCS-558K), stage 2 {RECORDS[2]:,} (LLaVA-NeXT-Data), one epoch each",
         f"assumed text tokens per record: stage 1 {args.stage1_text:.0f}, stage 2 {args.stage2_text:.0f}; stage 2 "
         f"images: bench/common.py ASPECTS, {TEXT_ONLY:.0%} text-only records",
         f"time = FLOPs / (MFU {args.mfu:.2f} x {args.peak / 1e12:.0f} TFLOP/s x {args.gpus} GPUs); stage 1 is an "
         "upper bound (frozen LLM and tower: no weight gradients)"]) + rows
    common.write_result(common.result_path(args.out, "study_cost", machine="estimate"), lines)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
