"""DeepSpeed JSON files: every shipped file parses with DeepSpeed's own config class, and the trainer merges a file
with what it derives (batch sizes from the TrainConfig and world size; ZeRO stage, precision and clipping must
agree)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infra.core.config import load_config
from infra.core.errors import UserError
from training.config import TrainConfig
from training.deepspeed_engine import deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted((ROOT / "configs" / "deepspeed").glob("*.json"))


def _ds_parse(d: dict):
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig(d)


def test_there_are_deepspeed_files_and_each_parses_with_deepspeed():
    assert FILES
    for f in FILES:
        parsed = _ds_parse(json.loads(f.read_text()))
        assert parsed.zero_optimization_stage in (2, 3), f
        assert parsed.bfloat16_config.enabled, f


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_trainer_merges_a_file_with_what_it_derives(path):
    stage = json.loads(path.read_text())["zero_optimization"]["stage"]
    cfg = load_config(
        TrainConfig,
        None,
        [
            f"deepspeed=configs/deepspeed/{path.name}",
            f"zero_stage={stage}",
            "precision=bf16",
            "data.batch_size=3",
            "optim.grad_accum=2",
        ],
    )
    merged = deepspeed_config(cfg, world_size=4)
    assert merged["train_micro_batch_size_per_gpu"] == 3 and merged["gradient_accumulation_steps"] == 2
    assert merged["train_batch_size"] == 3 * 2 * 4
    file_zero = json.loads(path.read_text())["zero_optimization"]
    assert all(merged["zero_optimization"][k] == v for k, v in file_zero.items())  # the file's tuning is kept
    parsed = _ds_parse(deepspeed_config(cfg, world_size=1))  # DeepSpeed checks against this process's world (1)
    assert parsed.train_batch_size == 6 and parsed.zero_optimization_stage == stage


def test_a_file_that_contradicts_the_run_is_refused_by_name(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}))
    cfg = load_config(TrainConfig, None, [f"deepspeed={f}", "zero_stage=1"])
    with pytest.raises(UserError, match=r"zero_optimization.stage=3 but this run has zero_optimization.stage=1"):
        deepspeed_config(cfg, world_size=1)
    cfg = load_config(TrainConfig, None, ["deepspeed=configs/deepspeed/zero2_bf16.json", "zero_stage=2"])
    with pytest.raises(UserError, match="bf16.enabled=True but this run has bf16.enabled=False"):
        deepspeed_config(cfg, world_size=1)
    with pytest.raises(UserError, match="does not exist"):
        deepspeed_config(load_config(TrainConfig, None, ["deepspeed=nope.json"]), world_size=1)


def test_an_inline_mapping_still_works():
    cfg = load_config(TrainConfig, None, ["deepspeed={zero_optimization: {reduce_bucket_size: 1000}}"])
    merged = deepspeed_config(cfg, world_size=1)
    assert merged["zero_optimization"] == {"reduce_bucket_size": 1000, "stage": 0}


def test_a_stale_extension_build_lock_is_removed_after_waiting_out_a_live_one(tmp_path, monkeypatch, capfd):
    """A killed JIT build leaves ``<op>/lock`` behind and the next build of the op would wait on it forever; before
    DeepSpeed builds, the trainer waits while a lock is young (a live build) and removes it once it is older than
    the limit, saying both; with no lock it returns at once."""
    import os
    import threading
    import time

    from training.deepspeed_engine import clear_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, live = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (stale, live):
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = time.time() - 100
    os.utime(stale, (old, old))
    threading.Timer(0.5, live.unlink).start()  # the live build finishes half a second later
    assert clear_stale_build_locks(max_age_s=30, poll_s=0.1) == [str(stale)]
    assert not stale.exists() and not live.exists()
    err = capfd.readouterr().err
    assert "removed a stale torch-extension build lock" in err and "waiting for a torch-extension build" in err
    live.touch()  # a lock that outlives the limit while we wait is removed too
    assert clear_stale_build_locks(max_age_s=0.3, poll_s=0.1) == [str(live)]
    assert clear_stale_build_locks(max_age_s=30) == []
