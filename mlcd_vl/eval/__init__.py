"""Evaluation with lmms-eval 0.7.3: the `mlcd_llava` model, local task definitions and the benchmark table.

* here: `lmms_manifest()`, what the `lmms_eval.models` entry point returns (`mlcd_llava` ->
  `lmms_adapter.MLCDLlava`), and `register_lmms_model()`, the same registration in-process;
* `lmms_adapter.py`: the lmms-eval model over `serve.Engine`;
* `tasks.py`: the five benchmarks of the MLCD table and their offline task definitions (read from lmms-eval's own);
* `generation.py`: lmms-eval `gen_kwargs` -> our decoding settings;
* `summarize.py` (the results table), `synthetic.py` (benchmark-shaped test sets), `cli.py` (`mlcd-vl eval`).

Light on purpose: nothing here imports torch or lmms-eval at module import time.
"""

from __future__ import annotations

MODEL_ID = "mlcd_llava"
ADAPTER_CLASS_PATH = "mlcd_vl.eval.lmms_adapter.MLCDLlava"


def lmms_manifest():
    """The ModelManifest for the `lmms_eval.models` entry point (a zero-argument callable, loaded lazily)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=ADAPTER_CLASS_PATH)


def register_lmms_model() -> None:
    """Register `mlcd_llava` in this process, exactly as the entry point would (idempotent)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(lmms_manifest(), overwrite=True)
