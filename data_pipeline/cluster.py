"""Semantic classes for stage-1 class-to-image pretraining: k-means on embeddings, then a per-class cap."""

from __future__ import annotations

import numpy as np


def kmeans_classes(emb: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster ids in [0, k') with k' = min(k, n); ids renumbered by first appearance so they are stable."""
    n = len(emb)
    if n == 0:
        return np.zeros(0, np.int64)
    k = max(1, min(int(k), n))
    if k == 1:
        return np.zeros(n, np.int64)
    if n > 20000:
        from sklearn.cluster import MiniBatchKMeans

        km = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=4096, n_init=3)
    else:
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=k, random_state=seed, n_init=3)
    raw = km.fit_predict(emb.astype(np.float64))
    remap: dict[int, int] = {}
    for c in raw:
        remap.setdefault(int(c), len(remap))
    return np.array([remap[int(c)] for c in raw], np.int64)


def cap_per_class(class_ids: np.ndarray, priority: np.ndarray, cap: int) -> np.ndarray:
    """Mask of items over the cap: within each class keep the `cap` highest-priority items (ties: earlier first)."""
    over = np.zeros(len(class_ids), bool)
    order = np.lexsort((np.arange(len(class_ids)), -priority))
    counts: dict[int, int] = {}
    for i in order:
        c = int(class_ids[i])
        counts[c] = counts.get(c, 0) + 1
        over[i] = counts[c] > cap
    return over
