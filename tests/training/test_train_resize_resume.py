"""A checkpoint resumes on another number of ranks (torchrun + gloo through the CLI; training/reshard.py).

ZeRO-2 in both directions (2 -> 1 and 1 -> 2 ranks); ZeRO 0 and 1 from 2 to 1 (the weights); ZeRO-3 is refused:
* the weights right after the resume equal the checkpoint's exactly (a resumed run stopped at the checkpoint's step
  exports them);
* the step count and the LR schedule continue (the resumed run's steps are the next ones, their LR is the
  uninterrupted run's at those steps);
* the first resumed step's loss equals (to 1e-6) the old-size run's at that step: rank 0 sees the same weights and
  the same samples (the data position carried over);
* the loss goes on within LOSS_TOL (relative) of an uninterrupted run at the new size: the two differ by the first
  steps' global batch (the resized run took them at the old size) and by which samples fill each batch, so the match
  is close, not exact.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from infra.core.net import free_port

CKPT, STEPS = 2, 4
LOSS_TOL = 0.10  # relative: |resumed - uninterrupted| / uninterrupted at the same step

pytestmark = pytest.mark.slow


def _train(out: Path, shards, nproc: int, zero: int, max_steps: int, resume: Path | None = None, ok: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    overrides = [
        f"output_dir={out}",
        f"data.shards={shards}",
        "data.batch_size=2",
        "data.workers=0",
        "data.split=global_batch",
        "data.shuffle_buffer=0",
        f"zero_stage={zero}",
        f"max_steps={max_steps}",
        f"total_steps={STEPS}",
        f"checkpoint_every={CKPT}",
        "keep_checkpoints=3",
        "optim.lr=2e-3",
        "optim.warmup_epochs=0",
        "model.overrides.drop_path_rate=0.0",
        "model.overrides.diff_weight=0.0",
        "tracking.enabled=false",
        "validation.num_images=1",
        "validation.batches=1",
        "seed=1",
    ]
    cmd = [sys.executable, "-m", "infra.cli", "train", "isr", f"--nproc={nproc}"]
    cmd += [a for o in overrides for a in ("--set", o)]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    if nproc == 1:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if not ok:
        return p
    assert p.returncode == 0, p.stderr[-4000:]
    return out


def _history(out: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r for r in rows if "loss/total" in r}


def _checkpoint_weights(ckpt: Path, zero: int) -> dict[str, torch.Tensor]:
    """The checkpoint's fp32 weights, read independently of the resume path: the engine's module state (ZeRO 0-2 hold
    the whole fp32 model there) or DeepSpeed's zero_to_fp32 merge of the ZeRO-3 partitions."""
    if zero < 3:
        from training.checkpointing import safe_load

        return safe_load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def _check_resize(
    tmp_path: Path, shards, zero: int, old: int, new: int, reference: Path | None, source: Path, go_on: bool = True
) -> None:
    ckpt = source / "checkpoints" / f"step_{CKPT:08d}"
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == old
    # 1. the weights at the moment of resume: a resumed run that stops at once exports them
    at = _train(tmp_path / f"at_{old}to{new}", shards, new, zero, CKPT, resume=ckpt)
    exported = load_file(str(at / "final" / "model.safetensors"))
    want = _checkpoint_weights(ckpt, zero)
    compared = 0
    for k, v in want.items():
        if f"varsr.{k}" in exported:
            assert torch.equal(exported[f"varsr.{k}"], v.float()), f"{k} differs from the checkpoint"
            compared += 1
    assert compared >= 0.9 * sum(k.startswith("varsr.") for k in exported), compared
    assert json.loads((at / "summary.json").read_text())["world_size"] == new
    if not go_on:
        return
    # 2. it goes on: the next steps, their LR from the same schedule, the loss close to an uninterrupted run's
    cont = _train(tmp_path / f"cont_{old}to{new}", shards, new, zero, STEPS, resume=ckpt)
    h = _history(cont)
    assert sorted(h) == list(range(CKPT + 1, STEPS + 1)), sorted(h)
    assert all(math.isfinite(r["loss/total"]) for r in h.values())
    assert json.loads((cont / "summary.json").read_text())["steps"] == STEPS
    assert (cont / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").is_file()
    # exact at the first resumed step (split=global_batch, no loader workers, no shuffle buffer): rank 0 computes its
    # loss on the same weights and the same samples as rank 0 of the uninterrupted run at the old size, whose logged
    # loss is rank 0's; any drift of weights, data position or RNG would show here
    src = _history(source)
    assert h[CKPT + 1]["loss/total"] == pytest.approx(src[CKPT + 1]["loss/total"], rel=1e-6, abs=0), (
        h[CKPT + 1]["loss/total"],
        src[CKPT + 1]["loss/total"],
    )
    if reference is None:
        return
    ref = _history(reference)
    for s in h:
        assert h[s]["lr"] == ref[s]["lr"], (s, h[s]["lr"], ref[s]["lr"])
        rel = abs(h[s]["loss/total"] - ref[s]["loss/total"]) / ref[s]["loss/total"]
        assert rel <= LOSS_TOL, f"step {s}: loss {h[s]['loss/total']:.4f} vs uninterrupted {ref[s]['loss/total']:.4f}"


def test_zero2_resumes_two_to_one_and_one_to_two(shards, tmp_path):
    one = _train(tmp_path / "one", shards, 1, 2, STEPS)  # uninterrupted runs, each with a checkpoint at CKPT
    two = _train(tmp_path / "two", shards, 2, 2, STEPS)
    _check_resize(tmp_path, shards, 2, 2, 1, reference=one, source=two)
    _check_resize(tmp_path, shards, 2, 1, 2, reference=two, source=one)


@pytest.mark.parametrize("zero", [0, 1])
def test_other_stages_resume_two_to_one_with_the_checkpoint_weights(shards, tmp_path, zero):
    two = _train(tmp_path / "two", shards, 2, zero, CKPT)
    _check_resize(tmp_path, shards, zero, 2, 1, reference=None, source=two, go_on=False)


def test_zero3_on_another_size_is_refused_in_one_line(shards, tmp_path):
    two = _train(tmp_path / "two", shards, 2, 3, CKPT)
    ckpt = two / "checkpoints" / f"step_{CKPT:08d}"
    p = _train(tmp_path / "one", shards, 1, 3, CKPT, resume=ckpt, ok=False)
    assert p.returncode == 2, p.stderr[-3000:]
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("varsr: error: ") and "ZeRO stage 3" in line and "resumes only on 2 rank(s)" in line, line
    assert "Traceback" not in p.stderr
