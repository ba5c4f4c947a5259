"""One optimiser step of stage 1 (c2i) or stage 2 (isr) through a DeepSpeed engine (docs/MODEL.md §5.3).

Per micro-batch: the frozen VQVAE tokenises HR (timed separately) unless the batch brings its tokens from the shards'
token cache (:func:`token_cache_choice` decides once per run), ``compute_loss`` runs the teacher-forced forward
(CE + diff_weight · refiner loss), then ``engine.backward`` / ``engine.step`` (DeepSpeed accumulates, clips to
``grad_clip`` and steps AdamW + the LR schedule at the accumulation boundary). A non-finite loss is agreed on by
all ranks before any backward, so ranks never diverge or deadlock.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.distributed as dist


def token_cache_choice(enabled: bool, shards, vqvae, augment: bool = False) -> tuple[bool, str]:
    """(use the shards' token cache?, the one line that says which path this run takes and why).

    The cache is used only when ``enabled`` (``data.token_cache``) and it was made by this run's frozen tokenizer:
    the sha256 of its weights and its scales equal the cache's. Otherwise HR crops are tokenised on the fly.
    """
    from model.checkpoint import tokenizer_sha256

    tc = shards.token_cache
    if augment:
        return False, ("data.augment=true: augmented HR crops have no cached tokens, tokenising HR on the fly"
                       + ("" if tc is None else f" (ignoring the token cache of {shards.location})"))
    if not enabled:
        return False, "token cache off (data.token_cache=false): tokenising HR on the fly"
    if tc is None:
        return False, (f"no token cache in {shards.location} (varsr data tokenize adds one): tokenising HR on the "
                       f"fly")
    own = tokenizer_sha256(vqvae)
    if tc.tokenizer_sha256 != own or [int(p) for p in tc.patch_nums] != [int(p) for p in vqvae.patch_nums]:
        return False, (f"token cache of {shards.location} was made by tokenizer {tc.tokenizer_sha256[:12]} for scales "
                       f"{list(tc.patch_nums)}, but this run's frozen tokenizer is {own[:12]} for scales "
                       f"{list(vqvae.patch_nums)}: ignoring it, tokenising HR on the fly")
    return True, f"using the token cache of {shards.location} (tokenizer {own[:12]}, made on {tc.device or '?'})"


class NonFiniteLoss(RuntimeError):
    """A micro-batch produced a NaN/inf loss (on any rank) and the policy is ``stop``."""

    def __init__(self, step: int, batch: dict, values: dict):
        super().__init__(f"non-finite loss at step {step}: {values}")
        self.step, self.batch, self.values = step, batch, values


class TimedTokenizer:
    """Proxy for the frozen VQVAE that adds the time spent tokenising to ``self.seconds``."""

    def __init__(self, vqvae, sync: Callable[[], None]):
        self._vq, self._sync, self.seconds = vqvae, sync, 0.0

    def _timed(self, fn):
        def wrapper(*a, **kw):
            self._sync()
            t = time.perf_counter()
            out = fn(*a, **kw)
            self._sync()
            self.seconds += time.perf_counter() - t
            return out
        return wrapper

    def __getattr__(self, name):
        attr = getattr(self._vq, name)
        return self._timed(attr) if name in ("img_to_idxBl", "idxBl_to_var_input") else attr


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


def train_step(engine, vqvae, batches: Iterator[dict], *, stage: str, step: int, device: torch.device,
               precision: str, generator: torch.Generator | None, nan_policy: str, grad_accum: int,
               augment_seed: int | None = None, augment_colour_p: float = 1.0, rank: int = 0) -> StepResult:
    """Pull ``grad_accum`` micro-batches, forward/backward each, and take one optimiser step. ``augment_seed``: when
    set, each micro-batch's crops are augmented (training/augment.py) with draws fixed by (seed, step, micro-batch,
    rank), so a resumed run trains on what an uninterrupted one would."""
    from model import compute_loss
    from model.sampling import stream_generator
    from training.augment import augment_crops

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    tok = TimedTokenizer(vqvae, sync)
    t = dict(data=0.0, tokenise=0.0, forward=0.0, backward=0.0, optimizer=0.0)
    sums = dict(loss=0.0, ce=0.0, diff=0.0, acc=0.0)
    acc_ps = ce_ps = None
    tokens = samples = skipped = bad = 0
    own_norm = None  # ZeRO-0 computes the clipped-over norm here; ZeRO>=1 reports it from the engine
    for micro in range(grad_accum):
        t0 = time.perf_counter()
        batch = next(batches)
        t["data"] += time.perf_counter() - t0
        bad += int(batch.get("bad", 0))
        hr = batch["hr"].to(device, non_blocking=True)
        lr = batch["lr"].to(device, non_blocking=True) if stage == "isr" else None
        label = (batch["label"] if stage == "isr" else batch["class_id"]).to(device)
        cached = ((batch["tokens"].to(device, non_blocking=True), batch["resid"].to(device, non_blocking=True))
                  if "tokens" in batch else None)
        if augment_seed is not None:
            gen = stream_generator(augment_seed, step * grad_accum + micro, rank)
            hr, lr = (augment_crops([hr, lr], gen, augment_colour_p) if lr is not None
                      else (augment_crops([hr], gen, augment_colour_p)[0], None))
            cached = None  # the cache holds the tokens of the un-augmented crop
        sync()
        t1, tok0 = time.perf_counter(), tok.seconds
        with _autocast(device, precision):
            out = compute_loss(tok, engine.module, hr, lr, label, generator=generator, tokens=cached)
        sync()
        t["tokenise"] += tok.seconds - tok0
        t["forward"] += time.perf_counter() - t1 - (tok.seconds - tok0)
        values = dict(loss=out.loss.item(), ce=out.ce.item(), diff=out.diff.item())
        finite = all(math.isfinite(v) for v in values.values())
        t2 = time.perf_counter()
        if not _all_ok(finite, device):
            if nan_policy == "stop":
                raise NonFiniteLoss(step, batch, values)
            skipped += 1
            if grad_accum == 1:  # the whole step is skipped on every rank: no backward, no optimiser update
                break
            # keep the accumulation boundary in lock-step: a zero-gradient micro-batch instead of this one
            zero = sum(p.sum() for p in engine.module.parameters() if p.requires_grad) * 0.0
            engine.backward(zero)
        else:
            engine.backward(out.loss)
            for k in sums:
                sums[k] += values[k] if k != "acc" else out.acc
            acc_ps = out.acc_per_scale if acc_ps is None else [a + b for a, b in zip(acc_ps, out.acc_per_scale)]
            ce_ps = out.ce_per_scale if ce_ps is None else [a + b for a, b in zip(ce_ps, out.ce_per_scale)]
            tokens += out.tokens
            samples += hr.shape[0]
        sync()
        t3 = time.perf_counter()
        t["backward"] += t3 - t2
        if engine.is_gradient_accumulation_boundary() and engine.zero_optimization_stage() == 0:
            grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
            own_norm = torch.stack(grads).norm().item() if grads else 0.0
        engine.step()
        sync()
        t["optimizer"] += time.perf_counter() - t3
    n = max(1, grad_accum - skipped)
    gn = (own_norm if own_norm is not None else engine.get_global_grad_norm()) if skipped < grad_accum else None
    if isinstance(gn, torch.Tensor):
        gn = gn.item()
    scale = getattr(engine.optimizer, "cur_scale", None) or getattr(engine.optimizer, "loss_scale", None) or 1.0
    return StepResult(
        loss=sums["loss"] / n, ce=sums["ce"] / n, diff=sums["diff"] / n, acc=sums["acc"] / n,
        acc_per_scale=[a / n for a in (acc_ps or [])], ce_per_scale=[c / n for c in (ce_ps or [])],
        tokens=tokens, samples=samples, grad_norm=None if gn is None else float(gn),
        lr=engine.get_lr()[0], loss_scale=float(scale), skipped=skipped, bad_samples=bad, timings=t,
    )
