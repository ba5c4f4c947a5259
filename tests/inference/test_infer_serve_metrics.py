"""The endpoint's /metrics and health over real HTTP: a tiny model registered in a real SQLite registry, served by
`varsr serve` (`mlflow models serve`, uvicorn) with 2 worker processes and with 1, real requests, then /metrics parsed
with prometheus_client's own parser (inference/serve_metrics.py; inference/README.md, "Metrics and health")."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from inference.config import load_inference_config
from inference.registry import register_model
from inference.serve import background_server
from infra.core.net import free_port
from model import VARSRConfig, build, save_pretrained

# the fast loop leaves out every test that uses these (tests/conftest.py): a model registered in MLflow and served
# by `varsr serve` processes
HEAVY_FIXTURES = {"registry"}

NAME = "varsr-metrics"
LIMITS = [
    "limits.max_payload_bytes=2000000",
    "limits.max_input_pixels=262144",
    "limits.max_output_pixels=4194304",
    "limits.max_batch_images=4",
    "runtime.cpu_threads=1",
    "serving.batch_wait_ms=50",
]


def png_b64(side: int, seed: int = 0) -> str:
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def body(*images: str, **params) -> str:
    return json.dumps(
        {"dataframe_split": {"columns": ["image"], "data": [[im] for im in images]}, "params": {"seed": 0, **params}}
    )


def post(url: str, data: str, timeout: float = 120) -> requests.Response:
    return requests.post(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"}, timeout=timeout)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one /metrics answer."""
    r = requests.get(f"{url}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name: str, **labels) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def label_sets(samples, name: str) -> list[dict]:
    return [dict(ls) for (n, ls) in samples if n == name]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics-registry")
    torch.manual_seed(0)
    vqvae, varsr = build(VARSRConfig.preset("tiny"))
    ckpt = save_pretrained(root / "ckpt", vqvae, varsr)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mv = register_model(ckpt, NAME, alias="champion", tracking_uri=uri, config=load_inference_config(overrides=LIMITS))
    return {"root": root, "uri": uri, "version": str(mv.version)}


@pytest.fixture(scope="module")
def two_workers(registry):
    root = registry["root"]
    with background_server(
        f"models:/{NAME}@champion",
        free_port(),
        tracking_uri=registry["uri"],
        workers=2,
        log_path=root / "server2.log",
        tmp_dir=root / "tmp2",
        ready_timeout=240,
    ) as url:
        wait_ready(url)
        yield url


def wait_ready(url: str, timeout: float = 240) -> list[tuple[int, dict]]:
    """Poll /health/ready until 200; returns every (status, body) seen."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = requests.get(f"{url}/health/ready", timeout=10)
        seen.append((r.status_code, r.json()))
        if r.status_code == 200:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"not ready within {timeout} s: {seen[-1]}")


def test_two_workers_count_exactly_what_the_clients_saw(two_workers, registry):
    url = two_workers
    good = [body(png_b64(16, i)) for i in range(6)] + [body(png_b64(16, 10), png_b64(12, 11))]
    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda d: post(url, d).status_code, good))
    assert codes == [200] * 7
    assert post(url, '{"dataframe_split": [').status_code == 400  # bad JSON (guard)
    assert post(url, body(*[png_b64(8, i) for i in range(5)])).status_code == 400  # 5 rows > limit 4
    assert post(url, body(png_b64(16), scale=1.0e9)).status_code == 400  # bad params
    images = 6 + 2

    # every scrape, whichever worker answers it, sees the requests of both workers
    for _ in range(4):
        m = scrape(url)
        model = {"model": NAME, "version": registry["version"], "alias": "champion"}
        assert value(m, "varsr_requests_total", code="200", **model) == 7
        assert value(m, "varsr_requests_total", code="400", **model) == 3
        assert value(m, "varsr_request_duration_seconds_count", **model) == 10
        assert value(m, "varsr_refusals_total", reason="bad_json") == 1
        assert value(m, "varsr_refusals_total", reason="too_many_images") == 1
        assert value(m, "varsr_refusals_total", reason="bad_params") == 1
        assert value(m, "varsr_images_total") == images
        assert value(m, "varsr_image_duration_seconds_count") == images
        assert value(m, "varsr_batch_images_sum") == images  # the warm-up calls are not counted
        assert value(m, "varsr_batch_requests_sum") == 7
        assert value(m, "varsr_tiles_total") >= images
        assert value(m, "varsr_requests_in_flight") == 0 and value(m, "varsr_requests_waiting") == 0
        assert value(m, "varsr_workers_ready") == 2
        # the +Inf bucket holds every request, and a request's latency is no more than the sum of all
        assert value(m, "varsr_request_duration_seconds_bucket", le="+Inf") == 10
        assert 0 < value(m, "varsr_request_duration_seconds_sum")
        mem = label_sets(m, "varsr_process_resident_memory_bytes")
        assert len({ls["pid"] for ls in mem}) == 2  # one series per worker process
        assert all(value(m, "varsr_process_resident_memory_bytes", pid=ls["pid"]) > 50 * 2**20 for ls in mem)
        for ls in label_sets(m, "varsr_requests_total"):
            assert {k: ls[k] for k in ("model", "version", "alias")} == model


def test_liveness_and_readiness_with_two_workers(two_workers):
    live = requests.get(f"{two_workers}/health/live", timeout=10)
    assert live.status_code == 200 and live.json() == {"live": True}
    ready = requests.get(f"{two_workers}/health/ready", timeout=10)
    assert ready.status_code == 200
    assert ready.json() == {"workers": 2, "workers_ready": 2, "requests_held": 0, "queue_limit": 64, "ready": True}


def test_readiness_waits_for_the_warm_up_and_fails_while_the_queue_is_full(registry):
    """One worker, a warm-up call of 256x256 px (x4: many tiles on a CPU) and a queue limit of one request: liveness
    answers during the warm-up while readiness says 503 'warming up'; then a long request fills the queue: readiness
    is 503 'queue is full', a second request is refused with 503 + Retry-After, and both recover after it."""
    root = registry["root"]
    sets = ["serving.warmup_side=256", "serving.max_queued_requests=1"]
    with background_server(
        f"models:/{NAME}@champion",
        free_port(),
        tracking_uri=registry["uri"],
        workers=1,
        overrides=sets,
        log_path=root / "server1.log",
        tmp_dir=root / "tmp1",
        ready_timeout=240,
    ) as url:
        assert requests.get(f"{url}/health/live", timeout=10).status_code == 200
        seen = wait_ready(url)
        assert seen[0][0] == 503 and seen[0][1]["reason"].startswith("warming up"), seen[0]
        assert seen[-1] == (
            200,
            {"workers": 1, "workers_ready": 1, "requests_held": 0, "queue_limit": 1, "ready": True},
        )

        result = {}
        slow = threading.Thread(target=lambda: result.setdefault("r", post(url, body(png_b64(256), scale=4.0))))
        slow.start()
        deadline = time.monotonic() + 60
        while value(scrape(url), "varsr_requests_in_flight") < 1:
            assert time.monotonic() < deadline and slow.is_alive()
            time.sleep(0.02)
        ready = requests.get(f"{url}/health/ready", timeout=10)
        refused = post(url, body(png_b64(16)))
        still_running = slow.is_alive()
        slow.join(120)
        assert still_running, "the long request ended before the checks; the test proves nothing"
        assert ready.status_code == 503 and ready.json()["reason"].startswith("the queue is full")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
        assert result["r"].status_code == 200
        assert requests.get(f"{url}/health/ready", timeout=10).status_code == 200
        m = scrape(url)
        assert value(m, "varsr_refusals_total", reason="queue_full") == 1
        assert value(m, "varsr_requests_total", code="503") == 1 and value(m, "varsr_requests_total", code="200") == 1


def test_without_workers_varsr_serve_runs_the_layout_chosen_for_this_machine(registry):
    """No --workers: `varsr serve` starts as many worker processes as choose_layout gives for this machine (cores,
    memory, the model's checkpoint size and memory budget), and readiness waits for all of them."""
    from inference.serve import (
        choose_layout,
        gpu_count,
        machine_cpus,
        machine_memory_bytes,
        served_config,
        weights_bytes,
        worker_memory_bytes,
    )

    root, uri = registry["root"], f"models:/{NAME}@champion"
    cfg = served_config(uri, registry["uri"])
    per_worker = worker_memory_bytes(weights_bytes(uri, registry["uri"]), cfg.serving.max_request_memory_mb)
    assert per_worker > worker_memory_bytes(0, cfg.serving.max_request_memory_mb)  # the checkpoint was listed
    expected = choose_layout(machine_cpus(), machine_memory_bytes(), per_worker, gpu_count(cfg.runtime.device))
    with background_server(
        uri,
        free_port(),
        tracking_uri=registry["uri"],
        workers=None,
        log_path=root / "auto.log",
        tmp_dir=root / "tmp-auto",
        ready_timeout=240,
    ) as url:
        ready = wait_ready(url)[-1][1]
        pids = {ls["pid"] for ls in label_sets(scrape(url), "varsr_process_resident_memory_bytes")}
    assert ready["workers"] == ready["workers_ready"] == expected.workers
    assert len(pids) == expected.workers
    assert expected.reason in (root / "auto.log").read_text()
