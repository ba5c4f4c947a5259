"""The VARSR training objective (docs/MODEL.md §5.3): token cross-entropy over all scales + weighted refiner loss.

The frozen tokenizer's share of it lives here too: :func:`tokenize_hr` is the one definition of what training
tokenises (the HR crop, fp32, one sample at a time), used on the fly by :func:`compute_loss` and offline by the token
cache (``varsr data tokenize`` through :class:`model.checkpoint.FrozenTokenizer`), so cached tokens and residuals are
the values :func:`compute_loss` would compute itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .varsr import VARSR


@dataclass
class LossOutput:
    """loss = ce_weight·ce + diff_weight·diff (tensors with grad); the rest are detached statistics."""

    loss: torch.Tensor
    ce: torch.Tensor
    diff: torch.Tensor
    acc: float
    acc_per_scale: list[float]
    ce_per_scale: list[float]
    tokens: int


def _check_images(name: str, x, B: int | None, S: int) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (S, S):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (B, 3, {S}, {S}) tensor in [0, 1], got {shape}")
    if B is not None and x.shape[0] != B:
        raise ValueError(f"{name} has batch {x.shape[0]}, expected {B}")


def tokenize_hr(vqvae, hr: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """HR crops (B, 3, S, S) in [0, 1] -> (K index maps (B, pn²) long, residual R (B, pn_last², Cvae) float32).

    Under no_grad, in fp32 outside autocast, and one sample at a time: convolution kernels pick their algorithm by
    batch size (on CPU a batch of one runs other kernels than a batch of two), so tokenising per sample makes a
    sample's tokens independent of the batch it is drawn in; that is what lets a token cache made in other batches
    equal tokenising on the fly bit for bit. It costs nothing measurable: the encoder is compute-bound at 1 image.
    """
    with torch.no_grad(), torch.autocast(hr.device.type, enabled=False):
        x = hr.float() * 2 - 1
        parts = [vqvae.img_to_idxBl(x[i : i + 1]) for i in range(x.shape[0])]
    idx_list = [torch.cat([p[0][k] for p in parts]) for k in range(len(parts[0][0]))]
    return idx_list, torch.cat([p[1] for p in parts])


def _check_tokens(tokens, B: int, cfg) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Cached (indices (B, L), residual (B, pn_last², Cvae)) -> (K index maps, R), checked against the model."""
    if not (isinstance(tokens, (tuple, list)) and len(tokens) == 2):
        raise ValueError("tokens must be (indices (B, L), residual (B, pn_last², Cvae)) from the token cache")
    idx, R = tokens
    L, N, Cv = cfg.L, cfg.pn_last**2, cfg.vqvae.z_channels
    if idx.ndim != 2 or tuple(idx.shape) != (B, L):
        raise ValueError(f"cached indices must be ({B}, {L}), got {tuple(idx.shape)}")
    if R.dtype != torch.float32 or tuple(R.shape) != (B, N, Cv):
        raise ValueError(f"cached residual must be ({B}, {N}, {Cv}) float32, got {tuple(R.shape)} {R.dtype}")
    idx = idx.long()
    return list(idx.split([p * p for p in cfg.patch_nums], dim=1)), R


def compute_loss(
    vqvae,
    varsr: VARSR,
    hr: torch.Tensor,
    lr: torch.Tensor | None,
    label: torch.Tensor,
    generator: torch.Generator | None = None,
    tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LossOutput:
    """One teacher-forced step's loss.

    hr, lr: (B, 3, S, S) in [0, 1] (lr None for c2i); label (B,) long. The frozen VQVAE tokenises HR
    (:func:`tokenize_hr`) unless ``tokens`` brings them from the token cache: (indices (B, L) integer, residual
    R (B, pn_last², Cvae) float32), the values :func:`tokenize_hr` gives for these HR crops. CE is the uniform mean
    over all B·L target tokens (label smoothing cfg.label_smooth); the refiner loss uses the model's own argmax
    last-scale codes (docs/MODEL.md §2.10). c2i label dropout happens inside ``varsr.forward`` in training mode.
    """
    cfg = varsr.cfg
    S = cfg.image_size
    _check_images("hr", hr, None, S)
    B = hr.shape[0]
    if cfg.variant == "isr":
        if lr is None:
            raise ValueError("the isr variant needs lr images")
        _check_images("lr", lr, B, S)
    elif lr is not None:
        raise ValueError("the c2i variant takes no lr images (pass lr=None)")
    label = torch.as_tensor(label, dtype=torch.long, device=hr.device).reshape(-1)
    if label.numel() != B:
        raise ValueError(f"label must have one entry per image ({B}), got {label.numel()}")
    if label.min() < 0 or label.max() >= cfg.num_classes:
        raise ValueError(f"labels must lie in [0, {cfg.num_classes}), got {label.tolist()}")

    if tokens is None:
        idx_list, R = tokenize_hr(vqvae, hr)
    else:
        idx_list, R = _check_tokens(tokens, B, cfg)
    with torch.no_grad(), torch.autocast(hr.device.type, enabled=False):
        x_in = vqvae.idxBl_to_var_input(idx_list).float()
    gt = torch.cat(idx_list, dim=1)  # (B, L)
    logits, diff = varsr(x_in, label, None if lr is None else lr.float() * 2 - 1, R, generator=generator)

    V = logits.shape[-1]
    ce_tok = F.cross_entropy(
        logits.reshape(-1, V), gt.reshape(-1), reduction="none", label_smoothing=cfg.label_smooth
    ).view(B, -1)
    sl = varsr.scale_slices()
    if cfg.ce_weighting == "scale":
        ce = torch.stack([ce_tok[:, s].mean() for s in sl]).mean()
    else:
        ce = ce_tok.mean()
    loss = cfg.ce_weight * ce + cfg.diff_weight * diff
    with torch.no_grad():
        hit = (logits.argmax(-1) == gt).float()
        acc_ps = [hit[:, s].mean().item() for s in sl]
        ce_ps = [ce_tok[:, s].mean().item() for s in sl]
    return LossOutput(
        loss=loss, ce=ce, diff=diff, acc=hit.mean().item(), acc_per_scale=acc_ps, ce_per_scale=ce_ps, tokens=gt.numel()
    )
