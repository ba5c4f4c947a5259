"""Self-attention of the VARSR blocks (docs/MODEL.md §2.7): L2-normalised q/k with a learned per-head temperature, 2-D
RoPE, softmax scale 1, q/v bias but no k bias, the block-causal level mask, and a per-call KV cache for scale-by-scale
inference.

The cache is an object created by each ``generate`` call and handed down through the blocks (``KVCache``), never
module state, so several threads may sample from one model at the same time.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .rope import apply_rope

MAX_LOG_TEMPERATURE = math.log(100.0)


def level_mask(level_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (S, S) visibility: query at level a may attend key at level b iff b ≤ a (True = attend)."""
    return level_ids[None, :] <= level_ids[:, None]


def level_segments(level_ids: torch.Tensor) -> list[tuple[int, int, int, torch.Tensor | None]]:
    """The block-causal mask as query segments (q_start, q_end, k_end, mask or None), equivalent to ``level_mask``.

    Level 0 sees exactly level 0 and the last level sees everything, so those two need no mask and no masked-out
    keys; only the middle levels use a (sliced) mask. This skips about a third of the score matrix at the released
    geometry and lets the unmasked kernels run.
    """
    S = level_ids.numel()
    first_l = int((level_ids == 0).sum())
    last_start = int((level_ids < level_ids.max()).sum()) if level_ids.max() > 0 else S
    full = level_mask(level_ids)
    segs = [(0, first_l, first_l, None)]
    if last_start > first_l:
        segs.append((first_l, last_start, last_start, full[first_l:last_start, :last_start].contiguous()))
    if S > last_start:
        segs.append((last_start, S, S, None))
    return segs


class KVCache:
    """Rotated keys and values of one sampling call, one slot per block.

    ``append(layer, k, v)`` writes the new level's keys/values after the ones already held and returns views of all of
    them. Storage for the whole sequence (``total_len`` positions) is allocated on the first append of a layer, so the
    growing cache is never re-copied level after level.
    """

    def __init__(self, num_layers: int, total_len: int):
        self.total_len = int(total_len)
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.length = [0] * num_layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, H, n, c) → all keys/values of this layer so far, (B, H, length, c)."""
        start, n = self.length[layer], k.shape[2]
        if start + n > self.total_len:
            raise ValueError(f"KV cache overflow: {start} + {n} positions > {self.total_len}")
        if self.k[layer] is None:
            B, H, _, c = k.shape
            self.k[layer] = k.new_empty(B, H, self.total_len, c)
            self.v[layer] = v.new_empty(B, H, self.total_len, c)
        kc, vc = self.k[layer], self.v[layer]
        kc[:, :, start : start + n].copy_(k)
        vc[:, :, start : start + n].copy_(v)
        self.length[layer] = start + n
        return kc[:, :, : start + n], vc[:, :, : start + n]

    def slot(self, layer: int) -> "KVSlot":
        return KVSlot(self, layer)


class KVSlot:
    """One block's view of a ``KVCache`` (what a block's attention appends to)."""

    __slots__ = ("cache", "layer")

    def __init__(self, cache: KVCache, layer: int):
        self.cache, self.layer = cache, layer

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.append(self.layer, k, v)


class SelfAttention(nn.Module):
    """Multi-head attention; parameter names follow the official checkpoint (mat_qkv, q_bias, v_bias, scale_mul_1H11,
    proj)."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)  # rows: q, k, v; head-major inside each
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())  # log temperature
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask, kv: KVSlot | None = None
    ) -> torch.Tensor:
        """x (B, N, C); rope = (cos, sin) rows for these N positions.

        mask: bool (N, N_keys), or query segments from ``level_segments`` (training), or None (KV-cached inference).
        kv: this block's slot of the calling ``generate``'s cache; the new keys/values are appended and the queries
        attend to everything cached so far (earlier levels and this one).
        """
        B, N, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, c)
        temperature = self.scale_mul_1H11.clamp(max=MAX_LOG_TEMPERATURE).exp()
        q = F.normalize(q.float(), dim=-1) * temperature.float()
        k = F.normalize(k.float(), dim=-1)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        if kv is not None:
            k, v = kv.append(k, v)
        drop = self.attn_drop if self.training else 0.0
        if isinstance(mask, list):
            out = torch.cat(
                [
                    F.scaled_dot_product_attention(
                        q[:, :, qs:qe], k[:, :, :ke], v[:, :, :ke], attn_mask=m, dropout_p=drop, scale=1.0
                    )
                    for qs, qe, ke, m in mask
                ],
                dim=2,
            )
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=1.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))
