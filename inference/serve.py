"""`varsr serve`: MLflow's scoring server for a registered model, run as one process group that stops cleanly.

The processes: ``varsr serve`` starts ``mlflow models serve`` in a new session (so in a process group of its own);
mlflow copies the model into a temporary folder and starts ``uvicorn`` through ``bash -c "exec uvicorn ..."``
(same group; with ``--workers N`` uvicorn's worker processes join it too). ``varsr serve`` gives that server its own
TMPDIR, a folder it creates and deletes, so the model's temporary copy goes with it.

SIGTERM (``kill``, systemd, Kubernetes), SIGINT (Ctrl-C) and SIGHUP to ``varsr serve`` send SIGTERM to the whole
server group (uvicorn finishes the requests in flight, then exits); ``varsr serve`` waits until no process of the
group is left (it is their subreaper on Linux, so it also reaps the uvicorn process once mlflow has exited), uses
SIGKILL after ``stop_timeout`` seconds or on a second Ctrl-C, deletes the temporary folder and exits with status 0.
If ``varsr serve`` itself is killed with SIGKILL, the kernel sends SIGTERM to mlflow (parent-death signal), and mlflow
does the same for uvicorn; uvicorn would then wait for its requests in flight, however long, and its ``--workers``
processes have no parent-death signal, so every process that loads the model also watches ``varsr serve`` (its pid in
``$VARSR_SERVE_PID``): once it is gone, it cancels its requests (between tiles) and kills itself after
``serving.orphan_grace_s`` (inference/guard.py). Only the temporary folder is then left behind.

``varsr serve`` sets MLflow's request timeout (``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``) a few seconds above the
model's ``serving.request_timeout_s`` (as registered, or as given with ``--set``), so that the model's own deadline,
which cancels the work, answers first (inference/README.md, "Limits of the served endpoint").
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from infra.core.tracking import resolve_tracking_uri

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"


def venv_bin() -> Path:
    """The folder of this interpreter's scripts (mlflow, uvicorn); must be on PATH for `mlflow models serve`."""
    return Path(sys.executable).parent


def serve_command(model_uri: str, port: int, host: str = "127.0.0.1", workers: int = 1,
                  tracking_uri: str | None = None, overrides: list[str] | tuple[str, ...] = ()
                  ) -> tuple[list[str], dict[str, str]]:
    """(argv, env) running ``mlflow models serve --env-manager local`` for ``model_uri``.

    ``overrides``: ``serving.*`` / ``runtime.*`` ``key=value`` items applied on top of the registered model's
    inference config (see :func:`inference.mlflow_model.check_serve_overrides`).
    """
    from .mlflow_model import SERVING_OVERRIDES_ENV

    bin_dir = venv_bin()
    mlflow_exe = bin_dir / "mlflow"
    argv = [str(mlflow_exe)] if mlflow_exe.is_file() else [sys.executable, "-m", "mlflow"]
    argv += ["models", "serve", "-m", model_uri, "--env-manager", "local", "-h", host, "-p", str(port),
             "-w", str(workers)]
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = resolve_tracking_uri(tracking_uri)
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if overrides:
        env[SERVING_OVERRIDES_ENV] = json.dumps(list(overrides))
    else:
        env.pop(SERVING_OVERRIDES_ENV, None)
    return argv, env


def _prctl(option: int, value: int) -> bool:
    """prctl(2) on Linux; False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except OSError:
        return False


def _term_with_parent() -> None:
    """In the child before exec: receive SIGTERM when ``varsr serve`` dies, even by SIGKILL."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False when the group is gone."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def group_alive(pgid: int) -> bool:
    """Whether any process (a zombie not yet reaped included) is still in process group ``pgid``."""
    return signal_group(pgid, 0)


def _reap_group(pgid: int) -> list[tuple[int, int]]:
    """Reap every exited child of this process in group ``pgid``: [(pid, exit code or -signal)]."""
    out: list[tuple[int, int]] = []
    while True:
        try:
            res = os.waitid(os.P_PGID, pgid, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            return out
        if res is None:
            return out
        code = res.si_status if res.si_code == os.CLD_EXITED else -res.si_status
        out.append((res.si_pid, code))


def run_server_group(argv: list[str], env: dict[str, str], stop_timeout: float = 30.0, poll_s: float = 0.1) -> int:
    """Run ``argv`` as the leader of a new process group and supervise the group until none of it is left.

    A stop signal (SIGTERM, SIGINT, SIGHUP) sends SIGTERM to the group; SIGKILL follows after ``stop_timeout``
    seconds or on a second SIGINT. Returns 0 after a requested stop, else the leader's exit code (if it exits on
    its own, what is left of its group is stopped the same way first).
    """
    state: dict[str, Any] = {"signal": None, "stopping_since": None, "pgid": None, "sigints": 0}

    def on_signal(signum, _frame):
        if state["signal"] is None:
            state["signal"] = signum
            log.info("varsr serve: %s received, stopping the server", signal.Signals(signum).name)
        if state["stopping_since"] is None:
            state["stopping_since"] = time.monotonic()
        state["sigints"] += signum == signal.SIGINT
        if state["pgid"] is not None:
            signal_group(state["pgid"], signal.SIGKILL if state["sigints"] > 1 else signal.SIGTERM)

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    subreaper = _prctl(_PR_SET_CHILD_SUBREAPER, 1)  # orphans of the group (uvicorn after mlflow exits) come to us
    try:
        proc = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_term_with_parent)
        state["pgid"] = pgid = proc.pid
        if state["signal"] is not None:  # a signal came before the group existed
            signal_group(pgid, signal.SIGTERM)
        leader_rc: int | None = None
        killed = False
        while True:
            for pid, code in _reap_group(pgid):
                if pid == proc.pid:
                    leader_rc = proc.returncode = code
            if leader_rc is not None and not group_alive(pgid):
                break
            if leader_rc is not None and state["stopping_since"] is None:
                log.info("varsr serve: the server exited with %s; stopping the rest of its group", leader_rc)
                state["stopping_since"] = time.monotonic()
                signal_group(pgid, signal.SIGTERM)
            since = state["stopping_since"]
            if since is not None and not killed and time.monotonic() - since > stop_timeout:
                log.warning("varsr serve: the server did not stop within %.0f s; killing it", stop_timeout)
                signal_group(pgid, signal.SIGKILL)
                killed = True
            time.sleep(poll_s)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if subreaper:
            _prctl(_PR_SET_CHILD_SUBREAPER, 0)
    if state["signal"] is not None:
        log.info("varsr serve: stopped")
        return 0
    return int(leader_rc or 0)


def served_serving_config(model_uri: str, tracking_uri: str | None = None,
                          overrides: list[str] | tuple[str, ...] = ()):
    """The ``serving`` section the server will run with: the model's logged ``inference.yaml`` (only that file is
    downloaded) with the ``--set`` items over it; the defaults with the items where the model has none."""
    import mlflow

    from infra.core.tracking import tracking_uri_scope

    from .config import load_inference_config
    from .mlflow_model import ARTIFACT_CONFIG_PATH

    logged = None
    tmp = Path(tempfile.mkdtemp(prefix="varsr-serve-config-"))
    try:
        with tracking_uri_scope(resolve_tracking_uri(tracking_uri)):
            logged = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{model_uri.rstrip('/')}/{ARTIFACT_CONFIG_PATH}", dst_path=str(tmp))
        return load_inference_config(logged, list(overrides)).serving
    except Exception as e:  # noqa: BLE001 - mlflow itself reports a model it cannot find; here only the timeout
        log.warning("varsr serve: could not read the model's inference config (%s: %s); using the defaults",
                    type(e).__name__, str(e)[:200])
        return load_inference_config(None, list(overrides)).serving
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def serve(model_uri: str, port: int, host: str = "127.0.0.1", workers: int = 1, tracking_uri: str | None = None,
          overrides: list[str] | tuple[str, ...] = (), stop_timeout: float = 30.0) -> int:
    """Run the server in the foreground until it exits or a stop signal arrives (see the module docstring)."""
    from .guard import SERVE_PID_ENV, timeout_env_seconds

    argv, env = serve_command(model_uri, port, host, workers, tracking_uri, overrides)
    sv = served_serving_config(model_uri, tracking_uri, overrides)
    env[TIMEOUT_ENV] = timeout_env_seconds(sv.request_timeout_s)
    env[SERVE_PID_ENV] = str(os.getpid())  # every server process watches this one (inference/guard.py)
    log.info("varsr serve: %g s per request (serving.request_timeout_s; %s=%s)", sv.request_timeout_s, TIMEOUT_ENV,
             env[TIMEOUT_ENV])
    tmp = Path(tempfile.mkdtemp(prefix="varsr-serve-"))
    env["TMPDIR"] = str(tmp)  # mlflow's copy of the model lands here, and goes with it
    try:
        return run_server_group(argv, env, stop_timeout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def background_server(model_uri: str, port: int, *, tracking_uri: str | None = None, log_path: str | Path,
                      cwd: str | Path | None = None, env: dict[str, str] | None = None, ready_timeout: float = 180.0,
                      tmp_dir: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                      stop_timeout: float = 30.0, workers: int = 1):
    """Run ``varsr serve`` in the background, wait until ``/ping`` answers, yield the base URL, then stop it.

    Stopping sends SIGTERM to ``varsr serve``, which stops its whole server group (see the module docstring).
    ``tmp_dir`` becomes the TMPDIR of ``varsr serve`` and is deleted afterwards; ``workers``: uvicorn worker
    processes (each loads the model). ``overrides``: ``serving.*`` /
    ``runtime.*`` items for ``--set``. The server's output goes to ``log_path``; a server that exits or does not
    answer within ``ready_timeout`` raises RuntimeError with the end of that log.
    """
    import requests

    penv = {**os.environ, **(env or {})}
    penv["PATH"] = f"{venv_bin()}{os.pathsep}{penv.get('PATH', '')}"
    if tmp_dir is not None:
        Path(tmp_dir).mkdir(parents=True, exist_ok=True)
        penv["TMPDIR"] = str(tmp_dir)
    argv = [sys.executable, "-m", "infra.cli", "serve", model_uri, "--port", str(port), "--host", "127.0.0.1",
            "--stop-timeout", str(stop_timeout), "--workers", str(workers)]
    if tracking_uri:
        argv += ["--tracking-uri", tracking_uri]
    for item in overrides:
        argv += ["--set", item]
    log_path = Path(log_path)
    log_file = open(log_path, "wb")
    proc = subprocess.Popen(argv, cwd=cwd, env=penv, stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True)
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
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=stop_timeout + 15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            signal_group(proc.pid, signal.SIGKILL)  # varsr serve's death takes its server group down with it
            proc.wait(timeout=10)
        log_file.close()
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
