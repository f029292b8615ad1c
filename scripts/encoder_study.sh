#!/usr/bin/env bash
# The encoder study: `mlcd-vl study` (python -m mlcd_vl.cli study) with the repository's interpreter. Per tower it
# runs stage 1 (scripts/pretrain.sh), stage 2 (scripts/finetune.sh) and lmms-eval (scripts/eval.sh) with the same
# recipe, data, seed and evaluation, only the tower and its image settings changed; it resumes where it stopped and
# writes study.md / study.json / plots/ in the study folder (default runs/study). Paths are relative to the
# repository root, as for the other launchers. Examples:
#   scripts/encoder_study.sh --towers all --allow-pickle \
#       --stage1-set data.preset_dir=/data/LLaVA-Pretrain --stage2-set data.preset_dir=/data/LLaVA-NeXT-Data
#   NUM_GPUS=4 scripts/encoder_study.sh --towers clip-vitL-336,mlcd-bigG-448 --set batch.grad_accum=2 ...
#   scripts/encoder_study.sh --tiny                      # the CPU version: three tiny tower families, no downloads
#   scripts/encoder_study.sh --dry-run --towers all      # what would run per tower, and what is finished
# Environment: NUM_GPUS (default 8; --num-gpus wins), NNODES, MASTER_ADDR, MASTER_PORT, HOSTFILE as for
# scripts/pretrain.sh; PYTHON (default: $MLCD_VL_VENV or the repository's .venv if present, else python).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z ${PYTHON:-} ]]; then
  VENV=${MLCD_VL_VENV:-.venv}
  if [[ -x $VENV/bin/python ]]; then PYTHON=$VENV/bin/python; else PYTHON=python; fi
fi
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
exec "$PYTHON" -m mlcd_vl.cli study "$@"
