"""`varsr serve` under real signals: SIGTERM and SIGINT stop the whole server (the `mlflow models serve` child and its
uvicorn process), with exit status 0, the port free again and the model's temporary copy removed; SIGKILL to
`varsr serve` still takes the server down (parent-death signal)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

from inference.config import load_inference_config
from inference.registry import register_model
from infra.core.net import free_port
from model import VARSRConfig, build, save_pretrained

# the fast loop leaves out every test that uses these (tests/conftest.py): a model registered in MLflow and served
# by `varsr serve` processes
HEAVY_FIXTURES = {"registered"}

ROOT = Path(__file__).resolve().parents[2]
NAME = "varsr-stop"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny model registered in a real MLflow tracking server that proxies artifacts (``mlflow-artifacts:/``), so
    that `mlflow models serve` downloads a temporary copy of the model, as it does from any remote store."""
    root = tmp_path_factory.mktemp("stop-registry")
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / "tracking.log", "wb")
    tracking = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert tracking.poll() is None, (root / "tracking.log").read_text()[-3000:]
            try:
                if requests.get(f"{uri}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, (root / "tracking.log").read_text()[-3000:]
            time.sleep(0.5)
        torch.manual_seed(0)
        vqvae, varsr = build(VARSRConfig.preset("tiny"))
        ckpt = save_pretrained(root / "ckpt", vqvae, varsr)
        register_model(
            ckpt,
            NAME,
            tracking_uri=uri,
            validate_example=False,
            config=load_inference_config(overrides=["runtime.cpu_threads=1"]),
        )
        yield uri
    finally:
        os.killpg(tracking.pid, signal.SIGTERM)
        try:
            tracking.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(tracking.pid, signal.SIGKILL)
            tracking.wait(timeout=10)


def model_copies(folder: Path) -> list[Path]:
    """Downloaded MLflow models (folders with an MLmodel file) anywhere under ``folder``."""
    return sorted(p.parent for p in folder.rglob("MLmodel"))


def process_table() -> dict[int, dict]:
    """Every process now: pid -> ppid, pgid, state (R, S, Z, ...), command line."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        out[int(d.name)] = {"state": fields[0], "ppid": int(fields[1]), "pgid": int(fields[2]), "cmd": cmd}
    return out


def descendants(pid: int) -> dict[int, dict]:
    table = process_table()
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for p, info in table.items():
            if info["ppid"] == parent and p not in found:
                found[p] = info
                frontier.append(p)
    return found


def listening(port: int) -> bool:
    """Whether any socket listens on TCP ``port`` (IPv4 or IPv6), from /proc/net/tcp*."""
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if not path.is_file():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":  # 0A = LISTEN
                return True
    return False


def can_bind(port: int) -> bool:
    """A new server could listen on the port (SO_REUSEADDR, as servers do, so TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
            return True
        except OSError:
            return False


def start_serving(uri: str, port: int, tmpdir: Path, log_path: Path) -> subprocess.Popen:
    """`varsr serve` as a user starts it (its own session so the test can find it), answering /ping."""
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(ROOT)}
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "infra.cli",
            "serve",
            f"models:/{NAME}@champion",
            "--port",
            str(port),
            "--tracking-uri",
            uri,
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"varsr serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server not ready:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def server_processes(proc: subprocess.Popen) -> tuple[dict[int, dict], set[int]]:
    """The processes under `varsr serve` and the process groups they are in (with its own)."""
    tree = descendants(proc.pid)
    assert any("mlflow" in i["cmd"] and " serve" in i["cmd"] for i in tree.values()), tree
    assert any("uvicorn" in i["cmd"] for i in tree.values()), tree
    return tree, {i["pgid"] for i in tree.values()} | {proc.pid}


def left_behind(tree: dict[int, dict], groups: set[int], zombies_count: bool = True) -> dict[int, dict]:
    now = process_table()
    return {
        p: i
        for p, i in now.items()
        if (p in tree or i["pgid"] in groups)
        and (zombies_count or i["state"] != "Z")
        and i["cmd"] == tree.get(p, i)["cmd"]
    }


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_stops_the_whole_server_and_cleans_up(registered, tmp_path, sig):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    port = free_port()
    proc = start_serving(registered, port, tmpdir, tmp_path / "serve.log")
    tree, groups = server_processes(proc)
    assert listening(port)
    assert len(model_copies(tmpdir)) == 1  # mlflow's temporary copy of the model, in the server's own TMPDIR

    os.kill(proc.pid, sig)  # to `varsr serve` alone, as `kill`, systemd or a terminal would
    rc = proc.wait(timeout=90)
    log = (tmp_path / "serve.log").read_text()
    assert rc == 0, log[-2000:]
    assert left_behind(tree, groups) == {}, log[-2000:]
    assert not listening(port) and can_bind(port)
    assert list(tmpdir.iterdir()) == []  # the model's temporary copy went with the server
    assert f"{signal.Signals(sig).name} received" in log and "varsr serve: stopped" in log


def test_sigkill_to_varsr_serve_still_takes_the_server_down(registered, tmp_path):
    """SIGKILL cannot be handled: the parent-death signal stops mlflow, and mlflow's stops uvicorn."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    port = free_port()
    proc = start_serving(registered, port, tmpdir, tmp_path / "serve.log")
    tree, groups = server_processes(proc)
    assert len(model_copies(tmpdir)) == 1
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    deadline = time.monotonic() + 60
    while (left_behind(tree, groups, zombies_count=False) or listening(port)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left_behind(tree, groups, zombies_count=False) == {}
    assert not listening(port)
