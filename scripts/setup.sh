#!/usr/bin/env bash
# Create .venv (once) and install mlcd-vl with the extras named in MLCD_VL_EXTRAS (default: dev).
# Torch is installed first and only when missing, so a CUDA torch you installed yourself is kept.
# Re-running is cheap: it reinstalls only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MLCD_VL_VENV:-.venv}
EXTRAS=${MLCD_VL_EXTRAS:-dev}
TORCH_SPEC=${MLCD_VL_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q $TORCH_SPEC
fi
stamp="$VENV/.mlcd-vl-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing mlcd-vl[$EXTRAS]"
  "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
  echo "$want" > "$stamp"
fi
