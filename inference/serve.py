"""`varsr serve`: run MLflow's scoring server for a registered model on loopback, with the right environment."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from infra.core.tracking import resolve_tracking_uri


def venv_bin() -> Path:
    """The folder of this interpreter's scripts (mlflow, uvicorn); must be on PATH for `mlflow models serve`."""
    return Path(sys.executable).parent


def serve_command(model_uri: str, port: int, host: str = "127.0.0.1", workers: int = 1,
                  tracking_uri: str | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, env) running ``mlflow models serve --env-manager local`` for ``model_uri``."""
    bin_dir = venv_bin()
    mlflow_exe = bin_dir / "mlflow"
    argv = [str(mlflow_exe)] if mlflow_exe.is_file() else [sys.executable, "-m", "mlflow"]
    argv += ["models", "serve", "-m", model_uri, "--env-manager", "local", "-h", host, "-p", str(port),
             "-w", str(workers)]
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = resolve_tracking_uri(tracking_uri)
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return argv, env


def serve(model_uri: str, port: int, host: str = "127.0.0.1", workers: int = 1, tracking_uri: str | None = None) -> int:
    """Run the server in the foreground until it exits (Ctrl-C stops it); returns its exit code."""
    argv, env = serve_command(model_uri, port, host, workers, tracking_uri)
    proc = subprocess.Popen(argv, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


@contextlib.contextmanager
def background_server(model_uri: str, port: int, *, tracking_uri: str | None = None, log_path: str | Path,
                      cwd: str | Path | None = None, env: dict[str, str] | None = None, ready_timeout: float = 180.0,
                      tmp_dir: str | Path | None = None):
    """Run ``varsr serve`` in its own process group, wait until ``/ping`` answers, yield the base URL, then stop it.

    ``tmp_dir`` becomes the server's TMPDIR (``mlflow models serve`` copies the model into a temporary folder that
    it never removes) and is deleted afterwards. The server's output goes to ``log_path``; a server that exits or
    does not answer within ``ready_timeout`` raises RuntimeError with the end of that log.
    """
    import requests

    penv = {**os.environ, **(env or {})}
    penv["PATH"] = f"{venv_bin()}{os.pathsep}{penv.get('PATH', '')}"
    if tmp_dir is not None:
        Path(tmp_dir).mkdir(parents=True, exist_ok=True)
        penv["TMPDIR"] = str(tmp_dir)
    argv = [sys.executable, "-m", "infra.cli", "serve", model_uri, "--port", str(port), "--host", "127.0.0.1"]
    if tracking_uri:
        argv += ["--tracking-uri", tracking_uri]
    log_path = Path(log_path)
    log = open(log_path, "wb")
    proc = subprocess.Popen(argv, cwd=cwd, env=penv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"model server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"model server not ready within {ready_timeout:.0f} s:\n"
                                   f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        log.close()
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
