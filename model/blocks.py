"""Transformer blocks (docs/MODEL.md §2.7–2.8): AdaLN self-attention block conditioned on the class embedding, and the
AdaLN layer before the output head. Chunk orders are the official ones (block: γ1, γ2, s1, s2, b1, b2; head: s, b).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .attention import SelfAttention


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability p (training only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


class FFN(nn.Module):
    """Linear C→hidden, GELU (tanh), Linear hidden→C."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class AdaLNSelfAttn(nn.Module):
    """x += γ1·Attn(LN(x)(1+s1)+b1); x += γ2·FFN(LN(x)(1+s2)+b2), with (γ, s, b) = Linear(SiLU(cond))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        drop_path: float,
        norm_eps: float,
        drop: float = 0.0,
        attn_drop: float = 0.0,
    ):
        super().__init__()
        self.dim = dim
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.attn = SelfAttention(dim, num_heads, attn_drop=attn_drop, proj_drop=drop)
        self.ffn = FFN(dim, round(dim * mlp_ratio), drop=drop)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(dim, 6 * dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x, cond_BD, rope, mask, kv=None):
        """kv: this block's slot of a per-call KV cache (``attention.KVSlot``) during sampling, else None."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.dim).unbind(2)
        x = x + self.drop_path(self.attn(self.ln_wo_grad(x) * (scale1 + 1) + shift1, rope, mask, kv) * gamma1)
        x = x + self.drop_path(self.ffn(self.ln_wo_grad(x) * (scale2 + 1) + shift2) * gamma2)
        return x


class AdaLNBeforeHead(nn.Module):
    """LN(h)·(1+scale)+shift with (scale, shift) = Linear(SiLU(cond)); feeds the token head."""

    def __init__(self, dim: int, norm_eps: float):
        super().__init__()
        self.dim = dim
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(dim, 2 * dim))

    def forward(self, x, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.dim).unbind(2)
        return self.ln_wo_grad(x) * (scale + 1) + shift
