"""One optimiser step of stage 1 (c2i) or stage 2 (isr) through a DeepSpeed engine (docs/MODEL.md §5.3).

Per micro-batch: the frozen VQVAE tokenises HR (timed separately) unless the batch brings its tokens from the shards'
token cache (:func:`token_cache_choice` decides once per run), ``compute_loss`` runs the teacher-forced forward
(CE + diff_weight · refiner loss), then ``engine.backward`` / ``engine.step`` (DeepSpeed accumulates, clips to
``grad_clip`` and steps AdamW + the LR schedule at the accumulation boundary). A non-finite loss is agreed on by
all ranks before any backward, so ranks never diverge or deadlock.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist

from training.timing import StepTimer, TimedTokenizer


def token_cache_choice(enabled: bool, shards, vqvae, augment: bool = False) -> tuple[bool, str]:
    """(use the shards' token cache?, the one line that says which path this run takes and why).

    The cache is used only when ``enabled`` (``data.token_cache``) and it was made by this run's frozen tokenizer:
    the sha256 of its weights and its scales equal the cache's. Otherwise HR crops are tokenised on the fly.
    """
    from model.checkpoint import tokenizer_sha256

    tc = shards.token_cache
    if augment:
        return False, (
            "data.augment=true: augmented HR crops have no cached tokens, tokenising HR on the fly"
            + ("" if tc is None else f" (ignoring the token cache of {shards.location})")
        )
    if not enabled:
        return False, "token cache off (data.token_cache=false): tokenising HR on the fly"
    if tc is None:
        return False, (f"no token cache in {shards.location} (varsr data tokenize adds one): tokenising HR on the fly")
    own = tokenizer_sha256(vqvae)
    if tc.tokenizer_sha256 != own or [int(p) for p in tc.patch_nums] != [int(p) for p in vqvae.patch_nums]:
        return False, (
            f"token cache of {shards.location} was made by tokenizer {tc.tokenizer_sha256[:12]} for scales "
            f"{list(tc.patch_nums)}, but this run's frozen tokenizer is {own[:12]} for scales "
            f"{list(vqvae.patch_nums)}: ignoring it, tokenising HR on the fly"
        )
    return True, f"using the token cache of {shards.location} (tokenizer {own[:12]}, made on {tc.device or '?'})"


class NonFiniteLoss(RuntimeError):
    """A micro-batch produced a NaN/inf loss (on any rank) and the policy is ``stop``."""

    def __init__(self, step: int, batch: dict, values: dict):
        super().__init__(f"non-finite loss at step {step}: {values}")
        self.step, self.batch, self.values = step, batch, values


@dataclass
class StepResult:
    loss: float
    ce: float
    diff: float
    acc: float
    acc_per_scale: list[float]
    ce_per_scale: list[float]
    tokens: int
    samples: int
    grad_norm: float | None
    lr: float
    loss_scale: float
    skipped: int  # micro-batches skipped for a non-finite loss
    bad_samples: int  # undecodable samples skipped by the loader
    timings: dict[str, float] = field(default_factory=dict)  # data, tokenise, forward, backward, optimizer


def _all_ok(flag: bool, device) -> bool:
    """True when the flag holds on every rank."""
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.item() == 0.0


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16" and device.type == "cuda":
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


@dataclass(frozen=True)
class StepSetup:
    """What every optimiser step of a run shares, fixed at setup: the stage, where and in which precision it runs,
    what a non-finite loss does, how many micro-batches make a step, and the augmentation (``augment_seed`` None =
    off; draws fixed by (seed, step, micro-batch, rank), so a resumed run trains on what an uninterrupted one would)."""

    stage: str
    device: torch.device
    precision: str = "fp32"
    nan_policy: str = "stop"
    grad_accum: int = 1
    augment_seed: int | None = None
    augment_colour_p: float = 1.0
    rank: int = 0

    @classmethod
    def of(cls, cfg, device: torch.device, rank: int) -> StepSetup:
        """The setup a :class:`~training.config.TrainConfig` asks for, on this rank."""
        return cls(
            stage=cfg.stage,
            device=device,
            precision=cfg.precision,
            nan_policy=cfg.nan_policy,
            grad_accum=cfg.optim.grad_accum,
            augment_seed=cfg.seed if cfg.data.augment else None,
            augment_colour_p=cfg.data.augment_colour_p,
            rank=rank,
        )


class _Sums:
    """The running sums of one step's finite micro-batches."""

    def __init__(self) -> None:
        self.values = dict(loss=0.0, ce=0.0, diff=0.0, acc=0.0)
        self.acc_ps: list[float] | None = None
        self.ce_ps: list[float] | None = None
        self.tokens = self.samples = 0

    def add(self, values: dict, out, samples: int) -> None:
        for k in self.values:
            self.values[k] += values[k] if k != "acc" else out.acc
        self.acc_ps = _add(self.acc_ps, out.acc_per_scale)
        self.ce_ps = _add(self.ce_ps, out.ce_per_scale)
        self.tokens += out.tokens
        self.samples += samples


def _add(total: list[float] | None, values: list[float]) -> list[float]:
    return list(values) if total is None else [a + b for a, b in zip(total, values)]


def _inputs(batch: dict, run: StepSetup, step: int, micro: int):
    """(hr, lr or None, label, cached tokens or None) of one micro-batch on the device, augmented when on."""
    from model.sampling import stream_generator
    from training.augment import augment_crops

    dev = run.device
    hr = batch["hr"].to(dev, non_blocking=True)
    lr = batch["lr"].to(dev, non_blocking=True) if run.stage == "isr" else None
    label = (batch["label"] if run.stage == "isr" else batch["class_id"]).to(dev)
    cached = (
        (batch["tokens"].to(dev, non_blocking=True), batch["resid"].to(dev, non_blocking=True))
        if "tokens" in batch
        else None
    )
    if run.augment_seed is not None:
        gen = stream_generator(run.augment_seed, step * run.grad_accum + micro, run.rank)
        hr, lr = (
            augment_crops([hr, lr], gen, run.augment_colour_p)
            if lr is not None
            else (augment_crops([hr], gen, run.augment_colour_p)[0], None)
        )
        cached = None  # the cache holds the tokens of the un-augmented crop
    return hr, lr, label, cached


def train_step(
    engine, vqvae, batches: Iterator[dict], run: StepSetup, step: int, generator: torch.Generator | None = None
) -> StepResult:
    """Pull ``run.grad_accum`` micro-batches, forward/backward each, and take one optimiser step (the phases' wall
    time is measured around them by training/timing.py)."""
    from model import compute_loss

    timer = StepTimer.on(run.device)
    tok = TimedTokenizer(vqvae, timer)
    sums, skipped, bad = _Sums(), 0, 0
    own_norm = None  # ZeRO-0 computes the clipped-over norm here; ZeRO>=1 reports it from the engine
    for micro in range(run.grad_accum):
        with timer("data", sync=False):
            batch = next(batches)
        bad += int(batch.get("bad", 0))
        hr, lr, label, cached = _inputs(batch, run, step, micro)
        with timer("forward"), _autocast(run.device, run.precision):
            out = compute_loss(tok, engine.module, hr, lr, label, generator=generator, tokens=cached)
        values = dict(loss=out.loss.item(), ce=out.ce.item(), diff=out.diff.item())
        finite = _all_ok(all(math.isfinite(v) for v in values.values()), run.device)
        with timer("backward"):
            if not finite:
                if run.nan_policy == "stop":
                    raise NonFiniteLoss(step, batch, values)
                skipped += 1
                if run.grad_accum == 1:  # the whole step is skipped on every rank: no backward, no optimiser update
                    break
                # keep the accumulation boundary in lock-step: a zero-gradient micro-batch instead of this one
                engine.backward(sum(p.sum() for p in engine.module.parameters() if p.requires_grad) * 0.0)
            else:
                engine.backward(out.loss)
                sums.add(values, out, hr.shape[0])
        with timer("optimizer"):
            if engine.is_gradient_accumulation_boundary() and engine.zero_optimization_stage() == 0:
                grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
                own_norm = torch.stack(grads).norm().item() if grads else 0.0
            engine.step()
    n = max(1, run.grad_accum - skipped)
    gn = (own_norm if own_norm is not None else engine.get_global_grad_norm()) if skipped < run.grad_accum else None
    if isinstance(gn, torch.Tensor):
        gn = gn.item()
    scale = getattr(engine.optimizer, "cur_scale", None) or getattr(engine.optimizer, "loss_scale", None) or 1.0
    v = sums.values
    return StepResult(
        loss=v["loss"] / n,
        ce=v["ce"] / n,
        diff=v["diff"] / n,
        acc=v["acc"] / n,
        acc_per_scale=[a / n for a in (sums.acc_ps or [])],
        ce_per_scale=[c / n for c in (sums.ce_ps or [])],
        tokens=sums.tokens,
        samples=sums.samples,
        grad_norm=None if gn is None else float(gn),
        lr=engine.get_lr()[0],
        loss_scale=float(scale),
        skipped=skipped,
        bad_samples=bad,
        timings=timer.seconds,
    )
