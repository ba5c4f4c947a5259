"""Scale-aligned 2-D rotary position embedding (docs/MODEL.md §2.6).

Every token of every scale gets a (row, col) position on one shared grid of side ``grid`` (pn_last = 32 for the
released model): token (i, j) of an n×n map sits at ((i/n)·grid, (j/n)·grid), the top-left corner of its cell. So
the LR prefix token (i, j) and the final-scale token (i, j) share a position, and coarse scales align with fine ones.
Head-dim channel pairs (2m, 2m+1) are rotated: pairs 0…c/4−1 by the row coordinate, the next c/4 by the column.
"""

from __future__ import annotations

import torch


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """θ_m = theta^(−4m/c), m = 0…c/4−1, float32 (computed as upstream: arange(0, c, 4)/c)."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    q = head_dim // 4
    return 1.0 / (theta ** (torch.arange(0, head_dim, 4, dtype=torch.float32)[:q] / head_dim))


def grid_positions(sides: list[int] | tuple[int, ...], grid: int) -> torch.Tensor:
    """(N, 2) float32 (row, col) positions of all tokens of the maps of the given sides, raster order, concatenated."""
    out = []
    for n in sides:
        coord = (torch.arange(n, dtype=torch.float32) / n) * grid
        rows = coord[:, None].expand(n, n).reshape(-1)
        cols = coord[None, :].expand(n, n).reshape(-1)
        out.append(torch.stack([rows, cols], dim=1))
    return torch.cat(out, dim=0)


def rope_angles(sides, grid: int, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """(N, c/2) float32 rotation angles: [row·θ_0…θ_{c/4−1}, col·θ_0…θ_{c/4−1}] per token."""
    pos = grid_positions(sides, grid)
    freqs = rope_frequencies(head_dim, theta)
    return torch.cat([pos[:, :1] * freqs[None], pos[:, 1:] * freqs[None]], dim=1)


def rope_table(
    sides, grid: int, head_dim: int, theta: float = 10000.0, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (N, c/2) float32, for ``apply_rope``."""
    ang = rope_angles(sides, grid, head_dim, theta)
    return ang.cos().to(device), ang.sin().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2m, 2m+1) of x (..., N, c) by the table rows (N, c/2); in float32, cast back."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)
