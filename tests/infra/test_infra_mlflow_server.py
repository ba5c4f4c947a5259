"""The MLflow tracking-server recipe really starts (SQLite fallback), binds to loopback and never echoes secrets."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]


def test_start_server_script_serves_on_loopback(tmp_path, port):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env["MLFLOW_PORT"] = str(port)
    env["MLFLOW_WORKERS"] = "1"
    # a backend URI with a password: the script must start (sqlite ignores it) and must not print the secret
    env["MLFLOW_BACKEND_STORE_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
    env.pop("MLFLOW_HOST", None)
    proc = subprocess.Popen(
        ["bash", str(ROOT / "infra/mlflow/start_server.sh")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        ok = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    ok = True
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        assert ok, f"server did not become healthy (exit={proc.poll()})"
        # the experiments API answers: a real tracking server, not just a socket
        r = requests.get(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search", params={"max_results": 5})
        assert r.status_code == 200 and "experiments" in r.json()
    finally:
        os.killpg(proc.pid, 15)
        out, _ = proc.communicate(timeout=30)
    assert "127.0.0.1" in out


def test_start_server_masks_password_in_log(tmp_path):
    """The banner line shows the backend with user:password masked (no secret reaches the logs)."""
    env = dict(os.environ)
    env["MLFLOW_BACKEND_STORE_URI"] = "postgresql://mlflow:s3cr3t-pw@db.internal:5432/mlflow"
    # `mlflow` replaced by `true` so only the banner runs (no database needed)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "mlflow").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "mlflow").chmod(0o755)
    env["PATH"] = f"{fake_bin}:{env['PATH']}"
    res = subprocess.run(["bash", str(ROOT / "infra/mlflow/start_server.sh")], env=env, capture_output=True, text=True)
    assert res.returncode == 0
    assert "s3cr3t-pw" not in res.stdout + res.stderr
    assert "postgresql://***@db.internal:5432/mlflow" in res.stderr
