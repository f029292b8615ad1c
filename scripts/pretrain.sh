#!/usr/bin/env bash
# Stage 1 (projector pretraining, upstream pretrain_mlcd.sh) with the MLCD bigG-448 + Qwen2.5-7B recipe on NUM_GPUS
# GPUs (default 8) x NNODES nodes. Environment and arguments: see scripts/train_launch.sh. Examples:
#   scripts/pretrain.sh data.train=/data/blip_laion_cc_sbu_558k.json data.image_folder=/data/images
#   NUM_GPUS=1 RECIPE=configs/recipes/tiny_stage1.yaml scripts/pretrain.sh optim.max_steps=5   # CPU smoke run
DEFAULT_RECIPE=configs/recipes/mlcd_bigG448_stage1.yaml exec bash "$(dirname "$0")/train_launch.sh" "$@"
