"""Resampling primitives of the multi-scale residual quantizer (docs/MODEL.md §1.3, docs/MODEL.md §7.3).

Kept as PyTorch ops on purpose: the released tokens depend on PyTorch's exact "area" (adaptive average pooling,
overlapping windows for non-divisors) and "bicubic" (A = -0.75, align_corners=False, border replicate) numerics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def area_down(f: torch.Tensor, pn: int) -> torch.Tensor:
    """Downsample a (B, C, H, W) latent to (B, C, pn, pn) by area averaging (a new tensor, never a view of f)."""
    return F.interpolate(f, size=(pn, pn), mode="area")


def bicubic_up(h: torch.Tensor, size: int) -> torch.Tensor:
    """Upsample a (B, C, pn, pn) code map to (B, C, size, size) with PyTorch bicubic, align_corners=False."""
    return F.interpolate(h, size=(size, size), mode="bicubic", align_corners=False)
