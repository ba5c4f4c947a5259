"""Variance-preserving conv init shared by the parts a CPU-sized model trains from scratch (docs/EXPERIMENTS.md, §2.9):
the LR encoder (``lr_encoder_init: fan_in``) and the tokenizer (``vqvae.init: fan_in``)."""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def fan_in_normal_(conv: nn.Conv2d, gain: float = 1.0) -> None:
    """``conv``'s weight from N(0, gain²/fan_in) (fan_in = input channels per group × kernel area), its bias zero:
    the conv then keeps its input's variance (times gain²), where PyTorch's default passes about a third of it."""
    fan_in = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    nn.init.normal_(conv.weight, std=gain / fan_in**0.5)
    if conv.bias is not None:
        conv.bias.zero_()
