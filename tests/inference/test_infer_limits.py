"""The served endpoint's per-request limits (issue 28, findings 1-4; inference/README.md, "Limits of the served
endpoint"), against a real `varsr serve` of a tiny model registered in a real SQLite registry: work and memory
budgets checked from the tiling plan before any generation, work cancelled at its deadline or when its client goes
away, `kill -9` on `varsr serve` with a long request in flight, and error replies that stay small and never repeat
the request."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from PIL import Image
from skimage import data as skdata

from inference.config import load_inference_config
from inference.guard import bounded_error_body, clean_message, json_problem
from inference.registry import register_model
from inference.serve import background_server, venv_bin
from infra.core.net import free_port
from model import VARSRConfig, build, save_pretrained
from tests.inference.test_infer_serve_stop import descendants, listening, process_table

# the fast loop leaves out every test that uses these (tests/conftest.py): a model registered in MLflow and served
# by `varsr serve` processes
HEAVY_FIXTURES = {"registry"}

ROOT = Path(__file__).resolve().parents[2]
BASE = ["runtime.cpu_threads=1", "serving.concurrent_batches=1", "serving.log_batches=true"]
# A: the work budget (100 tiles of the tiny model, 3 AR steps each), small body and error limits
LIMITS = BASE + ["serving.max_request_work=300", "serving.max_request_bytes=2000000", "serving.max_error_chars=300"]
# B: plenty of work allowed, a short deadline and a memory budget
DEADLINE = BASE + [
    "serving.max_request_work=10000000",
    "serving.request_timeout_s=4",
    "serving.max_request_memory_mb=4096",
]


def png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def photo(w: int, h: int) -> str:
    return png_b64(Image.fromarray(skdata.chelsea()).resize((w, h), Image.BICUBIC))


def flat(w: int, h: int) -> str:
    return png_b64(Image.new("RGB", (w, h), (120, 90, 60)))


def split(*images: str) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[im] for im in images]}}


def invoke(url: str, payload=None, raw: bytes | str | None = None, timeout: float = 120):
    body = raw if raw is not None else json.dumps(payload)
    return requests.post(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}, timeout=timeout)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits-registry")
    torch.manual_seed(0)
    vqvae, varsr = build(VARSRConfig.preset("tiny"))
    ckpt = save_pretrained(root / "ckpt", vqvae, varsr)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    register_model(
        ckpt,
        "varsr-limits",
        alias="champion",
        tracking_uri=uri,
        validate_example=False,
        config=load_inference_config(overrides=BASE),
    )
    return {"root": root, "uri": uri, "model": "models:/varsr-limits@champion"}


@pytest.fixture(scope="module")
def limited(registry):
    root = registry["root"]
    with background_server(
        registry["model"],
        free_port(),
        tracking_uri=registry["uri"],
        overrides=LIMITS,
        log_path=root / "limited.log",
        tmp_dir=root / "limited-tmp",
        ready_timeout=180,
    ) as url:
        yield url


@pytest.fixture(scope="module")
def deadline_server(registry):
    root = registry["root"]
    with background_server(
        registry["model"],
        free_port(),
        tracking_uri=registry["uri"],
        overrides=DEADLINE,
        log_path=root / "deadline.log",
        tmp_dir=root / "deadline-tmp",
        ready_timeout=180,
    ) as url:
        yield url, root / "deadline.log"


# ---- pure functions ------------------------------------------------------------------------------------------------
def test_json_problems_are_named_without_quoting_the_body():
    assert json_problem(b'{"a": [1, 2]}', 8) is None
    assert "nested too deeply" in json_problem(b"[" * 100_000 + b"]" * 100_000, 32)
    assert "max_json_depth=3" in json_problem(b'{"a": {"b": {"c": 1}}}', 3)
    msg = json_problem(b'{"secret-body": ' + b"x" * 10_000, 32)
    assert "not valid JSON" in msg and "secret-body" not in msg and len(msg) < 200


def test_error_bodies_are_bounded_and_drop_the_echoed_input():
    echoed = json.dumps(
        {
            "error_code": "INVALID_PARAMETER_VALUE",
            "message": "Failed to predict data '   image\n0  iVBORw0KGgoAAAANSUhEUgAAAAgAAAAI...'. \n"
            "Error: invalid params: scale must be in [1.0, 8.0], got 100.0",
        }
    ).encode()
    out = json.loads(bounded_error_body(echoed, True, 400, 300))
    assert out == {
        "error_code": "INVALID_PARAMETER_VALUE",
        "message": "invalid params: scale must be in [1.0, 8.0], got 100.0",
    }
    cut = b'{"error_code": "BAD_REQUEST", "message": "Ensure that input is a valid JSON. Input: ' + b"A" * 5000
    out = json.loads(bounded_error_body(cut, False, 400, 300))
    assert out["error_code"] == "BAD_REQUEST" and len(out["message"]) <= 300
    assert len(clean_message("x" * 10_000, 100)) == 100


# ---- finding 1: work budget, tile bound, deadline and client cancellation ------------------------------------------
def test_the_strip_is_refused_before_any_work_and_a_small_request_is_answered(limited):
    """A 97-byte 4096x1 PNG at x4 is 341 tiles of the tiny model (1023 tile-steps): over the budget of 300, refused
    from its plan with a 400 that names the budget and the alternative; the next small request is answered."""
    r = invoke(limited, {**split(flat(4096, 1)), "params": {"scale": 4}}, timeout=60)
    assert r.status_code == 400, r.text[:300]
    msg = r.json()["message"]
    assert "341 tiles x 3 steps = 1023 tile-steps" in msg and "serving.max_request_work=300" in msg, msg
    assert "varsr upscale" in msg
    r = invoke(limited, {**split(flat(2048, 2048)), "params": {"scale": 4}}, timeout=60)  # 22 KB, 29241 tiles
    assert r.status_code == 400 and "serving.max_request_work" in r.json()["message"], r.text[:300]
    r = invoke(limited, {**split(photo(16, 16)), "params": {"seed": 0}}, timeout=60)
    assert r.status_code == 200, r.text[:300]
    assert r.json()["predictions"][0]["width"] == 64


def test_the_tile_overlap_is_bounded(limited):
    r = invoke(limited, {**split(photo(16, 16)), "params": {"tile": 3}})  # tiny: 4-cell tiles, at most 2 of overlap
    assert r.status_code == 400 and "serving.max_tile_overlap" in r.json()["message"], r.text[:300]
    r = invoke(limited, {**split(photo(16, 16)), "params": {"tile": 2, "seed": 0}})
    assert r.status_code == 200, r.text[:300]


def test_memory_past_the_budget_is_refused_from_the_plan(deadline_server):
    """A flat 2048x2048 PNG at x4 (22 KB) needs tens of GB by the plan's estimate: refused with a 400 naming
    serving.max_request_memory_mb, before anything is allocated for it."""
    url, _ = deadline_server
    r = invoke(url, {**split(flat(2048, 2048)), "params": {"scale": 4}}, timeout=60)
    assert r.status_code == 400, r.text[:300]
    assert "serving.max_request_memory_mb=4096" in r.json()["message"] and "varsr upscale" in r.json()["message"]


def test_work_past_its_deadline_is_cancelled_and_the_next_request_is_answered(deadline_server):
    """A 400x400 request at x4 (1089 tiles, far longer than the 4 s deadline on this server) gets a 504 naming the
    deadline; its work stops at the next tile, so the small request behind it (one batch at a time) is answered."""
    url, log_path = deadline_server
    assert "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT=9" in log_path.read_text()  # varsr serve matched MLflow's timeout
    r = invoke(url, {**split(photo(400, 400)), "params": {"seed": 0}}, timeout=300)
    assert r.status_code == 504, r.text[:300]
    assert "serving.request_timeout_s=4" in r.json()["message"]
    r = invoke(url, {**split(photo(16, 16)), "params": {"seed": 0}}, timeout=300)
    assert r.status_code == 200, r.text[:300]


def test_work_of_a_client_that_went_away_is_cancelled(deadline_server):
    url, _ = deadline_server
    with pytest.raises(requests.exceptions.ReadTimeout):  # the client gives up after 1 s and closes its connection
        invoke(url, {**split(photo(400, 400)), "params": {"seed": 1}}, timeout=1)
    r = invoke(url, {**split(photo(16, 16)), "params": {"seed": 0}}, timeout=300)
    assert r.status_code == 200, r.text[:300]


# ---- finding 4: bounded error replies, limits before MLflow's parser -------------------------------------------------
def test_a_malformed_body_is_not_echoed(limited):
    body = b'{"dataframe_split": {"columns": ["image"], "data": [["' + b"Q" * 1_500_000 + b'"]]'  # never closed
    r = invoke(limited, raw=body)
    assert r.status_code == 400 and len(r.content) < 1000, (r.status_code, len(r.content))
    assert "not valid JSON" in r.json()["message"] and "QQQQ" not in r.text


def test_deeply_nested_json_is_a_400(limited):
    r = invoke(limited, raw="[" * 200_000 + "]" * 200_000)
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert "nested too deeply" in r.json()["message"]
    nested: dict = {"image": "x"}
    for _ in range(40):
        nested = {"a": nested}
    r = invoke(limited, {**split(photo(8, 8)), "params": {"seed": 0, "extra": nested}})
    assert r.status_code == 400 and "serving.max_json_depth=32" in r.json()["message"], r.text[:300]


def test_model_errors_do_not_repeat_the_rows(limited):
    rows = [photo(8, 8), photo(9, 9)]
    r = invoke(limited, {**split(*rows), "params": {"scale": 100}})
    assert r.status_code == 400
    assert "scale must be in" in r.json()["message"]
    assert all(row[:24] not in r.text for row in rows), r.text[:500]
    assert "Failed to predict data" not in r.text and len(r.content) < 1000


def test_a_body_over_the_limit_is_refused_unread(limited):
    r = invoke(limited, raw=b'{"dataframe_split": "' + b"A" * 3_000_000 + b'"}')
    assert r.status_code == 413, (r.status_code, r.text[:300])
    assert "serving.max_request_bytes=2000000" in r.json()["message"] and len(r.content) < 1000
    r = invoke(limited, {**split(photo(8, 8)), "params": {"seed": 0}})  # still answering
    assert r.status_code == 200


# ---- finding 3: kill -9 on `varsr serve` with a request in flight ----------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2], ids=["1-worker", "2-workers"])
def test_kill_9_on_varsr_serve_with_a_long_request_in_flight_leaves_no_process(registry, tmp_path, workers):
    """uvicorn answers the parent-death SIGTERM by waiting for its requests in flight (here minutes of work) and its
    --workers processes have no parent-death signal: every process of the group must still go, and the port too."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TMPDIR": str(tmp_path),
        "PATH": f"{venv_bin()}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log_path = tmp_path / "serve.log"
    argv = [
        sys.executable,
        "-m",
        "infra.cli",
        "serve",
        registry["model"],
        "--port",
        str(port),
        "--tracking-uri",
        registry["uri"],
        "--workers",
        str(workers),
        "--set",
        "serving.request_timeout_s=600",
        "--set",
        "serving.max_request_work=10000000",
        "--set",
        "serving.orphan_grace_s=1",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    tree: dict = {}
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        statuses: list = []

        def long_request():
            try:
                statuses.append(invoke(url, {**split(photo(400, 400)), "params": {"seed": 0}}, timeout=600).status_code)
            except requests.RequestException as e:
                statuses.append(type(e).__name__)

        t = threading.Thread(target=long_request, daemon=True)
        t.start()
        deadline = time.monotonic() + 120
        while "batch: 1 requests" not in log_path.read_text():  # the request is being worked on
            assert time.monotonic() < deadline and t.is_alive(), log_path.read_text()[-3000:]
            time.sleep(0.2)
        tree = descendants(proc.pid)
        assert any("uvicorn" in i["cmd"] for i in tree.values()), tree
        if workers > 1:  # uvicorn's worker processes (multiprocessing spawn)
            assert sum("spawn_main" in i["cmd"] for i in tree.values()) >= workers, tree
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        deadline = time.monotonic() + 90

        def alive():
            now = process_table()
            return {p: i for p, i in now.items() if p in tree and i["cmd"] == tree[p]["cmd"] and i["state"] != "Z"}

        while (alive() or listening(port)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert alive() == {}, (alive(), log_path.read_text()[-2000:])
        assert not listening(port)
        t.join(timeout=30)
        assert statuses and statuses[0] != 200  # the request was cut off, not answered
    finally:
        for pid in list(tree) + [proc.pid]:  # whatever the test left (only on failure)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.poll()
