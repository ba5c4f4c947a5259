"""Shared fixtures for the training tests: shards built once by the real data pipeline from bundled photos."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

from infra.core.net import free_port

VENV_BIN = str(Path(sys.executable).parent)
os.environ["PATH"] = VENV_BIN + os.pathsep + os.environ.get("PATH", "")


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """64-px shards (HR + LR + JSON, manifest) from the sample corpus via data_pipeline.build on a short-lived Ray."""
    import ray

    import data_pipeline as dp
    from data_pipeline.sample_corpus import write_sample_corpus

    root = tmp_path_factory.mktemp("train_shards")
    write_sample_corpus(root / "corpus", with_bad_files=False)
    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False
        )
    try:
        cfg = dp.load_build_config(
            None,
            [
                "shard.crop_size=64",
                "shard.max_samples_per_shard=4",
                "select.cluster.k=4",
                f"score.weights_dir={root / 'no-iqa'}",
                "shard.lr_variants=2",
            ],
        )
        dp.build(str(root / "corpus"), str(root / "shards"), cfg, print_summary=False)
    finally:
        if started:
            ray.shutdown()  # no Ray workers left running beside the DeepSpeed ranks
    return root / "shards"


@pytest.fixture
def dist_port(monkeypatch):
    """A fresh rendezvous port and a clean single-process env for each in-process DeepSpeed run."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    port = free_port()
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    return port


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
