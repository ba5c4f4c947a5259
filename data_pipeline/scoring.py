"""Scoring (`varsr data score`): decode every input safely and compute its scores, batched in Ray Data.

Each input becomes one row of the scores table: status ok/rejected/failed (+ reason, error), size, sha256, phash,
built-in scores, learned-IQA scores for the plug-ins whose weights are present, and the embedding for clustering.
Inputs already rejected while listing (``data_pipeline/sources.py``: FIFOs, broken symlinks, names that are not
UTF-8, ...) get their row without being opened, so every input is counted once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math

import numpy as np

from infra.core.config import to_dict

from .config import BuildConfig
from .decode import decode_image
from .scorers import BUILTIN_SCORES, IQAPlugin, builtin_scores, load_embedder, thumbnail
from .sources import NotRegularFile, read_bytes

log = logging.getLogger(__name__)

INT_COLS = ("bytes", "width", "height", "frames", "exif_orientation", "phash")
STR_COLS = ("uri", "status", "reason", "error", "sha256", "format", "mode", "meta")


def empty_row(uri: str, meta: str) -> dict:
    row = {c: "" for c in STR_COLS}
    row.update({c: -1 for c in INT_COLS})
    row.update({c: math.nan for c in BUILTIN_SCORES})
    row.update(uri=uri, meta=meta, aspect=math.nan, embedding=b"")
    return row


class ScoreWorker:
    """Ray Data actor: holds the IQA plug-ins and the embedder; scores a batch of URIs."""

    def __init__(self, cfg_json: str, device: str = "cpu"):
        import cv2

        cv2.setNumThreads(1)
        self.cfg = BuildConfig.from_json(cfg_json)
        sc = self.cfg.score
        self.plugins = [p for p in (IQAPlugin(pc, sc.weights_dir, device) for pc in sc.iqa) if p.available]
        self.iqa_names = [f"iqa_{p.name}" for p in self.plugins]
        self.embed = load_embedder(sc.embedder)

    def score_one(
        self, uri: str, meta: str, listed: tuple[str, str, str] = ("", "", "")
    ) -> tuple[dict, np.ndarray | None]:
        """One input's row (and its thumbnail when it decoded). ``listed``: (status, reason, error) decided while
        listing; a non-empty status is recorded as is and the input is never opened."""
        row = empty_row(uri, meta)
        for n in self.iqa_names:
            row[n] = math.nan
        if listed[0]:
            row.update(status=listed[0], reason=listed[1], error=listed[2])
            return row, None
        try:
            data = read_bytes(uri, self.cfg.decode.max_bytes)
        except NotRegularFile as e:  # a FIFO, device, directory or broken symlink: rejected, never opened
            row.update(status="rejected", reason=e.reason, error=e.detail)
            return row, None
        except Exception as e:  # noqa: BLE001 - unreadable source
            row.update(status="failed", reason="read_error", error=f"{type(e).__name__}: {e}")
            return row, None
        row["bytes"] = len(data)
        row["sha256"] = hashlib.sha256(data).hexdigest()
        dec = decode_image(data, self.cfg.decode, draft_to=self.cfg.score.thumb_size)
        for k in ("format", "mode"):
            row[k] = str(dec.info.get(k) or "")
        for k in ("width", "height", "frames", "exif_orientation"):
            row[k] = int(dec.info.get(k, -1) if dec.info.get(k) is not None else -1)
        if dec.status != "ok":
            row.update(status=dec.status, reason=dec.reason, error=dec.error)
            return row, None
        try:
            thumb = thumbnail(dec.image, self.cfg.score.thumb_size)
            row.update(builtin_scores(thumb))
        except Exception as e:  # noqa: BLE001 - one bad image must not stop the job
            row.update(status="failed", reason="score_error", error=f"{type(e).__name__}: {e}")
            return row, None
        row["status"] = "ok"
        row["aspect"] = row["width"] / row["height"]
        return row, thumb

    def __call__(self, batch: dict) -> dict:
        rows, thumbs = [], []
        n = len(batch["uri"])
        listed = zip(*(batch.get(k, [""] * n) for k in ("status", "reason", "error")))
        for uri, meta, pre in zip(batch["uri"], batch["meta"], listed):
            r, t = self.score_one(str(uri), str(meta), tuple(str(x) for x in pre))
            rows.append(r)
            thumbs.append(t)
        ok = [i for i, t in enumerate(thumbs) if t is not None]
        if ok:
            imgs = [thumbs[i] for i in ok]
            emb = np.asarray(self.embed(imgs), np.float32)
            for j, i in enumerate(ok):
                rows[i]["embedding"] = emb[j].tobytes()
            for p, name in zip(self.plugins, self.iqa_names):
                vals = p(imgs)
                for j, i in enumerate(ok):
                    rows[i][name] = float(vals[j])
        out = {}
        for k in rows[0]:
            vals = [r[k] for r in rows]
            if k in STR_COLS or k == "embedding":
                out[k] = np.array(vals, dtype=object)
            elif k in INT_COLS:
                out[k] = np.array(vals, dtype=np.int64)
            else:
                out[k] = np.array(vals, dtype=np.float64)
        return out


def scores_fingerprint(uris: list[str], cfg: BuildConfig) -> str:
    """What the scores table depends on: the input list and the decode/score settings. Any name is taken: one that
    is not valid UTF-8 (surrogate escapes) is hashed with its surrogates passed through, never aborting the build."""
    h = hashlib.sha256()
    h.update("\n".join(uris).encode("utf-8", "surrogatepass"))
    h.update(
        json.dumps(
            {
                "decode": to_dict(cfg.decode),
                "score": {k: v for k, v in to_dict(cfg.score).items() if k != "num_workers"},
            },
            sort_keys=True,
        ).encode()
    )
    return h.hexdigest()[:16]
