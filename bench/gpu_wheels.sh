#!/usr/bin/env bash
# The Python wheels the offline GPU machine lacks, at this venv's versions, into .whl/ (git-ignored): transformers
# (the machine's image had 5.17; pyproject asks for >= 5.20) and DeepSpeed with the dependencies the image lacks
# (phase 5 of bench/gpu_acceptance.py). The device run carries them (carry [".whl"]) and installs them with
# `pip install --no-index --no-deps --target /tmp/site .whl/*.whl` (bench/README.md, "GPU acceptance"). About 18 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${MLCD_VL_VENV:-.venv}/bin/python"
version() { "$PY" -c "from importlib.metadata import version; print(version('$1'))"; }
mkdir -p .whl
# the machine runs Python 3.12 on x86-64 (KINDS.md of the device tool)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "transformers==$(version transformers)" "pydantic==$(version pydantic)" \
    "pydantic-core==$(version pydantic-core)" "hjson==$(version hjson)" \
    "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)"
# DeepSpeed publishes only a source distribution: build its pure-Python wheel here (no ops compiled)
"$PY" -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$(version deepspeed)" -w .whl
ls -l .whl
