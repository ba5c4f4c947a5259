"""A multi-node Ray cluster on this machine, for real: Ray's own multi-node test cluster (separate raylets), a head
with 0 CPUs (as on KubeRay, so every task lands on a worker node) and two 1-CPU worker nodes, each with its own
scratch folder, all on 127.0.0.1. The processes are started with the S3 endpoint's environment, as the cluster's
nodes would be configured, and the ``varsr`` commands connect to it with ``--ray-address``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class RayCluster:
    cluster: object
    address: str
    scratch: Path
    workers: list = field(default_factory=list)
    scratch_of: dict = field(default_factory=dict)  # worker node -> its scratch folder
    added: int = 0

    def add_worker(self):
        """A 1-CPU worker node with a scratch folder of its own."""
        self.added += 1
        d = self.scratch / f"node{self.added}"
        d.mkdir(parents=True, exist_ok=True)
        node = self.cluster.add_node(
            num_cpus=1,
            node_ip_address="127.0.0.1",
            object_store_memory=120 * 1024**2,
            env_vars={"VARSR_SCRATCH": str(d)},
        )
        self.workers.append(node)
        self.scratch_of[node] = d
        self.cluster.wait_for_nodes()
        return node

    def kill_worker(self, node) -> None:
        """Kill every process of a worker node (its raylet and the tasks and actors on it)."""
        self.workers.remove(node)
        self.scratch_of.pop(node)
        self.cluster.remove_node(node, allow_graceful=False)


@pytest.fixture(scope="module")
def ray_cluster(s3_server, tmp_path_factory):
    from ray.cluster_utils import Cluster

    saved = dict(os.environ)
    os.environ.update(s3_server.env)  # the nodes' environment reaches the S3 endpoint
    try:
        scratch = tmp_path_factory.mktemp("nodes")
        c = Cluster(
            initialize_head=True,
            shutdown_at_exit=True,
            head_node_args={
                "num_cpus": 0,
                "node_ip_address": "127.0.0.1",
                "include_dashboard": False,
                "object_store_memory": 120 * 1024**2,
            },
        )
        rc = RayCluster(c, c.address, scratch)
        rc.add_worker()
        rc.add_worker()
        yield rc
        c.shutdown()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def varsr_env(s3_server, mlflow_server=None, extra: dict | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        **s3_server.env,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    if mlflow_server is not None:
        env.update(mlflow_server.env)
    env.update(extra or {})
    return env


def run_varsr(args: list[str], env: dict, cwd: Path, log: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``varsr ARGS`` to completion; its output goes to ``log`` and, on failure, into the assertion message."""
    with open(log, "w") as f:
        p = subprocess.run(
            [sys.executable, "-m", "infra.cli", *args],
            cwd=cwd,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    assert p.returncode == 0, f"varsr {' '.join(args)} exited {p.returncode}:\n{log.read_text()[-6000:]}"
    return p


def start_varsr(args: list[str], env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    f = open(log, "w")
    return subprocess.Popen(
        [sys.executable, "-m", "infra.cli", *args],
        cwd=cwd,
        env=env,
        stdout=f,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"{what}: the process ended first ({proc.returncode}):\n{log.read_text()[-4000:] if log else ''}"
            )
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
