"""Colour correction of the SR output against the bicubic-upsampled LR (docs/MODEL.md §4.4).

* AdaIN: per channel, the SR image is normalised by its own mean/std and re-scaled by the reference's
  (std = sqrt(unbiased variance + 1e-5), as upstream).
* Wavelet: keep the SR image's high frequencies, take the reference's low frequencies (à-trous decomposition with a
  dilated 3x3 binomial kernel) — corrects colour casts while leaving the reference's blur behind.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ADAIN_EPS = 1e-5


def channel_mean_std(x: torch.Tensor, eps: float = ADAIN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,C,H,W) -> per-channel mean and sqrt(unbiased var + eps), each (B,C,1,1)."""
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    mean = flat.mean(dim=2).reshape(b, c, 1, 1)
    std = (flat.var(dim=2, unbiased=True) + eps).sqrt().reshape(b, c, 1, 1)
    return mean, std


def adain_color_fix(target: torch.Tensor, source: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """Give ``target`` (B,C,H,W) the per-channel mean/std of ``source`` (B,C,H',W'); values in [0, 1]."""
    t_mean, t_std = channel_mean_std(target.float())
    s_mean, s_std = channel_mean_std(source.float())
    out = (target.float() - t_mean) / t_std * s_std + s_mean
    return out.clamp(0, 1) if clamp else out


def _binomial_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """Dilated 3x3 binomial blur per channel with replicate padding (one à-trous step)."""
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    k = (k1[:, None] * k1[None, :]) / 16.0
    c = x.shape[1]
    weight = k.expand(c, 1, 3, 3).contiguous()
    pad = dilation
    h, w = x.shape[-2:]
    mode = "replicate" if pad >= min(h, w) else "reflect"
    xp = F.pad(x, (pad, pad, pad, pad), mode=mode)
    return F.conv2d(xp, weight, groups=c, dilation=dilation)


def wavelet_decompose(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Split (B,C,H,W) into (high frequencies, low frequencies) with ``levels`` à-trous steps; high + low == x."""
    high = torch.zeros_like(x)
    low = x
    for i in range(levels):
        blurred = _binomial_blur(low, 2**i)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_fix(target: torch.Tensor, source: torch.Tensor, levels: int = 5, clamp: bool = True) -> torch.Tensor:
    """High frequencies of ``target`` + low frequencies of ``source`` (same spatial size required)."""
    if target.shape[-2:] != source.shape[-2:]:
        source = F.interpolate(source.float(), size=target.shape[-2:], mode="bicubic", align_corners=False)
    t_high, _ = wavelet_decompose(target.float(), levels)
    _, s_low = wavelet_decompose(source.float(), levels)
    out = t_high + s_low
    return out.clamp(0, 1) if clamp else out


def color_fix(target: torch.Tensor, source: torch.Tensor, method: str | None) -> torch.Tensor:
    """Dispatch by name: ``adain``, ``wavelet`` or ``none``/None (returns ``target`` unchanged)."""
    if method in (None, "none"):
        return target
    if method == "adain":
        return adain_color_fix(target, source)
    if method == "wavelet":
        return wavelet_color_fix(target, source)
    raise ValueError(f"unknown color_fix {method!r}; choose adain, wavelet or none")
