"""LR prefix encoder ``con_embedding`` (docs/MODEL.md §2.2): a ControlNet-style conv stack turning the LR image
(resized to the model resolution, in [−1, 1]) into one prefix token per stride-16 cell, in raster order.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.conv_init import fan_in_normal_


class LREncoder(nn.Module):
    """conv_in 3→ch0; per stage (ch_i→ch_i stride 1, ch_i→ch_{i+1} stride 2, the last stage ending at ``hidden``);
    conv_out hidden→C. SiLU after all but conv_out. The released model has hidden = 1536 at every width C."""

    def __init__(self, channels: tuple[int, ...], out_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = out_dim if hidden is None else int(hidden)
        self.conv_in = nn.Conv2d(3, channels[0], 3, padding=1)
        outs = list(channels[1:]) + [hidden]
        blocks = []
        for cin, cout in zip(channels, outs):
            blocks.append(nn.Conv2d(cin, cin, 3, padding=1))
            blocks.append(nn.Conv2d(cin, cout, 3, padding=1, stride=2))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(hidden, out_dim, 3, padding=1)

    def init_fan_in(self, gain: float = 1.7) -> None:
        """Variance-preserving init: hidden convs N(0, gain²/fan_in) (gain ≈ the second-moment gain that keeps SiLU
        activations from shrinking), conv_out N(0, 1/fan_in), zero biases. The prefix then carries the LR at about
        unit scale whatever the widths; the upstream N(0, 0.02²) shrinks it by ~(0.02·√fan_in / 2) per layer."""
        for conv in (self.conv_in, *self.blocks):
            fan_in_normal_(conv, gain)
        fan_in_normal_(self.conv_out)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        """lr (B, 3, S, S) in [−1, 1] → prefix tokens (B, (S/stride)², C), token of cell (i, j) at index side·i + j."""
        h = F.silu(self.conv_in(lr.contiguous(memory_format=torch.channels_last)))  # NHWC: faster oneDNN/cuDNN convs
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h).flatten(2).transpose(1, 2)
