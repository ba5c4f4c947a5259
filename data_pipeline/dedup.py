"""Exact (sha256) and near-duplicate (perceptual-hash Hamming distance) detection.

Near duplicates use the pigeonhole principle: split the 64-bit hash into t+1 bands; two hashes within Hamming
distance t agree on at least one band, so only items sharing a band value are compared (no O(n^2) scan).
"""

from __future__ import annotations

import numpy as np


def exact_duplicates(sha256: list[str]) -> np.ndarray:
    """Boolean mask: True for every item whose sha256 appeared earlier in the list."""
    seen: set[str] = set()
    out = np.zeros(len(sha256), bool)
    for i, h in enumerate(sha256):
        out[i] = h in seen
        seen.add(h)
    return out


def hamming(a: int, b: int) -> int:
    return ((a ^ b) & 0xFFFFFFFFFFFFFFFF).bit_count()


def near_duplicates(phashes: list[int], max_distance: int) -> np.ndarray:
    """True for items within `max_distance` of an earlier kept item (first occurrence wins)."""
    t = max(0, int(max_distance))
    nb = t + 1
    widths = [64 // nb + (1 if i < 64 % nb else 0) for i in range(nb)]
    shifts = np.cumsum([0] + widths[:-1]).tolist()
    buckets: list[dict[int, list[int]]] = [dict() for _ in range(nb)]
    kept: list[int] = []
    out = np.zeros(len(phashes), bool)
    for i, h in enumerate(phashes):
        h &= 0xFFFFFFFFFFFFFFFF
        bands = [(h >> s) & ((1 << w) - 1) for s, w in zip(shifts, widths)]
        cands = {j for b, v in enumerate(bands) for j in buckets[b].get(v, ())}
        if any(hamming(h, kept[j]) <= t for j in cands):
            out[i] = True
            continue
        idx = len(kept)
        kept.append(h)
        for b, v in enumerate(bands):
            buckets[b].setdefault(v, []).append(idx)
    return out
