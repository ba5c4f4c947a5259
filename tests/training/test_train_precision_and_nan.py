"""bf16 + ZeRO-3 through the trainer, and the NaN/inf policy: weights that diverged make the loss non-finite; `stop`
ends the run with a clear error and the offending batch saved, `skip` skips those steps and finishes. A checkpoint
holding a NaN is refused at load (model.checkpoint.check_tensors), so the NaN is put into the weights after loading,
as a run that diverges has them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from infra.core.config import load_config
from infra.core.errors import UserError
from model import VARSRConfig, build, from_pretrained, save_pretrained
from training.config import TrainConfig
from training.trainer import train

COMMON = [
    "data.batch_size=4",
    "data.workers=0",
    "validation.num_images=1",
    "validation.batches=1",
    "checkpoint_every=0",
    "tracking.enabled=false",
]


def _cfg(tmp_path, name, shards, *extra):
    return load_config(
        TrainConfig, None, ["stage=isr", f"output_dir={tmp_path / name}", f"data.shards={shards}", *COMMON, *extra]
    )


def test_bf16_zero3_trains_and_exports(shards, tmp_path, dist_port):
    """Also the cluster DeepSpeed file: its ZeRO-3 tuning is merged with the trainer's batch sizes."""
    r = train(
        _cfg(
            tmp_path,
            "bf16z3",
            shards,
            "precision=bf16",
            "zero_stage=3",
            "max_steps=3",
            "deepspeed=configs/deepspeed/zero3_bf16.json",
        )
    )
    assert r.steps == 3 and all(math.isfinite(x) for x in r.losses)
    used = json.loads((tmp_path / "bf16z3" / "deepspeed_config.json").read_text())
    assert used["zero_optimization"]["stage3_prefetch_bucket_size"] == 50_000_000  # from the file
    assert used["train_micro_batch_size_per_gpu"] == 4 and used["train_batch_size"] == 4  # from the TrainConfig
    vq, var = from_pretrained(r.export_dir)  # gathered ZeRO-3 shards export as a full native checkpoint
    assert var.cfg.name == "tiny"
    assert all(torch.isfinite(p).all() for p in var.parameters())


@pytest.fixture
def corrupted_parent(tmp_path, monkeypatch):
    """A clean parent checkpoint whose output head gets a NaN once loaded, as weights that diverged hold one."""
    import training.trainer as trainer_module

    torch.manual_seed(0)
    vq, var = build(VARSRConfig.preset("tiny"))
    parent = save_pretrained(tmp_path / "parent", vq, var)
    real = trainer_module.build_models

    def diverged(cfg):
        vqvae, varsr, report, lineage = real(cfg)
        with torch.no_grad():
            varsr.head.weight[0, 0] = float("nan")
        return vqvae, varsr, report, lineage

    monkeypatch.setattr(trainer_module, "build_models", diverged)
    return parent


def test_a_parent_checkpoint_holding_a_nan_is_refused_before_training(shards, tmp_path, dist_port):
    torch.manual_seed(0)
    vq, var = build(VARSRConfig.preset("tiny"))
    with torch.no_grad():
        var.head.weight[0, 0] = float("nan")
    bad = save_pretrained(tmp_path / "nan-parent", vq, var)
    with pytest.raises(UserError, match="varsr.head.weight is not finite"):
        train(_cfg(tmp_path, "refused", shards, "max_steps=1", f"model.init_from={bad}"))


def test_nan_policy_stop_saves_the_offending_batch(shards, tmp_path, dist_port, corrupted_parent):
    cfg = _cfg(tmp_path, "stop", shards, "max_steps=3", "nan_policy=stop", f"model.init_from={corrupted_parent}")
    with pytest.raises(UserError, match="non-finite loss at step 0") as ei:
        train(cfg)
    assert "offending batch saved to" in str(ei.value)
    saved = tmp_path / "stop" / "nonfinite_step_00000000"
    info = json.loads((saved / "info_rank0.json").read_text())
    assert info["step"] == 0 and not math.isfinite(info["values"]["loss"]) and len(info["keys"]) == 4
    batch = torch.load(saved / "batch_rank0.pt", weights_only=True)
    assert batch["hr"].shape[0] == 4


def test_nan_policy_skip_skips_and_finishes(shards, tmp_path, dist_port, corrupted_parent):
    cfg = _cfg(tmp_path, "skip", shards, "max_steps=2", "nan_policy=skip", f"model.init_from={corrupted_parent}")
    r = train(cfg)
    assert r.steps == 2 and r.skipped_steps == 2  # every step skipped, none applied: the weights stay as loaded


def test_fp16_on_cpu_is_refused_clearly(shards, tmp_path, dist_port):
    if torch.cuda.is_available():
        pytest.skip("fp16 is valid on CUDA")
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        train(_cfg(tmp_path, "fp16", shards, "precision=fp16", "max_steps=1"))
