#!/usr/bin/env bash
# The CPU demo (sets up .venv first if needed). Extra arguments go to `mlcd-vl demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec .venv/bin/mlcd-vl demo "$@"
