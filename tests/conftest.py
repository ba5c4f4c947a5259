"""Shared pytest setup: quiet offline environment, CPU-only, one local Ray runtime per session."""

from __future__ import annotations

import os

import pytest

from infra.core.net import free_port

# real services on loopback (moto S3, PostgreSQL, MLflow tracking server), started lazily once per session
pytest_plugins = ("tests.services",)

for _k, _v in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "HF_HUB_OFFLINE": "1",
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
    "GIT_PYTHON_REFRESH": "quiet",
    # idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads lose their core to
    # the other test processes (Ray workers, DeepSpeed ranks, the model server) and slow everything down
    "OMP_WAIT_POLICY": "PASSIVE",
    # every Ray runtime of the tests (local, or the multi-node test cluster) stays on 127.0.0.1: Ray otherwise
    # rewrites loopback addresses to the machine's own network address
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}.items():
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Test workloads are tiny: one intra-op thread avoids OpenMP contention on shared 2-core machines (subprocesses
    such as DeepSpeed ranks, Ray workers and model servers keep their own settings)."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray runtime (ray.init), started once per test session and shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # a runtime of its own, never a cluster another test left on this machine
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=200 * 1024**2,
            log_to_driver=False,
            ignore_reinit_error=True,
        )
    yield ray
    ray.shutdown()


@pytest.fixture
def port() -> int:
    return free_port()


# ---- the fast loop: `pytest -m "not slow"` (docs/DEVELOPING.md) ----------------------------------------------------
# Fixtures that start real heavy components: a Ray runtime or cluster, the loopback S3, PostgreSQL and MLflow servers,
# shards built by a Ray job (a one-rank DeepSpeed engine on gloo is not heavy by itself). A test that uses one,
# directly or through another fixture, is an integration test and is marked `slow`. A test module lists its own heavy
# fixtures (a served or registered model, a trained checkpoint) in a module-level HEAVY_FIXTURES; a self-contained
# slow test carries @pytest.mark.slow itself; every test of the separate suites (cluster, readme, benchmark_only, gpu)
# is `slow` too. Every test still runs in .ci/run.
HEAVY_FIXTURES = frozenset(
    {
        "ray_local",
        "ray_cluster",
        "shards",
        "s3_server",
        "s3_server_strict",
        "s3_env",
        "s3_bucket",
        "postgres_server",
        "mlflow_server",
    }
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = getattr(item, "module", None)
        heavy = HEAVY_FIXTURES | frozenset(getattr(module, "HEAVY_FIXTURES", ()))
        suites = {"cluster", "readme", "benchmark_only", "gpu"} & {m.name for m in item.iter_markers()}
        if suites or heavy & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
