#!/usr/bin/env bash
# Stage 2 (full fine-tuning from the stage-1 projector, upstream finetune_mlcd.sh) with the MLCD bigG-448 + Qwen2.5-7B
# recipe on NUM_GPUS GPUs (default 8) x NNODES nodes. Environment and arguments: see scripts/train_launch.sh.
#   scripts/finetune.sh model.init_from=checkpoints/projectors/<stage-1 run> data.train=/data/llava_next_780k.json
#   NUM_GPUS=1 RECIPE=configs/recipes/tiny_stage2.yaml scripts/finetune.sh model.init_from=... optim.max_steps=5
DEFAULT_RECIPE=configs/recipes/mlcd_bigG448_stage2.yaml exec bash "$(dirname "$0")/train_launch.sh" "$@"
