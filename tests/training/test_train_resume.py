"""Exact resume: a run stopped after k steps and resumed (--resume auto) gives the uninterrupted loss sequence."""

from __future__ import annotations

import json

import pytest

from infra.core.config import load_config
from infra.core.errors import UserError
from training.config import TrainConfig
from training.trainer import train


def _cfg(tmp_path, name, shards, extra=()):
    return load_config(
        TrainConfig,
        None,
        [
            "stage=isr",
            f"output_dir={tmp_path / name}",
            f"data.shards={shards}",
            "data.batch_size=8",
            "data.workers=2",
            "data.shuffle_buffer=16",
            "total_steps=7",
            "optim.lr=2e-3",
            "tracking.enabled=false",
            "validation.num_images=1",
            "validation.batches=1",
            "seed=3",
            *extra,
        ],
    )


def test_interrupted_run_resumes_exactly(shards, tmp_path, dist_port, monkeypatch):
    full = train(_cfg(tmp_path, "full", shards, ["max_steps=7"]))
    assert full.steps == 7
    monkeypatch.setenv("MASTER_PORT", str(dist_port + 1))
    first = train(_cfg(tmp_path, "split", shards, ["max_steps=3"]))  # a real stop after 3 steps (checkpoint)
    assert (tmp_path / "split" / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
    monkeypatch.setenv("MASTER_PORT", str(dist_port + 2))
    rest = train(_cfg(tmp_path, "split", shards, ["max_steps=7"]), resume="auto")
    assert rest.steps == 7 and len(rest.losses) == 4
    assert first.losses + rest.losses == pytest.approx(full.losses, rel=1e-6, abs=1e-7)
    # the 4 steps/epoch boundary was crossed after the resume: data position restored, not restarted
    state = json.loads((tmp_path / "split" / "checkpoints" / "step_00000007" / "trainer_state.json").read_text())
    assert state["positions"]["0"]["epoch"] >= 1 and state["positions"]["0"]["samples_consumed"] == 56

    monkeypatch.setenv("MASTER_PORT", str(dist_port + 3))
    with pytest.raises(UserError, match="another config"):
        train(_cfg(tmp_path, "split", shards, ["max_steps=9", "model.overrides.depth=3"]), resume="auto")


def test_a_restarted_ray_worker_finds_its_own_launchs_checkpoints(tmp_path):
    """Ray Train restarts workers after a failure with the launch id the driver drew; they resume from the latest
    complete checkpoint of that launch, whatever ``--resume`` says, and never from another launch's checkpoints."""
    from training import checkpointing
    from training.run_dir import RunDir

    run = RunDir(str(tmp_path / "run"))

    def ckpt(step: int, marker: str | None) -> None:
        d = tmp_path / "run" / "checkpoints" / f"step_{step:08d}"
        d.mkdir(parents=True)
        if marker is not None:
            (d / "COMPLETE").write_text(marker)

    ckpt(4, json.dumps({"step": 4, "launch": "old"}))  # an earlier launch into the same output folder
    ckpt(8, json.dumps({"step": 8, "launch": "L1"}))
    ckpt(12, json.dumps({"step": 12, "launch": "L1"}))
    ckpt(16, None)  # torn: never complete
    ckpt(20, json.dumps({"step": 20}))  # written outside Ray Train (no launch)

    assert checkpointing.find_resume(run, None, launch="L1").name == "step_00000012"
    assert checkpointing.find_resume(run, None, launch="L2") is None  # a fresh launch starts from scratch
    assert checkpointing.find_resume(run, "auto", launch="L2").name == "step_00000020"  # unless asked to resume
    assert checkpointing.find_resume(run, "auto").name == "step_00000020"
    assert checkpointing.launch_of(run, 4) == "old" and checkpointing.launch_of(run, 20) is None
