"""Smoke test of the benchmark scripts: each runs in --quick (or --dry-run) mode and writes its result file.

No timing is asserted anywhere (timings never go in tests): only that the code paths run and the files appear, named
`<what>_<machine>_<YYYY-MM-DD>.md` under `--out`.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def only_result(out: Path, what: str, machine: str) -> str:
    files = sorted(out.glob(f"{what}_*.md"))
    assert len(files) == 1, files
    name = files[0].name
    assert name.startswith(f"{what}_{machine}_") and name.endswith(".md")
    text = files[0].read_text()
    assert "load average" in text and "torch" in text
    return text


def test_result_path_and_header(bench, tmp_path):
    common = bench("common")
    path = common.result_path(tmp_path / "r", "thing")
    assert path.parent.is_dir() and path.name == f"thing_{common.machine_name()}_{common.today()}.md"
    assert "torch" in common.versions() and len(common.load_average().split(",")) == 3


def test_train_throughput_quick(bench, tmp_path):
    assert bench("train_throughput").main(["--quick", "--out", str(tmp_path)]) == 0
    text = only_result(tmp_path, "train_throughput", bench("common").machine_name())
    for mode in ("| padded |", "| grouped |", "| packed |", "| packed_mask |", "packed / padded", "4D block"):
        assert mode in text
    assert len(list(tmp_path.glob("train_throughput_*_loss.png"))) == 1


def test_data_throughput_quick(bench, tmp_path):
    assert bench("data_throughput").main(["--quick", "--out", str(tmp_path)]) == 0  # 1 = LUT candidate not exact
    text = only_result(tmp_path, "data_throughput", bench("common").machine_name())
    assert "1920x1080" in text and "decode" in text and "Bit-exact against the current code" in text


def test_memory_quick(bench, tmp_path):
    assert bench("memory").main(["--quick", "--out", str(tmp_path)]) == 0
    text = only_result(tmp_path, "memory", bench("common").machine_name())
    assert "| 512 | padded |" in text and "| 512 | packed |" in text


def test_loss_memory_quick(bench, tmp_path):
    assert bench("loss_memory").main(["--quick", "--out", str(tmp_path)]) == 0
    text = only_result(tmp_path, "loss_memory", bench("common").machine_name())
    for row in ("| 2048 | fp32 | full |", "| 2048 | fp32 | chunked |", "| 2048 | bf16 | chunked |"):
        assert row in text
    assert "chunked step peak" in text


def test_loss_memory_extrapolates_a_case_that_does_not_fit(bench):
    loss_memory = bench("loss_memory")
    measured = {"tokens": 2048, "dtype": "fp32", "path": "full", "vocab": 1000, "hidden": 10, "chunk": 256,
                "step_peak": 40.0, "forward_s": 1.0, "backward_s": 2.0, "total_s": 3.0}
    row = loss_memory.extrapolate([measured], 8192, "fp32", "full", "needs 99 GiB")
    assert row["skipped"] == "needs 99 GiB" and row["from_tokens"] == "2048" and row["total_s"] == 12.0
    assert row["step_peak"] == 160.0  # through the origin from one measured case
    larger = {**measured, "tokens": 4096, "step_peak": 70.0, "total_s": 6.0}
    row = loss_memory.extrapolate([measured, larger], 8192, "fp32", "full", "x")
    assert row["step_peak"] == 130.0 and row["from_tokens"] == "2048 and 4096"  # the line through both
    assert loss_memory.extrapolate([measured], 8192, "bf16", "full", "x") is None
    assert loss_memory.estimated_gib("full", 32768, 151936, 3584, "fp32", 1024) > 55
    assert loss_memory.estimated_gib("chunked", 32768, 151936, 3584, "fp32", 1024) < 8


def test_gpu_step_dry_run_and_no_cuda_exit(bench, tmp_path):
    assert bench("gpu_step").main(["--dry-run", "--out", str(tmp_path)]) == 0
    text = only_result(tmp_path, "gpu_step", "dry-run-cpu")
    assert "| packed |" in text and "| padded |" in text
    import torch

    if not torch.cuda.is_available():
        done = subprocess.run([sys.executable, str(BENCH / "gpu_step.py"), "--out", str(tmp_path / "none")],
                              check=False, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "no CUDA" in done.stderr
        assert not (tmp_path / "none").exists()


def test_serve_benches_quick(bench, tmp_path):
    pytest.importorskip("openai")
    assert bench("serve_steps").main(["--quick", "--out", str(tmp_path)]) == 0
    assert "decode" in only_result(tmp_path, "serve_steps", bench("common").machine_name()).lower()
    assert bench("serve_latency").main(["--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    text = next(tmp_path.glob("serve_latency_*.md")).read_text()
    assert "time to first token" in text and "concurrent requests" in text


def test_data_startup_quick(bench, tmp_path):
    assert bench("data_startup").main(["--quick", "--tag", "quick", "--out", str(tmp_path)]) == 0
    text = only_result(tmp_path, "data_startup-quick", bench("common").machine_name())
    for row in ("| before (", "| after, first launch | 1 | yes |", "| after, restart | 1 | no |",
                "| after, cached index | 2 |"):
        assert row in text


def test_demo_robustness_summary_names_a_missed_bar(bench):
    """The robustness bench's verdict: every promised skill's worst run against chance + 30 points."""
    robustness = bench("demo_robustness")
    chance = {skill: 0.25 for skill in robustness.SKILLS}

    def run(plan, seed, colour, chart):
        scores = {skill: 0.3 for skill in robustness.SKILLS} | {"colour": colour, "chart": chart}
        return {"plan": plan, "seed": seed, "threads": 1, "capability": "native", "wall_s": 100.0,
                "scores": scores}

    good = [run("quick", 0, 1.0, 0.3), run("quick", 1, 0.6, 0.3), run("full", 0, 1.0, 0.9)]
    lines, ok = robustness.summary(good, chance)
    assert ok and "- quick, colour: worst 60.0% vs bar 55.0%" in "\n".join(lines)
    assert "| quick | 2 | 60.0% / 80.0%" in "\n".join(lines)
    lines, ok = robustness.summary(good + [run("full", 1, 1.0, 0.5)], chance)  # full also promises the chart
    assert not ok and "- full, chart: worst 50.0% vs bar 55.0% (chance 25.0% + 30 points): MISSED" in lines
    assert "**50.0%**" in "\n".join(robustness.table([run("full", 1, 1.0, 0.5)], chance))
    slow_pair = [run("quick", 0, 1.0, 0.3) | {"wall_s": 500.0, "parallel": 2}]  # two at once share the cores
    assert "- quick, wall time: not judged (no run alone; limit 240 s)" in robustness.summary(slow_pair, chance)[0]
    lines, _ = robustness.summary(slow_pair + [run("quick", 1, 1.0, 0.3) | {"wall_s": 250.0}], chance)
    assert "- quick, wall time of a run alone: slowest 250 s vs limit 240 s: MISSED" in lines


def gpu_acceptance_phases(out: Path) -> dict:
    import json

    files = sorted(out.glob("gpu_acceptance_dry-run-cpu_*.json"))
    assert len(files) == 1, files
    assert files[0].with_suffix(".md").is_file()
    return {phase["number"]: phase for phase in json.loads(files[0].read_text())["phases"]}


def test_gpu_acceptance_dry_run_compares_numbers_in_every_phase(bench, tmp_path):
    acceptance = bench("gpu_acceptance")
    sharded = acceptance.sharded_init_available()  # None where this commit builds ZeRO-3 partitioned
    # phase 5's dry run (two DeepSpeed processes) is the slow test below where the feature exists
    phases_arg = ["--phases", "1,2,3,4,6"] if sharded is None else []
    assert acceptance.main(["--dry-run", "--out", str(tmp_path), *phases_arg]) == 0
    text = only_result(tmp_path, "gpu_acceptance", "dry-run-cpu")
    phases = gpu_acceptance_phases(tmp_path)
    assert sorted(phases) == [1, 2, 3, 4, 5, 6]
    assert all(phases[n]["status"] == "pass" for n in (1, 2, 3, 4, 6)), {n: p["summary"] for n, p in phases.items()}
    if sharded is not None:
        assert phases[5]["status"] == "skipped" and phases[5]["summary"] == "not on this commit"
        assert "| 5 sharded init | skipped |" in text and "not on this commit" in text

    def checks(number: int) -> dict:
        found = {check["name"]: check for check in phases[number]["checks"]}
        for check in found.values():  # every check compared a real number and passed
            assert isinstance(check["value"], float) and check["passed"], check
        return found

    packed = checks(3)
    assert len(packed) == 5
    for name, check in packed.items():
        if "relative" in name and "control" not in name:
            assert check["limit"] == 1e-5 and check["value"] <= 1e-5  # float32 on CPU: exact-ish
    control = next(c for n, c in packed.items() if "negative control" in n)
    assert control["value"] > 10 and phases[3]["data"]["control_hidden_error"] > 1e-3  # a leak IS detected
    loss = checks(4)
    compared = [n for n in loss if "relative" in n]
    assert len(compared) == 9  # loss, two gradients x (512 float32, 512 bf16, 2048 bf16)
    assert all(loss[n]["limit"] == 1e-5 for n in compared if "float32" in n)
    assert [case["tokens"] for case in phases[4]["data"]["cases"]] == [512, 512, 2048]
    checks(2)
    data = phases[6]["data"]
    assert data["tokens_per_s"] > 0 and data["samples_per_s"] > 0 and data["steps"] >= 1
    assert data["flops_with_tower"] > data["flops_without_tower"] > 0
    assert data["mfu_with_tower"] is None  # no peak on CPU: MFU n/a, never a made-up number
    import torch

    if not torch.cuda.is_available():
        done = subprocess.run([sys.executable, str(BENCH / "gpu_acceptance.py"), "--out", str(tmp_path / "none")],
                              check=False, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "no CUDA" in done.stderr
        assert not (tmp_path / "none").exists()


def test_gpu_acceptance_keeps_earlier_phases_when_one_crashes_or_runs_over(bench, tmp_path, monkeypatch):
    import time

    acceptance = bench("gpu_acceptance")

    def crash(ctx, phase):
        raise RuntimeError("planted failure")

    monkeypatch.setitem(acceptance.PHASE_FUNCTIONS, 4, crash)
    assert acceptance.main(["--dry-run", "--out", str(tmp_path), "--phases", "1,2,3,4"]) == 1
    phases = gpu_acceptance_phases(tmp_path)
    assert [phases[n]["status"] for n in (1, 2, 3)] == ["pass"] * 3
    assert phases[4]["status"] == "error" and "planted failure" in phases[4]["summary"]
    assert phases[6]["status"] == "skipped" and "not asked for" in phases[6]["summary"]
    with pytest.raises(acceptance.PhaseTimeout), acceptance.time_box(0.2):
        time.sleep(5)


@pytest.mark.slow
def test_gpu_acceptance_sharded_init_phase_builds_the_same_weights(bench, tmp_path):
    """Phase 5 on CPU: the whole-model and the partitioned (ZeRO-3, one gloo process) builds in fresh processes hold
    the same LLM and tower weights. About a minute (two DeepSpeed start-ups)."""
    acceptance = bench("gpu_acceptance")
    missing = acceptance.sharded_init_available()
    if missing is not None:
        pytest.skip(f"ZeRO-3 sharded init is {missing}")
    pytest.importorskip("deepspeed")
    assert acceptance.main(["--dry-run", "--out", str(tmp_path), "--phases", "5"]) == 0
    phase = gpu_acceptance_phases(tmp_path)[5]
    assert phase["status"] == "pass", phase["summary"]
    checksum = next(c for c in phase["checks"] if "checksum" in c["name"])
    assert checksum["value"] == 0.0 and phase["data"]["whole"]["params"] == phase["data"]["partitioned"]["params"]


def test_study_cost_estimate_counts_the_real_architectures(bench, tmp_path):
    bench("study_cost").main(["--out", str(tmp_path)])
    text = only_result(tmp_path, "study_cost", "estimate")
    assert "ESTIMATED" in text and "Qwen2.5-7B-Instruct: 7.62B parameters" in text
    # parameter counts of the real towers (meta device) and their crops' tokens (CLS dropped; SigLIP has none)
    for row in ("| clip-vitL-336 | 304M | 576 /", "| siglip-so400m-384 | 428M | 729 /", "| dfn5b-vitH-378 | 631M | 729 /",
                "| mlcd-bigG-336 | 1842M | 576 /", "| mlcd-bigG-448 | 1842M | 1024 /"):
        assert row in text, row


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero3_memory_quick(bench, tmp_path):
    pytest.importorskip("deepspeed")
    assert bench("zero3_memory").main(["--quick", "--out", str(tmp_path)]) == 0  # two launches: 1 and 2 processes
    text = only_result(tmp_path, "zero3_memory", bench("common").machine_name())
    assert "| after | 1 |" in text and "| after | 2 |" in text and "per rank at 2 processes / 1 process: build growth" in text
