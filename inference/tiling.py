"""Latent-space tiling for targets larger than one model tile (docs/MODEL.md §4.5, with symmetric weights).

A target of h x w latent cells is covered by tiles of ``tile`` x ``tile`` cells (the model's pn_last) placed every
``tile - overlap`` cells, the last row/column snapped to the border. Each tile's f_hat is weighted by a smooth window
centred at (tile-1)/2 in both axes (upstream centres y at tile/2: not copied), summed, and divided by the summed
weights, so identical overlapping latents are reproduced exactly and no tile edge shows as a seam.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tile:
    """One tile: top-left corner (y, x) in latent cells; its side is the grid's ``tile``."""

    y: int
    x: int


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering ``n`` cells with windows of ``tile`` cells overlapping by ``overlap``."""
    if tile <= 0:
        raise ValueError(f"tile side must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, {tile - 1}] latent cells, got {overlap}")
    if n < tile:
        raise ValueError(f"extent {n} is smaller than one tile ({tile}); pad the input first")
    stride = tile - overlap
    starts = list(range(0, n - tile + 1, stride))
    if starts[-1] != n - tile:
        starts.append(n - tile)  # last row/column snapped to the border
    return starts


def tile_grid(h: int, w: int, tile: int, overlap: int) -> list[Tile]:
    """All tiles (row-major) covering an h x w latent."""
    return [Tile(y, x) for y in tile_starts(h, tile, overlap) for x in tile_starts(w, tile, overlap)]


def window_1d(tile: int, kind: str = "gaussian", sigma: float = 0.25) -> torch.Tensor:
    """Symmetric, strictly positive 1-D blending window of length ``tile`` (float64)."""
    i = torch.arange(tile, dtype=torch.float64)
    centre = (tile - 1) / 2.0
    if kind == "gaussian":
        if sigma <= 0:
            raise ValueError(f"gaussian sigma must be positive, got {sigma}")
        return torch.exp(-(((i - centre) / tile) ** 2) / (2.0 * sigma**2))
    if kind == "cosine":
        return torch.sin(math.pi * (i + 0.5) / tile)
    raise ValueError(f"unknown blending window {kind!r}; choose gaussian or cosine")


def window_2d(tile: int, kind: str = "gaussian", sigma: float = 0.25) -> torch.Tensor:
    """Outer product of two 1-D windows: (tile, tile), float64."""
    w = window_1d(tile, kind, sigma)
    return w[:, None] * w[None, :]


def blend_tiles(
    latents: torch.Tensor, tiles: list[Tile], out_hw: tuple[int, int], kind: str = "gaussian", sigma: float = 0.25
) -> torch.Tensor:
    """Weighted average of tile latents (N,C,t,t) placed at ``tiles`` into one (C,H,W) latent (input dtype)."""
    if latents.ndim != 4 or latents.shape[0] != len(tiles):
        raise ValueError(f"expected ({len(tiles)}, C, t, t) latents, got {tuple(latents.shape)}")
    n, c, t, t2 = latents.shape
    if t != t2:
        raise ValueError(f"tiles must be square, got {t}x{t2}")
    h, w = out_hw
    win = window_2d(t, kind, sigma).to(latents.device)
    acc = torch.zeros(c, h, w, dtype=torch.float64, device=latents.device)
    wsum = torch.zeros(1, h, w, dtype=torch.float64, device=latents.device)
    for lat, tl in zip(latents, tiles):
        if tl.y < 0 or tl.x < 0 or tl.y + t > h or tl.x + t > w:
            raise ValueError(f"tile at ({tl.y}, {tl.x}) of side {t} does not fit in {h}x{w}")
        acc[:, tl.y : tl.y + t, tl.x : tl.x + t] += lat.to(torch.float64) * win
        wsum[:, tl.y : tl.y + t, tl.x : tl.x + t] += win
    if bool((wsum == 0).any()):
        raise ValueError("tiles do not cover the whole latent")
    return (acc / wsum).to(latents.dtype)
