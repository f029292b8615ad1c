#!/usr/bin/env bash
# The CPU demo: sets up the virtual environment first if needed ($MLCD_VL_VENV, default .venv), then `mlcd-vl demo`
# trains a tiny MLCD-VL model (stage 1, stage 2), scores it with lmms-eval on held-out synthetic data and chats
# about a held-out image; about 5 minutes on 2 cores, no downloads. The run folder is runs/demo/ (report.md inside).
# Extra arguments go to `mlcd-vl demo`, e.g. --quick (2-4 minutes) or --workdir DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning (tiny ops on a busy machine run 5x faster)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
exec "${MLCD_VL_VENV:-.venv}/bin/mlcd-vl" demo "$@"
