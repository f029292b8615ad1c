#!/usr/bin/env bash
# Create .venv (once) and install mlcd-vl with the extras named in MLCD_VL_EXTRAS (default: dev).
# Torch is installed first and only when missing, so a CUDA torch you installed yourself is kept. MLCD_VL_TORCH
# chooses which torch that is (default: the pinned PyPI build, which carries CUDA libraries; a CPU-only machine
# can take the much smaller CPU build, see the README's quick start).
# Re-running is cheap: it reinstalls only when pyproject.toml or the extras changed. pip shows what it downloads.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MLCD_VL_VENV:-.venv}
EXTRAS=${MLCD_VL_EXTRAS:-dev}
TORCH_SPEC=${MLCD_VL_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
PYTHON=${PYTHON:-python3}
PIP=("$VENV/bin/python" -m pip install)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing PyTorch: $TORCH_SPEC"
  if [ -z "${MLCD_VL_TORCH:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "[setup]   (no GPU seen: MLCD_VL_TORCH=\"$TORCH_SPEC --index-url https://download.pytorch.org/whl/cpu\"" \
         "installs the smaller CPU build)"
  fi
  # shellcheck disable=SC2086
  "${PIP[@]}" $TORCH_SPEC
fi
stamp="$VENV/.mlcd-vl-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing mlcd-vl[$EXTRAS] (editable) and its dependencies"
  "${PIP[@]}" -e ".[$EXTRAS]"
  echo "$want" > "$stamp"
  echo "[setup] done: $VENV/bin/mlcd-vl (activate with: source $VENV/bin/activate)"
fi
