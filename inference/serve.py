"""`varsr serve`: run MLflow's scoring server for a registered model on loopback, with the right environment."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .registry import resolve_tracking_uri


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
