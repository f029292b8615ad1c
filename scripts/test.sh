#!/usr/bin/env bash
# Run the test suite (sets up the virtual environment first if needed: $MLCD_VL_VENV, default .venv).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec "${MLCD_VL_VENV:-.venv}/bin/python" -m pytest -q "$@"
