"""Selection (`varsr data select`): re-runnable on the scores table without re-decoding anything.

Order of rules (each rejection recorded with its reason): decode outcome -> thresholds (min short side, max aspect,
score cut-offs) -> exact duplicates -> near duplicates -> low-quality negatives (label 1) by the paper's rule
`score < min(score) + f * max(score)` or a percentile rule -> k-means semantic classes -> per-class cap.
Rows are processed in URI order, so the result does not depend on how scoring was parallelised.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd

from .cluster import cap_per_class, kmeans_classes
from .config import BuildConfig
from .dedup import exact_duplicates, near_duplicates
from .scorers import BUILTIN_SCORES

log = logging.getLogger(__name__)


def score_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c in BUILTIN_SCORES or c.startswith("iqa_")]


def negative_mask(scores: np.ndarray, rule: str, f: float, percentile: float, max_fraction: float) -> np.ndarray:
    """Low-quality negatives: minmax `s < min + f * max` (docs/MODEL.md §5.6) or `s <= P-th percentile`; capped to the
    `max_fraction` lowest scores."""
    n = len(scores)
    if rule == "none" or n == 0:
        return np.zeros(n, bool)
    if rule == "minmax":
        m = scores < np.nanmin(scores) + f * np.nanmax(scores)
    elif rule == "percentile":
        m = scores <= np.nanpercentile(scores, percentile)
    else:
        raise ValueError(f"unknown negatives rule {rule!r}")
    cap = int(np.floor(max_fraction * n))
    if m.sum() > cap:
        order = np.lexsort((np.arange(n), scores))  # lowest first, ties by position
        keep = set(order[:cap].tolist())
        m = np.array([bool(m[i]) and i in keep for i in range(n)])
    return m


def select(scores: pd.DataFrame, cfg: BuildConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Returns (selection, rejected). `rejected` holds every input that is not selected, with stage and reason."""
    sc = cfg.select
    df = scores.sort_values("uri", kind="stable").reset_index(drop=True)
    rejected = [df.loc[df.status != "ok", ["uri", "status", "reason", "error"]].assign(stage="decode")]
    pool = df[df.status == "ok"].copy()
    reason = pd.Series("", index=pool.index, dtype=object)

    def reject(mask, why):
        m = mask & (reason == "")
        reason[m] = why

    min_short = sc.min_short_side or cfg.shard.crop_size
    short = np.minimum(pool.width, pool.height)
    reject(short < min_short, "too_small")
    reject(np.maximum(pool.width, pool.height) / np.maximum(short, 1) > sc.max_aspect, "aspect")
    for col, lim in sc.score_min.items():
        if col not in pool.columns:
            log.warning("select: score_min on %r ignored: no such score column (plug-in skipped?)", col)
            continue
        reject(pool[col] < lim, f"score_below:{col}")
    for col, lim in sc.score_max.items():
        if col not in pool.columns:
            log.warning("select: score_max on %r ignored: no such score column (plug-in skipped?)", col)
            continue
        reject(pool[col] > lim, f"score_above:{col}")
    if sc.dedup.exact:
        live = reason == ""
        dup = pd.Series(False, index=pool.index)
        dup[live] = exact_duplicates(pool.sha256[live].tolist())
        reject(dup, "duplicate_exact")
    if sc.dedup.near:
        live = reason == ""
        dup = pd.Series(False, index=pool.index)
        dup[live] = near_duplicates([int(x) for x in pool.phash[live]], sc.dedup.phash_max_distance)
        reject(dup, "duplicate_near")

    sel = pool[reason == ""].copy()
    neg = sc.negatives
    if neg.rule != "none" and neg.score not in sel.columns:
        raise ValueError(f"negatives.score {neg.score!r} is not a score column; have {score_columns(sel)}")
    sel["label"] = negative_mask(
        sel[neg.score].to_numpy(np.float64) if neg.rule != "none" else np.zeros(len(sel)),
        neg.rule,
        neg.f,
        neg.percentile,
        neg.max_fraction,
    ).astype(np.int64)
    if sc.cluster.enabled and len(sel):
        emb = np.stack([np.frombuffer(b, np.float32) for b in sel.embedding])
        sel["class_id"] = kmeans_classes(emb, sc.cluster.k, sc.cluster.seed)
        prio = sel["quality"].to_numpy(np.float64) if "quality" in sel.columns else np.zeros(len(sel))
        over = cap_per_class(sel.class_id.to_numpy(), prio, sc.cluster.max_per_class)
        reason[sel.index[over]] = "class_cap"
        sel = sel[~over]
    else:
        sel["class_id"] = 0
    sel = sel.copy()
    cols = score_columns(sel)
    sel["scores_json"] = [
        json.dumps({k: (None if v != v else round(float(v), 6)) for k, v in r.items()}, sort_keys=True)
        for r in sel[cols].to_dict(orient="records")
    ]
    rej_sel = pool.loc[reason != "", ["uri"]].assign(
        status="rejected", reason=reason[reason != ""], error="", stage="select"
    )
    rejected.append(rej_sel)
    rej = pd.concat(rejected, ignore_index=True)[["uri", "stage", "status", "reason", "error"]]
    keep_cols = ["uri", "sha256", "width", "height", "label", "class_id", "scores_json", "meta"] + cols
    return (
        sel[keep_cols].sort_values("uri", kind="stable").reset_index(drop=True),
        rej.sort_values("uri", kind="stable").reset_index(drop=True),
    )
