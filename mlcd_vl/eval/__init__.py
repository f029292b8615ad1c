"""Evaluation with lmms-eval 0.7.3: the `mlcd_llava` model, local task definitions and the benchmark table.

* `lmms_manifest()` is what the `lmms_eval.models` entry point returns (`mlcd_llava` -> `lmms_adapter.MLCDLlava`);
  `register_lmms_model()` registers the same manifest in-process (before the package is reinstalled).
* `tasks.py`: the five benchmarks of the MLCD table and their offline task definitions (re-exported here).
* `generation.py`: lmms-eval `gen_kwargs` -> our decoding settings (re-exported here).

Light on purpose: nothing here imports torch or lmms-eval at module import time.
"""

from __future__ import annotations

from mlcd_vl.eval.generation import GENERATION_KEYS, effective_generation
from mlcd_vl.eval.tasks import BENCHMARKS, Benchmark, benchmark_for_task, find_data_files, task_yaml, write_task_dir

__all__ = ["ADAPTER_CLASS_PATH", "BENCHMARKS", "Benchmark", "GENERATION_KEYS", "MODEL_ID", "benchmark_for_task",
           "effective_generation", "find_data_files", "lmms_manifest", "register_lmms_model", "task_yaml",
           "write_task_dir"]

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
