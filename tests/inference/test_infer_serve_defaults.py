"""`varsr serve`'s machine-aware defaults (inference/serve.py: choose_layout and what feeds it) and the health /
metrics parts that need no server: the guard answering /health/* and /metrics in-process (a real ASGI call), the
model labels, and the sweep of dead workers' live gauges in prometheus_client's multiprocess folder."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inference.guard import GuardLimits, RequestGuard
from inference.serve import (
    MAX_AUTO_WORKERS,
    WORKER_BASE_BYTES,
    choose_layout,
    gpu_count,
    machine_cpus,
    machine_memory_bytes,
    worker_memory_bytes,
)
from inference.serve_metrics import Health, ModelLabels, ServeMetrics, parse_model_uri, sweep_dead_processes

GiB = 2**30
ROOT = Path(__file__).resolve().parents[2]


def test_two_cores_get_two_single_threaded_workers():
    """The measured case of the issue: on 2 cores, 2 processes (x2.06 at 8 clients) beat 1 (x1.38)."""
    layout = choose_layout(2, 23 * GiB, worker_memory_bytes(0, 4096))
    assert (layout.workers, layout.threads) == (2, 1)
    assert "one per CPU core" in layout.reason


@pytest.mark.parametrize(
    "cpus, mem_gib, per_worker_gib, gpus, expected",
    [
        (1, 64, 1, 0, (1, 1)),
        (16, 256, 1, 0, (MAX_AUTO_WORKERS, 2)),  # capped: each worker holds its own model
        (64, 16, 4.5, 0, (2, 32)),  # 80 % of 16 GiB holds 2 workers of 4.5 GiB
        (8, 2, 9, 0, (1, 8)),  # not even one fits: still one
        (32, 512, 9, 1, (1, None)),  # a GPU: one process owns it
    ],
)
def test_layout_choices(cpus, mem_gib, per_worker_gib, gpus, expected):
    layout = choose_layout(cpus, int(mem_gib * GiB), int(per_worker_gib * GiB), gpus)
    assert (layout.workers, layout.threads) == expected, layout.reason


def test_layout_never_oversubscribes_cores_or_memory():
    for cpus in range(1, 65):
        for mem in (1, 4, 16, 64, 512):
            layout = choose_layout(cpus, mem * GiB, 3 * GiB)
            assert 1 <= layout.workers <= min(cpus, MAX_AUTO_WORKERS)
            assert layout.threads is not None and layout.workers * layout.threads <= cpus
            assert layout.workers == 1 or layout.workers * 3 * GiB <= 0.8 * mem * GiB


def test_per_worker_memory_is_the_measured_base_plus_weights_plus_one_request():
    assert worker_memory_bytes(10 * 2**20, 100) == WORKER_BASE_BYTES + 10 * 2**20 + 100 * 2**20


def test_machine_readings_follow_affinity_and_the_environment():
    assert 1 <= machine_cpus() <= (os.cpu_count() or 1)
    assert machine_memory_bytes() > 256 * 2**20
    code = "import os; os.sched_setaffinity(0, {0}); from inference.serve import machine_cpus; print(machine_cpus())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    assert gpu_count("cpu") == 0
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "-c", "from inference.serve import gpu_count; print(gpu_count())"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "0"


@pytest.mark.slow
def test_help_says_what_it_picks_and_why():
    out = subprocess.run(
        [sys.executable, "-m", "infra.cli", "serve", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    flat = " ".join(out.split())
    for phrase in (
        "one per core",
        "cgroup",
        "torch threads",
        "x1.38",
        "x2.06",
        "on a GPU, 1",
        "/metrics",
        "/health/ready",
    ):
        assert phrase in flat, phrase


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("models:/varsr@champion", ("varsr", "", "champion")),
        ("models:/varsr/3", ("varsr", "3", "")),
        ("models:/varsr/latest", ("varsr", "", "latest")),
        ("runs:/abc/model", ("", "", "")),
    ],
)
def test_model_labels_from_the_uri(uri, expected):
    assert parse_model_uri(uri) == expected


# ---- the guard's operations endpoints, called in-process ---------------------------------------------------------
async def _call(app, path: str, method: str = "GET") -> tuple[int, dict, bytes]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg):
        sent.append(msg)

    await app({"type": "http", "method": method, "path": path, "headers": []}, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body


async def _inner_app(scope, receive, send):  # what MLflow's app would answer for any other path
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"inner"})


def test_readiness_is_503_until_warm_up_then_200_and_liveness_always(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = ServeMetrics(ModelLabels("varsr", "7", "champion"))
    health = Health(metrics, max_queued_requests=2, workers=1)
    guard = RequestGuard(
        _inner_app, GuardLimits(1000, 8, 200, 5.0, max_queued_requests=2), metrics=metrics, health=health
    )
    status, _, body = asyncio.run(_call(guard, "/health/ready"))
    assert status == 503 and json.loads(body)["reason"].startswith("warming up")
    assert asyncio.run(_call(guard, "/health/live"))[0] == 200
    health.warmed_up(0.1)
    status, _, body = asyncio.run(_call(guard, "/health/ready"))
    assert status == 200 and json.loads(body)["ready"] is True
    health.warmup_failed("boom")
    assert asyncio.run(_call(guard, "/health/ready"))[0] == 503
    assert asyncio.run(_call(guard, "/ping"))[2] == b"inner"  # other paths go to MLflow's app
    status, headers, body = asyncio.run(_call(guard, "/metrics"))
    assert status == 200 and headers[b"content-type"].startswith(b"text/plain")
    assert b'varsr_workers_ready{alias="champion",model="varsr",version="7"} 1.0' in body


def test_queue_at_its_limit_makes_the_pod_unready():
    metrics = ServeMetrics(ModelLabels())
    health = Health(metrics, max_queued_requests=2, workers=1)
    health.warmed_up(0.1)
    metrics.request_started()
    assert health.readiness()[0] is True
    metrics.request_started()
    ready, details = health.readiness()
    assert not ready and details["reason"].startswith("the queue is full") and details["requests_held"] == 2
    metrics.request_finished(200, 0.1)
    assert health.readiness()[0] is True


def test_sweep_drops_the_live_gauges_of_dead_workers(tmp_path):
    code = (
        "from inference.serve_metrics import ServeMetrics; m = ServeMetrics(); m.set_ready(); "
        "m.request_started(); m.refused('work')"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.startswith("gauge_livesum_") for f in files) and any(f.startswith("counter_") for f in files)
    dead = sweep_dead_processes(tmp_path)
    assert len(dead) == 1
    left = sorted(p.name for p in tmp_path.iterdir())
    assert not any(f.startswith("gauge_live") for f in left)  # live gauges of the dead process are gone
    assert any(f.startswith("counter_") for f in left)  # its counted requests stay counted
