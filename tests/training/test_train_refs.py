"""Recorded references (infra.core.tracking.portable_ref / resolve_ref) from a real training run: the README's first
command puts its work folder inside the checkout (``--workdir varsr-demo``), and registering that run once opened an
empty store at ``runs/stage2/<repo>/varsr-demo/mlflow.db`` (issue 27). A run and its SQLite store inside the
checkout, outside it, and moved after the run must all register from their ``summary.json``."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pytest

from infra.core.config import load_config
from infra.core.tracking import REPO_REF, REPO_ROOT, portable_ref, resolve_ref, shipped_relpath

COMMON = [
    "data.batch_size=4",
    "data.workers=0",
    "optim.lr=2e-3",
    "validation.num_images=2",
    "validation.batches=1",
    "validation.top_k=5",
    "validation.every=0",
    "checkpoint_every=0",
    "log_every=1",
    "max_steps=2",
]
BASE = REPO_ROOT / "model" / "pretrained" / "small4-base"


# ---- the rule, on paths ---------------------------------------------------------------------------------------------
def test_a_shipped_file_is_recorded_by_its_place_in_the_repository(tmp_path):
    ref = portable_ref(BASE, tmp_path)
    assert ref == REPO_REF + "model/pretrained/small4-base"
    assert resolve_ref(ref, tmp_path / "anywhere") == str(BASE)  # whatever the reader's folder
    assert shipped_relpath(REPO_ROOT / "configs" / "demo" / "stage2.yaml") == os.path.join(
        "configs", "demo", "stage2.yaml"
    )


def test_a_work_folder_inside_the_checkout_is_not_a_shipped_file():
    work = REPO_ROOT / "varsr-demo"
    assert shipped_relpath(work / "mlflow.db") is None
    assert shipped_relpath(REPO_ROOT) is None
    ref = portable_ref(work / "mlflow.db", work / "runs" / "stage2")
    assert ref == os.path.join("..", "..", "mlflow.db")
    assert resolve_ref(ref, work / "runs" / "stage2") == str(work / "mlflow.db")


def test_outside_paths_urls_and_absolute_records(tmp_path):
    out = tmp_path / "runs" / "x"
    assert resolve_ref(portable_ref(tmp_path / "mlflow.db", out), out) == str(tmp_path / "mlflow.db")
    assert portable_ref("s3://bucket/runs/x/final", out) == "s3://bucket/runs/x/final"
    assert resolve_ref("s3://bucket/runs/x/final", out) == "s3://bucket/runs/x/final"
    assert resolve_ref("final", "s3://bucket/runs/x") == "s3://bucket/runs/x/final"
    assert resolve_ref("/data/old/mlflow.db", out) == "/data/old/mlflow.db"  # an older, absolute record
    assert resolve_ref(f"file://{tmp_path}/a/../b", out) == str(tmp_path / "b")


def test_the_storage_layer_reads_a_recorded_repository_path():
    from infra.core import storage

    assert storage.local_path(REPO_REF + "model/pretrained/small4-base") == str(BASE)
    assert storage.exists(REPO_REF + "model/pretrained/small4-base/config.json")


# ---- a real run, registered from its summary.json -------------------------------------------------------------------
def _train_and_register(shards, work: Path, name: str):
    """A 2-step stage-1 run writing into ``work`` (its SQLite store at ``work/mlflow.db``), registered by the CLI's
    composer as `varsr train c2i … register.name=NAME` does."""
    from infra.cli import register_trained_model
    from training.config import TrainConfig
    from training.trainer import train

    cfg = load_config(
        TrainConfig,
        None,
        [
            "stage=c2i",
            f"output_dir={work / 'runs' / 'stage1'}",
            f"data.shards={shards}",
            f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
            "tracking.experiment=refs",
            f"register.name={name}",
            *COMMON,
        ],
    )
    train(cfg)
    register_trained_model(cfg)
    return json.loads((work / "runs" / "stage1" / "summary.json").read_text())


def _versions(db: Path, name: str) -> list:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{db}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions(f"name='{name}'")


@pytest.fixture
def work_in_checkout():
    """A user's work folder inside the checkout, as the README's `--workdir varsr-demo` makes (removed after)."""
    work = REPO_ROOT / f"varsr-test-refs-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_a_run_inside_the_checkout_registers_and_still_does_after_moving_out(
    shards, work_in_checkout, tmp_path, dist_port
):
    from inference.registry import register_training_run

    summary = _train_and_register(shards, work_in_checkout, "refs-inside")
    assert summary["tracking_store"] == os.path.join("..", "..", "mlflow.db")  # relative, not `<repo>/varsr-…`
    assert [str(v.version) for v in _versions(work_in_checkout / "mlflow.db", "refs-inside")] == ["1"]
    assert not (work_in_checkout / "runs" / "stage1" / "<repo>").exists()  # no stray store opened in the run folder

    moved = tmp_path / "moved"
    shutil.move(str(work_in_checkout), moved)  # the user moves the whole folder out of the checkout
    mv = register_training_run(moved / "runs" / "stage1", "refs-inside")
    assert str(mv.version) == "2" and mv.run_id == summary["mlflow_run_id"]
    assert len(_versions(moved / "mlflow.db", "refs-inside")) == 2


def test_a_run_outside_the_checkout_registers_and_still_does_after_moving_into_it(shards, tmp_path, dist_port):
    from inference.registry import register_training_run

    work = tmp_path / "outside"
    summary = _train_and_register(shards, work, "refs-outside")
    assert summary["tracking_store"] == os.path.join("..", "..", "mlflow.db")
    assert [str(v.version) for v in _versions(work / "mlflow.db", "refs-outside")] == ["1"]

    inside = REPO_ROOT / f"varsr-test-refs-{uuid.uuid4().hex[:8]}"
    try:
        shutil.move(str(work), inside)
        mv = register_training_run(inside / "runs" / "stage1", "refs-outside")
        assert str(mv.version) == "2" and len(_versions(inside / "mlflow.db", "refs-outside")) == 2
    finally:
        shutil.rmtree(inside, ignore_errors=True)
