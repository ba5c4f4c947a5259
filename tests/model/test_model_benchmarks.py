"""The benchmarks run end to end here: gpu_bench on CPU (tiny preset), so the GPU benchmark cannot rot between GPU
runs, and model_bench's interleaved before/after comparison of generation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PHASES = {"ar_s", "refiner_s", "decode_s", "total_s"}


@pytest.mark.slow
def test_gpu_bench_runs_on_cpu_and_reports_every_figure():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_bench.py"),
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stdout[-2000:]  # exactly one JSON object on stdout
    out = json.loads(lines[0])
    assert out["device_info"]["device"] == "cpu" and out["mfu_denominator_tflops"] > 0
    gen = out["generate"]
    for b in ("batch_1", "batch_8"):
        g = gen["eager"][b]
        assert set(g["per_image_s"]) == PHASES and all(v > 0 for v in g["per_image_s"].values())
        assert "peak_memory_mib" in g and g["images_per_s"] > 0
    assert sum(gen["sdpa_backends"].values()) > 0 and set(gen["sdpa_backends"]) <= {
        "flash",
        "memory_efficient",
        "cudnn",
        "math",
    }
    assert "skipped" in gen["compiled"]  # compile variants are CUDA-only by default
    tr = out["train"]["tiny"]
    assert (tr["precision"], tr["zero_stage"]) == ("bf16", 2)
    e = tr["eager"]
    for k in ("step_s", "target_tokens_per_s", "achieved_tflops", "mfu", "model_tflops_per_step"):
        assert e[k] > 0, k
    assert set(e["step_parts_s"]) >= {"tokenise", "forward", "backward", "optimizer"}
    assert sum(e["sdpa_backends"].values()) > 0 and "peak_memory_mib" in e
    assert "skipped" in tr["compiled"]


@pytest.mark.slow
def test_model_bench_compares_generation_with_the_baseline_commit_interleaved():
    """model_bench imports the baseline commit's model package beside today's, gives both the same weights, inputs
    and streams, and reports per-phase medians and base/new ratios; the images must agree."""
    ref = "508295d"
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{ref}^{{commit}}"], capture_output=True).returncode:
        pytest.skip(f"baseline commit {ref} is not in this clone (shallow checkout)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "model_bench.py"),
            "--preset",
            "tiny",
            "--reps",
            "2",
            "--threads",
            "1",
            "--baseline-ref",
            ref,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    gen = out["generate"]
    assert gen["baseline_ref"] == ref and gen["reps"] == 2
    for side in ("base", "new"):
        assert set(gen["per_image_median_s"][side]) == PHASES | {"cpu_s", "ar_cpu_s", "refiner_cpu_s", "decode_cpu_s"}
    assert set(gen["speedup_vs_base"]["new"]["total_s"]) == {"ratio_of_medians", "median_of_paired_ratios"}
    assert gen["max_abs_image_diff_new_vs_base"] <= 1e-4
    assert out["train"]["step_s"] > 0 and out["train"]["tokenise_s"] > 0
