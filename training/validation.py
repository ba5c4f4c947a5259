"""Validation of stages 1-2 and the held-out sample picker every stage shares (docs/MODEL.md §5.3; the trainer calls
:func:`evaluate` every ``validation.every`` steps and at the end, training/trainer.py).

* Teacher-forced ``val/loss`` and ``val/acc`` on ``validation.batches`` batches of the held-out shards (the training
  shards when none are given), in the training step's precision.
* A sample grid of ``validation.num_images`` distinct held-out samples (:func:`distinct_samples`): LR | SR | HR with
  PSNR/SSIM of the SR (``val/psnr_y`` ...) for stage 2, generated | real of the same class for stage 1. Stage 0 picks
  the crops of its reconstruction grid and colour check with the same picker (training/stage0_vqvae.py).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from data_pipeline.shards import BatchStream, ShardSet, resolve_shards
from infra.core.metrics import batch_full_reference
from training.config import TrainConfig, ValidationSection
from training.steps import _autocast


def distinct_samples(
    stream: BatchStream, n: int, prefer_classes: bool = False, check: Callable[[dict], None] | None = None
) -> list[dict]:
    """Up to ``n`` held-out samples (``{hr, lr or None, class_id, key}``) with pairwise different HR images (shards
    hold several LR variants of one HR crop; a grid of one photo four times shows nothing), read from at most one
    epoch of ``stream``. ``prefer_classes``: first one sample per class, then the rest; ``check``: called on every
    batch read (e.g. the class-id check of stage 1)."""
    seen, found = set(), []
    for b in stream:
        if check is not None:
            check(b)
        for i in range(b["hr"].shape[0]):
            digest = hash(b["hr"][i].numpy().tobytes())
            if digest in seen:
                continue
            seen.add(digest)
            found.append(
                {
                    "hr": b["hr"][i],
                    "lr": b["lr"][i] if "lr" in b else None,
                    "class_id": int(b["class_id"][i]),
                    "key": str(b["key"][i]),
                }
            )
        enough = len({s["class_id"] for s in found}) >= n if prefer_classes else len(found) >= n
        if enough or stream.pos.epoch > 0 or len(found) >= 16 * n:
            break
    if prefer_classes:
        by_class: dict[int, dict] = {}
        for s in found:
            by_class.setdefault(s["class_id"], s)
        first = list(by_class.values())
        found = first + [s for s in found if all(s is not f for f in first)]
    return found[:n]


@torch.no_grad()
def evaluate(
    cfg: TrainConfig,
    model,
    vqvae,
    shards: ShardSet,
    image_size: int,
    device: torch.device,
    check: Callable[[dict], None],
) -> tuple[dict, tuple[list, list[str], list[str]]]:
    """(``val/...`` metrics, the sample grid's (rows, column titles, row labels)) of ``model`` on the validation
    shards (``data.val_shards``, else ``shards``); ``check``: the label check of the training stream."""
    from model import compute_loss

    v = cfg.validation
    val = resolve_shards(cfg.data.val_shards) if cfg.data.val_shards else shards
    # HR-only validation shards get the training preset's LR, drawn for (validation seed, epoch 0, key): the same LR
    # at every validation, so the curve compares like with like; shards with stored LR keep their stored LR
    hr_only = val.manifest is not None and val.manifest.lr_variants == 0
    stream = BatchStream(
        val,
        size=image_size,
        want_lr=cfg.stage == "isr",
        batch_size=cfg.data.batch_size,
        workers=0,
        seed=v.seed,
        rank=0,
        world=1,
        split="global_batch",
        shuffle_buffer=0,
        degrade=cfg.data.degrade if hr_only else "",
    )
    gen = torch.Generator(device=device).manual_seed(v.seed)
    losses, accs = [], []
    it = iter(stream)
    for _ in range(max(1, v.batches)):
        b = next(it)
        check(b)
        hr = b["hr"].to(device)
        lr = b["lr"].to(device) if cfg.stage == "isr" else None
        label = (b["label"] if cfg.stage == "isr" else b["class_id"]).to(device)
        with _autocast(device, cfg.precision):  # the training step's precision
            out = compute_loss(vqvae, model, hr, lr, label, generator=gen)
        losses.append(out.loss.item())
        accs.append(out.acc)
    metrics = {"val/loss": float(np.mean(losses)), "val/acc": float(np.mean(accs))}
    picked = distinct_samples(stream, max(1, v.num_images), prefer_classes=cfg.stage != "isr", check=check)
    if cfg.stage == "isr":
        return metrics, _sr_rows(model, picked, v, cfg.precision, device, metrics)
    return metrics, _generated_rows(model, picked, v, cfg.precision, device)


def _sr_rows(model, picked: list[dict], v: ValidationSection, precision: str, device: torch.device, metrics: dict):
    """LR | SR | HR per sample; PSNR/SSIM of the SR against the HR into ``metrics``."""
    hr = torch.stack([s["hr"] for s in picked])
    lr = torch.stack([s["lr"] for s in picked])
    gen = torch.Generator(device=device).manual_seed(v.seed)
    with _autocast(device, precision):
        sr = (
            model.generate(lr.to(device), label=0, cfg=v.cfg, top_k=v.top_k, top_p=v.top_p, generator=gen).float().cpu()
        )
    metrics.update({f"val/{k}": val for k, val in batch_full_reference(sr, hr).items()})
    labels = [
        f"{s['key'][-28:]}   SR PSNR-Y {batch_full_reference(sr[i : i + 1], hr[i : i + 1])['psnr_y']:.2f} dB"
        for i, s in enumerate(picked)
    ]
    return [[lr[i], sr[i], hr[i]] for i in range(len(picked))], ["LR input", "SR", "HR"], labels


def _generated_rows(model, picked: list[dict], v: ValidationSection, precision: str, device: torch.device):
    """Generated | real per sample, the generated image of the sample's class (one seed per row: tiles differ even
    for one class)."""
    imgs = []
    for i, s in enumerate(picked):
        gen = torch.Generator(device=device).manual_seed(v.seed + i)
        with _autocast(device, precision):
            imgs.append(
                model.generate(
                    None,
                    class_labels=torch.tensor([s["class_id"]], device=device),
                    cfg=v.cfg,
                    top_k=v.top_k,
                    top_p=v.top_p,
                    generator=gen,
                )
                .float()
                .cpu()[0]
            )
    labels = [f"class {s['class_id']}   seed {v.seed + i}" for i, s in enumerate(picked)]
    return [[imgs[i], s["hr"]] for i, s in enumerate(picked)], ["generated", "real, same class"], labels
