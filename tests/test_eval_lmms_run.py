"""Real lmms-eval 0.7.3 runs of a tiny model on the synthetic local sets of all five benchmarks, offline, through
scripts/eval.sh (single process) and torchrun (data parallel, 2 CPU processes); eval.sh's failure detection."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

from mlcd_vl.eval.tasks import BENCHMARKS, write_task_dir  # noqa: E402
from mlcd_vl.eval.synthetic import make_synthetic  # noqa: E402
from mlcd_vl.model.tiny import build_tiny_vlm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LOCAL_TASKS = [b.local_task for b in BENCHMARKS]
METRICS = {"mlcd_chartqa_local": ["relaxed_overall", "relaxed_human_split", "relaxed_augmented_split"],
           "mlcd_docvqa_val_local": ["anls"], "mlcd_infovqa_val_local": ["anls"],
           "mlcd_ocrbench_local": ["ocrbench_accuracy"], "mlcd_mmmu_val_local": ["mmmu_acc"]}


def _env(root: Path, **extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(root / "hf-datasets"), TOKENIZERS_PARALLELISM="false", PYTHON=sys.executable,
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms-run")
    build_tiny_vlm(root)
    make_synthetic(root / "data", items=4)
    return root


@pytest.fixture(scope="module")
def eval_run(setup):
    out = setup / "out"
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "eval.sh"), str(setup / "model"),
         "chartqa,docvqa_val,infovqa_val,ocrbench,mmmu", "1", "4", str(out)],
        env=_env(setup, MLCD_VL_EVAL_DATA=str(setup / "data"),
                 MLCD_VL_EVAL_EXTRA="--gen_kwargs max_new_tokens=4"),
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (results,) = sorted(out.rglob("*_results.json"))
    return {"out": out, "results": results, "data": json.loads(results.read_text()), "stdout": done.stdout}


def _answers(results: Path, task: str) -> dict[int, str]:
    stamp = results.name[: -len("_results.json")]
    lines = results.with_name(f"{stamp}_samples_{task}.jsonl").read_text().splitlines()
    return {row["doc_id"]: row["filtered_resps"] for row in map(json.loads, lines)}


def test_eval_sh_scores_all_five_local_benchmarks(eval_run):
    data = eval_run["data"]
    assert data["config"]["model"] == "mlcd_llava" and data["config"]["batch_size"] == "4"
    for task, metrics in METRICS.items():
        assert data["n-samples"][task]["effective"] == 4
        assert data["configs"][task]["generation_kwargs"]["max_new_tokens"] == 4
        for metric in metrics:
            assert isinstance(data["results"][task][f"{metric},none"], (int, float)), (task, metric)
        assert len(_answers(eval_run["results"], task)) == 4
    assert data["efficiency"]["overall"]["docs_with_token_counts"] == 20
    summary = (eval_run["out"] / "summary.md").read_text()
    assert "| [1] mlcd_llava: model |" in summary and "published: MLCD (ViT-bigG-14-448px)" in summary
    assert "template: qwen_1_5" in summary and "OCRBench's 1000 items" in summary
    assert (eval_run["out"] / "results" / "ocrbench_results.txt").is_file()


def test_data_parallel_torchrun_matches_the_single_process_run(setup, eval_run):
    tasks_dir = setup / "dp-tasks"
    write_task_dir(tasks_dir, setup / "data")
    out = setup / "dp"
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               "-m", "mlcd_vl.eval.cli", "lmms", "--model", "mlcd_llava",
               "--model_args", f"pretrained={setup / 'model'}", "--tasks", "mlcd_chartqa_local,mlcd_mmmu_val_local",
               "--include_path", str(tasks_dir), "--batch_size", "2", "--gen_kwargs", "max_new_tokens=4",
               "--output_path", str(out), "--log_samples"]
    done = subprocess.run(command, env=_env(setup), capture_output=True, text=True, timeout=300, cwd=REPO)
    found = sorted(out.rglob("*_results.json"))
    assert done.returncode == 0 and found, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(found[0].read_text())
    assert "Running on rank 1" in done.stdout + done.stderr
    for task in ("mlcd_chartqa_local", "mlcd_mmmu_val_local"):
        assert data["n-samples"][task]["effective"] == 4
        assert _answers(found[0], task) == _answers(eval_run["results"], task)
        for metric in METRICS[task]:
            assert data["results"][task][f"{metric},none"] == eval_run["data"]["results"][task][f"{metric},none"]


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python: lmms-eval "fails" (prints an error, exits 0), everything else runs for real.
if [[ " $* " == *" lmms "* ]]; then
  prev=""; out=""
  for a in "$@"; do [[ $prev == --output_path ]] && out=$a; prev=$a; done
  echo "ERROR | lmms_eval.__main__:cli_evaluate - Error during evaluation: boom"
  if [[ -n "${FAKE_RESULTS:-}" ]]; then mkdir -p "$out/m"; cp "$FAKE_RESULTS" "$out/m/20990101_000000_results.json"; fi
  exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


@pytest.mark.parametrize("case", ["no results", "metric missing"])
def test_eval_sh_fails_loudly_when_lmms_eval_fails_with_status_0(setup, tmp_path, case):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    extra = {"REAL_PYTHON": sys.executable, "PYTHON": str(fake), "MLCD_VL_EVAL_DATA": str(setup / "data")}
    if case == "metric missing":
        recorded = REPO / "tests" / "data" / "eval_results" / "20261127_230025_results.json"
        data = json.loads(recorded.read_text())
        del data["results"]["mlcd_ocrbench_local"]
        (tmp_path / "partial.json").write_text(json.dumps(data))
        extra["FAKE_RESULTS"] = str(tmp_path / "partial.json")
    done = subprocess.run(["bash", str(REPO / "scripts" / "eval.sh"), str(setup / "model"), "chartqa,ocrbench",
                           "1", "2", str(tmp_path / "out")], env=_env(setup, **extra), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    if case == "no results":
        assert "lmms-eval wrote no results file" in done.stderr and "Error during evaluation" in done.stderr
    else:
        assert "missing result: mlcd_ocrbench_local" in done.stderr and "eval.sh: FAILED" in done.stderr
