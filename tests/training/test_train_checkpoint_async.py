"""Asynchronous checkpoint upload to object storage (checkpoint_async, training/checkpointing.py) on the loopback S3
(moto): the step loop returns after the local save, a checkpoint is committed (COMPLETE) only once its files are all
uploaded, a failed upload is never committed, and a committed one resumes."""

from __future__ import annotations

import math

import pytest

from infra.core.config import load_config
from infra.core.errors import UserError
from training import checkpointing
from training.config import TrainConfig
from training.run_dir import RunDir

FILES = ("trainer_state.json", "rng_rank0.pt", "mp_rank_00_model_states.pt", "COMPLETE")


def _cfg(out: str, shards, *extra):
    return load_config(
        TrainConfig,
        None,
        [
            "stage=isr",
            f"output_dir={out}",
            f"data.shards={shards}",
            "data.batch_size=2",
            "data.workers=0",
            "checkpoint_every=1",
            "keep_checkpoints=10",
            "checkpoint_async=true",
            "validation.num_images=1",
            "validation.batches=1",
            "tracking.enabled=false",
            *extra,
        ],
    )


def test_async_upload_commits_after_the_files_and_resumes(shards, tmp_path, dist_port, s3_env, s3_bucket):
    from training.trainer import train

    out = f"s3://{s3_bucket}/runs/async"
    r = train(_cfg(out, shards, "max_steps=3"))
    assert r.steps == 3
    run = RunDir(out, 0)
    # step 3 is still pending: its files may be uploading, and its COMPLETE is written only by a flush after them
    # (step 2's commit may still be running in the background: COMPLETE never comes before its files)
    assert checkpointing._PENDING is not None and checkpointing._PENDING.step == 3
    assert 3 not in checkpointing.complete_checkpoints(run)
    assert set(checkpointing.complete_checkpoints(run)) <= {1, 2}
    checkpointing.flush()
    assert checkpointing.complete_checkpoints(run) == [1, 2, 3]
    keys = set(s3_env.list_keys(s3_bucket, "runs/async/checkpoints/"))
    for step in (1, 2, 3):
        for name in FILES:
            assert f"runs/async/checkpoints/step_{step:08d}/{name}" in keys, (step, name)
    assert len(checkpointing.STALLS) >= 3
    r2 = train(_cfg(out, shards, "max_steps=4"), resume="auto")  # the committed checkpoint resumes
    assert r2.steps == 4 and len(r2.losses) == 1 and math.isfinite(r2.losses[0])
    checkpointing.flush()
    assert checkpointing.complete_checkpoints(run) == [1, 2, 3, 4]


def test_a_failed_upload_is_not_committed(shards, tmp_path, dist_port, s3_env, s3_bucket, monkeypatch):
    from training.trainer import train

    out = f"s3://{s3_bucket}/runs/broken"
    real = RunDir.publish

    def flaky(self, rel):
        if str(rel).endswith("step_00000002/rng_rank0.pt"):
            raise OSError("connection reset by the object store")
        return real(self, rel)

    monkeypatch.setattr(RunDir, "publish", flaky)
    with pytest.raises(
        UserError,
        match=r"uploading a checkpoint to .* failed \(rank 0, checkpoint step 2 \(upload\): "
        r"OSError: connection reset.*not committed",
    ) as e:
        train(_cfg(out, shards, "max_steps=3"))
    assert "\n" not in str(e.value)
    assert checkpointing._PENDING is None and checkpointing._COMMITTING is None
    assert checkpointing.complete_checkpoints(RunDir(out, 0)) == [1]  # step 1 stays the resume point


def test_two_ranks_commit_every_checkpoint_through_the_cli(shards, tmp_path, s3_env, s3_bucket):
    """torchrun + gloo, ZeRO-2: each rank uploads its own files in the background; every checkpoint ends complete,
    the last one committed by the launcher's flush before the process group goes."""
    import os
    import subprocess
    import sys

    out = f"s3://{s3_bucket}/runs/two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    sets = [
        f"output_dir={out}",
        f"data.shards={shards}",
        "data.batch_size=2",
        "data.workers=0",
        "data.split=global_batch",
        "zero_stage=2",
        "max_steps=3",
        "checkpoint_every=1",
        "keep_checkpoints=10",
        "checkpoint_async=true",
        "tracking.enabled=false",
        "validation.num_images=1",
        "validation.batches=1",
    ]
    cmd = [sys.executable, "-m", "infra.cli", "train", "isr", "--nproc=2", *[a for o in sets for a in ("--set", o)]]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert checkpointing.complete_checkpoints(RunDir(out, 0)) == [1, 2, 3]
    keys = set(s3_env.list_keys(s3_bucket, "runs/two/checkpoints/"))
    for step in (1, 2, 3):
        for name in (
            "trainer_state.json",
            "rng_rank0.pt",
            "rng_rank1.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "COMPLETE",
        ):
            assert f"runs/two/checkpoints/step_{step:08d}/{name}" in keys, (step, name)
