"""Materialisation of one sample and one shard: decode -> crop -> degrade -> PNG encode -> tar.

Seeds are derived from (build seed, source sha256, purpose), so a sample's crop and degradation do not depend on
which shard or worker handles it. Stage timings are returned separately (they are not part of the output).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter

import cv2
import numpy as np

from infra.core import storage
from infra.core.config import to_dict

from .config import PIPELINE_VERSION, BuildConfig
from .crop import crop_hr
from .decode import decode_image
from .degrade import degrade
from .shards import (
    SAMPLE_MEMBERS,
    SampleMeta,
    ShardFailure,
    ShardStats,
    TarWriter,
    encode_png,
    publish_shard,
    shard_name,
)
from .sources import read_bytes

STAGES = ("read", "decode", "crop", "degrade", "encode", "write")


def derive_seed(seed: int, sha256: str, purpose: str) -> int:
    h = hashlib.sha256(f"{seed}:{sha256}:{purpose}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def sample_key(sha256: str, variant: int) -> str:
    return sha256[:24] if variant == 0 else f"{sha256[:24]}_v{variant}"


def materialise_image(
    row: dict, cfg: BuildConfig, data: bytes | None = None, timings: dict | None = None
) -> list[tuple[str, dict[str, bytes]]] | tuple[str, str]:
    """All samples (one per LR variant) of one selected image, or (reason, error) when it fails now.
    `timings` accumulates wall seconds per stage under the stage name and CPU seconds under `cpu_<stage>`."""
    t = timings if timings is not None else {}

    def tick(stage, t0):
        now = (time.perf_counter(), time.process_time())
        t[stage] = t.get(stage, 0.0) + (now[0] - t0[0])
        t[f"cpu_{stage}"] = t.get(f"cpu_{stage}", 0.0) + (now[1] - t0[1])
        return now

    sc, dc = cfg.shard, cfg.degradation
    t0 = (time.perf_counter(), time.process_time())
    if data is None:
        data = read_bytes(row["uri"], cfg.decode.max_bytes)
    t0 = tick("read", t0)
    if hashlib.sha256(data).hexdigest() != row["sha256"]:
        return "source_changed", "content hash differs from the scored file"
    label = int(row["label"])
    short_factor = sc.resize_short_factor_neg if label == 1 else sc.resize_short_factor
    dec = decode_image(data, cfg.decode, draft_to=int(round(short_factor * sc.crop_size)))
    if dec.status != "ok":
        return dec.reason, dec.error
    t0 = tick("decode", t0)
    assert dec.image is not None  # an "ok" decode carries its image
    rng = np.random.default_rng(derive_seed(cfg.seed, row["sha256"], "crop"))
    hr, crop_info = crop_hr(dec.image, sc.crop_size, short_factor, sc.crop, sc.flip_prob, rng)
    t0 = tick("crop", t0)
    hr_png = encode_png(hr, sc.hr_png_compression, sc.png_strategy, sc.png_filter)
    t0 = tick("encode", t0)
    scores = json.loads(row.get("scores_json") or "{}")
    out = []
    if sc.lr_variants == 0:  # HR-only: the training reader degrades on the fly (data_pipeline/degrade/online.py)
        key = sample_key(row["sha256"], 0)
        meta = SampleMeta(
            key=key,
            source_uri=row["uri"],
            sha256=row["sha256"],
            original_size=[int(row["width"]), int(row["height"])],
            label=label,
            class_id=int(row["class_id"]),
            scores=scores,
            crop=crop_info,
            hr_size=[sc.crop_size, sc.crop_size],
            lr_size=[0, 0],
            scale=dc.scale,
            variant=0,
            degradation={"preset": dc.preset, "params": None, "hr_only": True},
            source_meta=json.loads(row.get("meta") or "{}"),
            pipeline_version=PIPELINE_VERSION,
            config_hash=cfg.config_hash(),
        )
        return [(key, {"hr.png": hr_png, "json": meta.to_bytes()})]
    for v in range(sc.lr_variants):
        lr, params = degrade(hr, dc, derive_seed(cfg.seed, row["sha256"], f"degrade:{v}"), variant=v)
        t0 = tick("degrade", t0)
        lr_png = encode_png(lr, sc.lr_png_compression, sc.png_strategy, sc.png_filter)
        key = sample_key(row["sha256"], v)
        meta = SampleMeta(
            key=key,
            source_uri=row["uri"],
            sha256=row["sha256"],
            original_size=[int(row["width"]), int(row["height"])],
            label=label,
            class_id=int(row["class_id"]),
            scores=scores,
            crop=crop_info,
            hr_size=[sc.crop_size, sc.crop_size],
            lr_size=list(lr.shape[:2][::-1]),
            scale=dc.scale,
            variant=v,
            degradation={"preset": dc.preset, "params": params},
            source_meta=json.loads(row.get("meta") or "{}"),
            pipeline_version=PIPELINE_VERSION,
            config_hash=cfg.config_hash(),
        )
        out.append((key, {"hr.png": hr_png, "json": meta.to_bytes(), "lr.png": lr_png}))
        t0 = tick("encode", t0)
    return out


def write_shard(index: int, rows: list[dict], cfg: BuildConfig, out_dir: str) -> dict:
    """Materialise ``rows`` into shard ``index`` and publish it at ``out_dir`` (a local folder or an object-store
    prefix, written straight from whichever node runs this); returns {stats (the ShardStats as a dict, handed back
    to the driver), timings (wall s per stage), cpu_seconds, span, pid}."""
    cv2.setNumThreads(1)
    cpu0, started = time.process_time(), time.time()
    timings: dict[str, float] = {}
    prefix = cfg.shard.prefix
    writer = TarWriter(storage.join(out_dir, shard_name(prefix, index)))
    labels: Counter[int]
    classes: Counter[int]
    failures, labels, classes, n = [], Counter(), Counter(), 0
    try:
        for row in rows:
            try:
                res = materialise_image(row, cfg, timings=timings)
            except Exception as e:  # noqa: BLE001 - recorded as failed(error); the shard goes on
                res = (
                    "read_error" if isinstance(e, (OSError, storage.StorageError)) else "materialise_error",
                    f"{type(e).__name__}: {e}",
                )
            if isinstance(res, tuple):
                failures.append(ShardFailure(uri=row["uri"], reason=res[0], error=res[1]))
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            for key, members in res:
                for ext in SAMPLE_MEMBERS:
                    if ext in members:  # HR-only samples have no lr.png
                        writer.add(f"{key}.{ext}", members[ext])
                n += 1
                labels[int(row["label"])] += 1
                classes[int(row["class_id"])] += 1
            timings["write"] = timings.get("write", 0.0) + time.perf_counter() - t0
            timings["cpu_write"] = timings.get("cpu_write", 0.0) + time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        stats = ShardStats(
            shard=shard_name(prefix, index),
            index=index,
            samples=n,
            images=len(rows) - len(failures),
            failed=failures,
            labels={str(k): v for k, v in sorted(labels.items())},
            classes={str(k): v for k, v in sorted(classes.items())},
            hr_size=cfg.shard.crop_size,
            lr_size=cfg.shard.crop_size // cfg.degradation.scale,
            config_hash=cfg.config_hash(),
        )
        publish_shard(writer, stats, out_dir, prefix)
        timings["write"] = timings.get("write", 0.0) + time.perf_counter() - t0
        timings["cpu_write"] = timings.get("cpu_write", 0.0) + time.process_time() - c0
    except BaseException:
        writer.abort()
        raise
    return {
        "stats": to_dict(stats),
        "timings": timings,
        "cpu_seconds": time.process_time() - cpu0,
        "span": [started, time.time()],
        "pid": os.getpid(),
    }
