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

Operations (inference/serve_metrics.py; inference/README.md, "Metrics and health"): ``varsr serve`` gives the server
an empty ``$PROMETHEUS_MULTIPROC_DIR`` inside its temporary folder (every worker writes its metrics there, whichever
answers ``/metrics`` reads them all), the number of worker processes (readiness waits for all of them) and the
model's name, version and alias (the labels of every series); while it supervises the group it drops the live-gauge
files of worker processes that are gone.

Defaults that use the machine (:func:`choose_layout`): without ``--workers``, one worker process per CPU core the
process may use (its affinity and cgroup quota), at most :data:`MAX_AUTO_WORKERS` and as many as 80 % of the memory
(cgroup limit or RAM) holds at :func:`worker_memory_bytes` each, with ``cores // workers`` torch threads each
(``runtime.cpu_threads``, unless ``--set`` gives it); on a GPU, one process (it owns the device; batching fills it).
Measured (docs/BENCHMARKS.md): on 2 cores, 1 process gives x1.38 at 8 clients where 2 processes give x2.06.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from infra.core.tracking import resolve_tracking_uri

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"
MAX_AUTO_WORKERS = 8  # each process holds its own model copy and batches only its share of the traffic
MEMORY_SHARE = 0.8  # of the machine's (or cgroup's) memory the worker processes may plan for
# resident memory of one worker process serving the tiny model (torch, MLflow, uvicorn, the pipeline), rounded up:
# 489 and 492 MiB for the 2 workers after a load, from `varsr_process_resident_memory_bytes`
# (benchmarks/serve_metrics_bench.py; docs/SERVING.md, "Sizing"); the weights and a request's memory come on top
WORKER_BASE_BYTES = 512 * 2**20


def venv_bin() -> Path:
    """The folder of this interpreter's scripts (mlflow, uvicorn); must be on PATH for `mlflow models serve`."""
    return Path(sys.executable).parent


def serve_command(
    model_uri: str,
    port: int,
    host: str = "127.0.0.1",
    workers: int = 1,
    tracking_uri: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> tuple[list[str], dict[str, str]]:
    """(argv, env) running ``mlflow models serve --env-manager local`` for ``model_uri``.

    ``overrides``: ``serving.*`` / ``runtime.*`` ``key=value`` items applied on top of the registered model's
    inference config (see :func:`inference.mlflow_model.check_serve_overrides`).
    """
    from .mlflow_model import SERVING_OVERRIDES_ENV

    bin_dir = venv_bin()
    mlflow_exe = bin_dir / "mlflow"
    argv = [str(mlflow_exe)] if mlflow_exe.is_file() else [sys.executable, "-m", "mlflow"]
    argv += [
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "-h",
        host,
        "-p",
        str(port),
        "-w",
        str(workers),
    ]
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


def run_server_group(
    argv: list[str],
    env: dict[str, str],
    stop_timeout: float = 30.0,
    poll_s: float = 0.1,
    tick: Callable[[], Any] | None = None,
    tick_s: float = 2.0,
) -> int:
    """Run ``argv`` as the leader of a new process group and supervise the group until none of it is left.

    A stop signal (SIGTERM, SIGINT, SIGHUP) sends SIGTERM to the group; SIGKILL follows after ``stop_timeout``
    seconds or on a second SIGINT. Returns 0 after a requested stop, else the leader's exit code (if it exits on
    its own, what is left of its group is stopped the same way first). ``tick()`` runs every ``tick_s`` seconds
    while the group lives (its errors are logged, never raised).
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
        next_tick = time.monotonic() + tick_s
        while True:
            if tick is not None and time.monotonic() >= next_tick:
                next_tick = time.monotonic() + tick_s
                try:
                    tick()
                except Exception:  # housekeeping must not stop the supervision
                    log.exception("varsr serve: periodic step failed")
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


def served_config(model_uri: str, tracking_uri: str | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """The inference config the server will run with: the model's logged ``inference.yaml`` (only that file is
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
                artifact_uri=f"{model_uri.rstrip('/')}/{ARTIFACT_CONFIG_PATH}", dst_path=str(tmp)
            )
        return load_inference_config(logged, list(overrides))
    except Exception as e:  # noqa: BLE001 - mlflow itself reports a model it cannot find; here only the timeout
        log.warning(
            "varsr serve: could not read the model's inference config (%s: %s); using the defaults",
            type(e).__name__,
            str(e)[:200],
        )
        return load_inference_config(None, list(overrides))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def served_serving_config(model_uri: str, tracking_uri: str | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """The ``serving`` section of :func:`served_config`."""
    return served_config(model_uri, tracking_uri, overrides).serving


def model_labels(model_uri: str, tracking_uri: str | None = None):
    """The registered model's name, version and alias for the metrics' labels (the alias resolved to its version
    in the registry now, at start); the parts that cannot be known stay ""."""
    from .serve_metrics import ModelLabels, parse_model_uri

    name, version, alias = parse_model_uri(model_uri)
    if name and alias and not version:
        try:
            from mlflow.tracking import MlflowClient

            uri = resolve_tracking_uri(tracking_uri)
            version = str(
                MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(name, alias).version
            )
        except Exception as e:  # noqa: BLE001 - the server reports a model it cannot find; labels are best effort
            log.warning("varsr serve: could not resolve %s@%s to a version (%s)", name, alias, type(e).__name__)
    return ModelLabels(name, version, alias)


def weights_bytes(model_uri: str, tracking_uri: str | None = None) -> int:
    """Bytes of the model's logged artifacts (the checkpoint's weights and the small inference.yaml) in the
    registry, listed without downloading; 0 where they cannot be listed."""
    import mlflow

    from infra.core.tracking import tracking_uri_scope

    total, folders, listed = 0, [f"{model_uri.rstrip('/')}/artifacts"], 0
    try:
        with tracking_uri_scope(resolve_tracking_uri(tracking_uri)):
            while folders and listed < 100:  # a checkpoint is a folder or two
                folder = folders.pop()
                listed += 1
                for f in mlflow.artifacts.list_artifacts(artifact_uri=folder):
                    if f.is_dir:
                        folders.append(f"{folder}/{f.path.rsplit('/', 1)[-1]}")
                    else:
                        total += int(f.file_size or 0)
        return total
    except Exception as e:  # noqa: BLE001 - only the worker count's memory cap depends on it
        log.warning(
            "varsr serve: could not list the model's artifacts (%s); counting its weights as 0", type(e).__name__
        )
        return 0


# ---- defaults that use the machine ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeLayout:
    """Worker processes and torch threads per process that ``varsr serve`` runs, and why."""

    workers: int
    threads: int | None  # runtime.cpu_threads of each process; None: leave torch's default (GPU)
    reason: str


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def machine_cpus() -> int:
    """CPU cores this process may use: its affinity, capped by a cgroup v2 CPU quota (a pod's CPU limit)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = (_read("/sys/fs/cgroup/cpu.max") or "").split()
    if len(quota) == 2 and quota[0] != "max" and quota[0].isdigit() and quota[1].isdigit() and int(quota[1]) > 0:
        cpus = min(cpus, max(1, int(quota[0]) // int(quota[1])))
    return max(1, cpus)


def machine_memory_bytes() -> int:
    """Memory this process's group may use: the cgroup v2 limit (a pod's memory limit) or the machine's RAM."""
    total = 0
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) * 1024
    limit = (_read("/sys/fs/cgroup/memory.max") or "").strip()
    if limit.isdigit() and (total == 0 or int(limit) < total):
        total = int(limit)
    if total == 0:
        import psutil

        total = int(psutil.virtual_memory().total)
    return total


def gpu_count(device: str = "auto") -> int:
    """NVIDIA GPUs the server would run on (0 for ``runtime.device: cpu``, an empty ``$CUDA_VISIBLE_DEVICES`` or
    no driver); NVML, so that ``varsr serve`` itself need not import torch."""
    if device == "cpu":
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            n = int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver, no library: a CPU machine
        return 0
    if visible is not None:
        n = min(n, len([v for v in visible.split(",") if v.strip()]))
    return n


def worker_memory_bytes(weights: int, max_request_memory_mb: float) -> int:
    """Planned memory of one worker process: the measured idle process (:data:`WORKER_BASE_BYTES`), its copy of the
    weights, and one request at the endpoint's memory budget (``serving.max_request_memory_mb``)."""
    return int(WORKER_BASE_BYTES + weights + max_request_memory_mb * 2**20)


def choose_layout(
    cpus: int, memory_bytes: int, per_worker_bytes: int, gpus: int = 0, max_workers: int = MAX_AUTO_WORKERS
) -> ServeLayout:
    """Worker processes and threads for a machine (see the module docstring for the reasons).

    CPU: a worker per core, because a pipeline call on the CPU uses one core well and several poorly (on 2 cores, 2
    processes x 1 thread give x2.06 at 8 clients where 1 process gives x1.38, docs/BENCHMARKS.md); capped by
    ``max_workers`` and by how many ``per_worker_bytes`` fit in 80 % of ``memory_bytes``; the cores are shared out
    as torch threads (``cores // workers`` each). GPU: one process, which owns the device and batches for it.
    """
    cpus = max(1, int(cpus))
    if gpus > 0:
        return ServeLayout(1, None, f"{gpus} GPU(s): one process owns the device and batches requests for it")
    by_memory = max(1, int(memory_bytes * MEMORY_SHARE) // max(1, int(per_worker_bytes)))
    workers = max(1, min(cpus, int(max_workers), by_memory))
    threads = max(1, cpus // workers)
    if by_memory < min(cpus, int(max_workers)):
        why = (
            f"as many as fit in {MEMORY_SHARE:.0%} of {memory_bytes / 2**30:.1f} GiB at "
            f"{per_worker_bytes / 2**30:.2f} GiB each"
        )
    elif int(max_workers) < cpus:
        why = f"at most {max_workers}"
    else:
        why = "one per CPU core"
    return ServeLayout(
        workers, threads, f"{cpus} CPU core(s): {workers} worker(s) ({why}), {threads} torch thread(s) each"
    )


def serve(
    model_uri: str,
    port: int,
    host: str = "127.0.0.1",
    workers: int | None = None,
    tracking_uri: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    stop_timeout: float = 30.0,
) -> int:
    """Run the server in the foreground until it exits or a stop signal arrives (see the module docstring).
    ``workers=None``: :func:`choose_layout` for this machine."""
    from .guard import SERVE_PID_ENV, timeout_env_seconds
    from .serve_metrics import MULTIPROC_ENV, WORKERS_ENV, sweep_dead_processes

    config = served_config(model_uri, tracking_uri, overrides)
    sv = config.serving
    overrides = list(overrides)
    if workers is None or workers < 1:
        per_worker = worker_memory_bytes(weights_bytes(model_uri, tracking_uri), sv.max_request_memory_mb)
        layout = choose_layout(machine_cpus(), machine_memory_bytes(), per_worker, gpu_count(config.runtime.device))
        workers = layout.workers
        log.info("varsr serve: %s", layout.reason)
        if layout.threads is not None and not any(
            o.split("=", 1)[0].strip() == "runtime.cpu_threads" for o in overrides
        ):
            overrides.append(f"runtime.cpu_threads={layout.threads}")
    argv, env = serve_command(model_uri, port, host, workers, tracking_uri, overrides)
    env[TIMEOUT_ENV] = timeout_env_seconds(sv.request_timeout_s)
    env[SERVE_PID_ENV] = str(os.getpid())  # every server process watches this one (inference/guard.py)
    log.info(
        "varsr serve: %g s per request (serving.request_timeout_s; %s=%s)",
        sv.request_timeout_s,
        TIMEOUT_ENV,
        env[TIMEOUT_ENV],
    )
    tmp = Path(tempfile.mkdtemp(prefix="varsr-serve-"))
    env["TMPDIR"] = str(tmp)  # mlflow's copy of the model lands here, and goes with it
    prom_dir = tmp / "prometheus"
    prom_dir.mkdir()
    env[MULTIPROC_ENV] = str(prom_dir)  # every worker's metrics, read by whichever answers /metrics
    env[WORKERS_ENV] = str(workers)
    env.update(model_labels(model_uri, tracking_uri).env())
    try:
        return run_server_group(argv, env, stop_timeout, tick=lambda: sweep_dead_processes(prom_dir))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def background_server(
    model_uri: str,
    port: int,
    *,
    tracking_uri: str | None = None,
    log_path: str | Path,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    ready_timeout: float = 180.0,
    tmp_dir: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    stop_timeout: float = 30.0,
    workers: int | None = 1,
):
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
    argv = [
        sys.executable,
        "-m",
        "infra.cli",
        "serve",
        model_uri,
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--stop-timeout",
        str(stop_timeout),
    ]
    if workers is not None:
        argv += ["--workers", str(workers)]
    if tracking_uri:
        argv += ["--tracking-uri", tracking_uri]
    for item in overrides:
        argv += ["--set", item]
    log_path = Path(log_path)
    log_file = open(log_path, "wb")
    proc = subprocess.Popen(argv, cwd=cwd, env=penv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
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
                raise RuntimeError(
                    f"model server not ready within {ready_timeout:.0f} s:\n{log_path.read_text()[-3000:]}"
                )
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
