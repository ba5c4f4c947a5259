"""Resuming never unpickles code (issue 28, finding 6; training/checkpointing.py, docs/SECURITY.md).

DeepSpeed reads its checkpoint files with ``torch.load(weights_only=False)``; the platform checks every file of a
checkpoint against an allow-list first and routes DeepSpeed's reads through ``weights_only=True``. A planted object
whose ``__reduce__`` would create a marker file is refused with one line naming the file, and the marker never
appears; real checkpoints (ZeRO 0 fp32, ZeRO 2 bf16 with its loss scaler and fragment addresses) still round-trip.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_pipeline.shards import DataPosition
from infra.core.errors import UserError


class _RunsCode:
    """Unpickling this creates ``marker``: what a hostile checkpoint would do (here: harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _plant(path: Path, marker: Path) -> None:
    sd = torch.load(path, weights_only=False)  # our own file, just written by DeepSpeed
    sd["planted"] = _RunsCode(marker)
    torch.save(sd, path)


def _engine(zero: int, bf16: bool):
    import deepspeed

    from training import deepspeed_engine

    deepspeed_engine.init_distributed(torch.device("cpu"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 2,
        "zero_optimization": {"stage": zero},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=cfg, dist_init_required=False
    )
    x = torch.randn(2, 4, dtype=torch.bfloat16 if bf16 else torch.float32)
    loss = engine(x).float().sum()
    engine.backward(loss)
    engine.step()
    return engine


def _save(engine, tmp_path: Path) -> Path:
    from training import checkpointing
    from training.run_dir import RunDir

    run = RunDir(str(tmp_path / "run"))
    checkpointing.save(engine, run, 1, DataPosition(), None, {}, keep=2)
    return tmp_path / "run" / "checkpoints" / "step_00000001"


@pytest.mark.parametrize("zero,bf16", [(0, False), (2, True)])
@pytest.mark.slow
def test_real_checkpoints_resume_through_the_allow_list(tmp_path, dist_port, zero, bf16):
    from training import checkpointing

    engine = _engine(zero, bf16)
    ckpt = _save(engine, tmp_path)
    before = [p.detach().float().clone() for p in engine.module.parameters()]
    with torch.no_grad():
        for p in engine.module.parameters():
            p.add_(1.0)
    step, pos = checkpointing.load(engine, ckpt, None, {})
    assert step == 1 and pos == DataPosition()
    after = [p.detach().float() for p in engine.module.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize(
    "zero,bf16,victim",
    [(0, False, "mp_rank_00_model_states.pt"), (2, True, "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")],
)
def test_a_planted_pickle_is_refused_by_name_and_never_runs(tmp_path, dist_port, zero, bf16, victim):
    from training import checkpointing

    engine = _engine(zero, bf16)
    ckpt = _save(engine, tmp_path)
    marker = tmp_path / "pwned"
    _plant(ckpt / victim, marker)
    with pytest.raises(UserError) as e:
        checkpointing.load(engine, ckpt, None, {})
    msg = str(e.value)
    assert "\n" not in msg and victim in msg and "builtins.exec" in msg, msg
    assert not marker.exists()


def test_deepspeeds_own_reads_are_safe_even_past_the_folder_check(tmp_path, dist_port, monkeypatch):
    """Defence in depth: with the up-front scan of the folder switched off, DeepSpeed's reads still go through
    ``weights_only=True`` and refuse the file (the scan is static; the load is the guarantee)."""
    from training import checkpointing

    engine = _engine(0, False)
    ckpt = _save(engine, tmp_path)
    marker = tmp_path / "pwned"
    _plant(ckpt / "mp_rank_00_model_states.pt", marker)
    monkeypatch.setattr(checkpointing, "check_checkpoint_files", lambda ckpt: None)
    with pytest.raises(UserError, match="mp_rank_00_model_states.pt"):
        checkpointing.load(engine, ckpt, None, {})
    assert not marker.exists()
    assert "load" not in vars(engine.checkpoint_engine)  # DeepSpeed's own method is back after the load


def test_train_resume_auto_refuses_a_planted_checkpoint(shards, tmp_path, dist_port, monkeypatch):
    """The real path: ``varsr train ... --resume auto`` (the trainer API) on a tiny config, a checkpoint of a real
    run with a planted model-states file: the resumed run stops before training, with one line naming the file."""
    from infra.core.config import load_config
    from training.config import TrainConfig
    from training.trainer import train

    def cfg(steps: int):
        return load_config(
            TrainConfig,
            None,
            [
                "stage=isr",
                f"output_dir={tmp_path / 'run'}",
                f"data.shards={shards}",
                "data.batch_size=4",
                "data.workers=0",
                "data.shuffle_buffer=4",
                "total_steps=4",
                f"max_steps={steps}",
                "tracking.enabled=false",
                "validation.num_images=1",
                "validation.batches=1",
                "seed=3",
            ],
        )

    train(cfg(1))
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    marker = tmp_path / "pwned"
    _plant(ckpt / "mp_rank_00_model_states.pt", marker)
    monkeypatch.setenv("MASTER_PORT", str(dist_port + 1))
    with pytest.raises(UserError) as e:
        train(cfg(2), resume="auto")
    assert "\n" not in str(e.value) and str(ckpt / "mp_rank_00_model_states.pt") in str(e.value)
    assert not marker.exists()
    assert not (tmp_path / "run" / "checkpoints" / "step_00000002").exists()
