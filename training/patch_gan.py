"""Sharpness losses of the stage-0 decoder finetune (docs/EXPERIMENTS.md).

A decoder trained with pixel losses alone (L1 + MSE) returns the mean of every detail it cannot place exactly: a
blurred image, with less high-frequency energy than even a bicubic upsampling. Two losses push back:

- ``highpass_l1``: L1 between the high-pass (image minus its Gaussian blur) of the reconstruction and of the
  target, the same high-pass ``infra.core.metrics.hf_energy`` measures. It rewards edges placed where the target
  has them and costs nothing where the decoder is sure.
- ``PatchDiscriminator`` with a hinge loss: a small convolutional critic of 128-px crops (a 70-px-style patch
  receptive field, three stride-2 convs), as VQGAN-style tokenizers are trained. It rewards texture that looks like a
  photograph's where the tokens do not say what it is.

Both are training-only parts: nothing here is stored in a model checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def gaussian_kernel(sigma: float, device=None) -> torch.Tensor:
    """1-D normalised Gaussian of radius ceil(3 sigma)."""
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def highpass(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """x (B, C, H, W) minus its separable Gaussian blur (reflect padding)."""
    k = gaussian_kernel(sigma, x.device).to(x.dtype)
    r, c = k.numel() // 2, x.shape[1]
    pad = F.pad(x, (r, r, r, r), mode="reflect")
    blur = F.conv2d(pad, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    blur = F.conv2d(blur, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x - blur


def highpass_l1(rec: torch.Tensor, x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Mean |highpass(rec) − highpass(x)|."""
    return (highpass(rec, sigma) - highpass(x, sigma)).abs().mean()


class PatchDiscriminator(nn.Module):
    """Images in [−1, 1] (B, 3, H, W) → a map of real/fake scores (B, 1, H/8 − 2, W/8 − 2).

    conv 4×4 s2 (3→w) → conv 4×4 s2 (w→2w) + GroupNorm → conv 4×4 s2 (2w→4w) + GroupNorm → conv 3×3 (4w→1),
    LeakyReLU 0.2 between them."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = int(width)
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, 2, 1),
            nn.GroupNorm(8, 2 * w),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1),
            nn.GroupNorm(8, 4 * w),
            nn.LeakyReLU(0.2),
            nn.Conv2d(4 * w, 1, 3, 1, 0),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """The critic's hinge loss: mean relu(1 − D(real)) + mean relu(1 + D(fake)), halved."""
    return 0.5 * (F.relu(1.0 - real_scores).mean() + F.relu(1.0 + fake_scores).mean())


def generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """The decoder's adversarial loss: −mean D(fake)."""
    return -fake_scores.mean()
