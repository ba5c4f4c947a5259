"""Training data from shards (DESIGN.md contract): deterministic, resumable per-rank batch streams.

Each epoch is a fixed function of ``(seed, epoch)``: shard order is shuffled, shards are split across ranks
(``split="node"``) or every rank reads the whole stream and keeps its slice of each global batch
(``split="global_batch"``: world-size-invariant data, used to check multi-rank == single-process), then across
DataLoader workers, and samples go through a seeded shuffle buffer. The data position is ``(epoch, batches consumed
in the epoch)``; resuming rebuilds the same stream and skips the consumed batches, so a resumed run sees exactly the
batches an uninterrupted run would. A sample that fails to decode is skipped and counted, never fatal.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from infra.core.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class ShardSet:
    """Resolved shard URLs plus what the manifest says about them (lineage)."""

    urls: list[str]
    location: str
    manifest_path: str | None
    manifest_sha256: str | None
    num_samples: int | None
    crop_size: int | None


def _manifest_info(manifest: Path) -> tuple[str, int | None, int | None]:
    raw = manifest.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    try:
        m = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"shard manifest {manifest} is not valid JSON: {e}") from None
    n = None
    shards = m.get("shards") if isinstance(m, dict) else None
    if isinstance(shards, list):
        counts = [s.get("samples", s.get("num_samples", s.get("count"))) for s in shards if isinstance(s, dict)]
        if counts and all(isinstance(c, int) for c in counts):
            n = sum(counts)
    if n is None and isinstance(m, dict):
        for k in ("num_samples", "samples", "total_samples"):
            if isinstance(m.get(k), int):
                n = m[k]
    crop = m.get("hr_size") if isinstance(m, dict) and isinstance(m.get("hr_size"), int) else None
    if crop is None and isinstance(m, dict):
        conf = m.get("config", {}) or {}
        for path in (("crop", "size"), ("crop_size",), ("materialise", "crop_size"), ("shard", "crop_size")):
            cur = conf
            for k in path:
                cur = cur.get(k) if isinstance(cur, dict) else None
            if isinstance(cur, int):
                crop = cur
                break
    return sha, n, crop


def resolve_shards(spec: str) -> ShardSet:
    """A shard dir (manifest.json checked), a glob, a brace URL or a comma list -> ShardSet; UserError if unusable."""
    from data_pipeline.reader import resolve_shards as _resolve

    if not spec:
        raise UserError("no training shards given (set data.shards to a shard directory or tar URLs)")
    target = [u.strip() for u in spec.split(",") if u.strip()] if "," in spec and "{" not in spec else spec
    if isinstance(target, str) and "://" not in target and not any(c in target for c in "*?[{") \
            and not os.path.exists(target):
        raise UserError(f"shard path {spec!r} does not exist")
    try:
        urls = _resolve(target)
    except (FileNotFoundError, KeyError, ValueError, json.JSONDecodeError) as e:
        raise UserError(f"shard path {spec!r} is not usable: {e}") from None
    local = [u for u in urls if "://" not in u]
    missing = [u for u in local if not os.path.isfile(u)]
    if not urls or missing:
        what = f"{len(missing)} missing, e.g. {missing[0]}" if missing else "no .tar shards found"
        raise UserError(f"shard path {spec!r} is not usable: {what}")
    manifest = Path(spec) / "manifest.json" if os.path.isdir(spec) else None
    if (manifest is None or not manifest.is_file()) and local:
        manifest = Path(local[0]).parent / "manifest.json"
    manifest = manifest if manifest is not None and manifest.is_file() else None
    sha = n = crop = None
    if manifest is not None:
        sha, n, crop = _manifest_info(manifest)
    return ShardSet(urls, spec, str(manifest) if manifest else None, sha, n, crop)


# ---- decoding -------------------------------------------------------------------------------------------------------


def decode_sample(sample: dict, size: int, want_lr: bool) -> dict:
    """Raw tar members -> {hr, lr (re-upsampled to HR size with the reader's PIL bicubic), label, class_id, key}.

    Raises on bad data (undecodable PNG, wrong size, missing member) so the caller can skip and count it.
    """
    from data_pipeline.reader import upsample_lr
    from data_pipeline.shards import decode_png

    hr = decode_png(sample["hr.png"])
    if hr.shape[0] != size or hr.shape[1] != size:
        raise ValueError(f"HR is {hr.shape[1]}x{hr.shape[0]}, expected {size}x{size}")
    meta = json.loads(sample["json"]) if "json" in sample else {}
    cid = meta.get("class_id")
    out = {
        "hr": torch.from_numpy(np.ascontiguousarray(hr)).permute(2, 0, 1).float().div_(255.0),
        "label": int(meta.get("label", 0)),
        "class_id": int(cid) if cid is not None else 0,
        "key": sample.get("__key__", ""),
    }
    if want_lr:
        out["lr"] = upsample_lr(decode_png(sample["lr.png"]), (size, size), "pil_bicubic")
    return out


def _iter_tar(url: str) -> Iterator[dict]:
    """Samples of one tar, members grouped by key (webdataset convention)."""
    import webdataset as wds

    yield from wds.tarfile_to_samples()(iter([{"url": url}]))


def peek_hr_size(url: str) -> int | None:
    """HR side of the first readable sample of a shard (to check the shards fit the model before training)."""
    from data_pipeline.shards import decode_png

    for s in _iter_tar(url):
        try:
            return int(decode_png(s["hr.png"]).shape[0])
        except Exception:  # noqa: BLE001 - try the next sample
            continue
    return None


# ---- the per-rank stream --------------------------------------------------------------------------------------------


class ShardStream(torch.utils.data.IterableDataset):
    """One epoch of decoded samples for one rank, sharded over DataLoader workers; deterministic given the seed.

    Yields dicts with an extra ``bad`` field: the number of undecodable samples skipped just before this one.
    """

    def __init__(self, urls, *, size, want_lr, seed, epoch, rank, world, split, shuffle_buffer, batch_size):
        self.urls, self.size, self.want_lr = list(urls), size, want_lr
        self.seed, self.epoch, self.rank, self.world = seed, epoch, rank, world
        self.split, self.buffer, self.batch_size = split, shuffle_buffer, batch_size

    def _my_urls(self, worker: int, nworkers: int) -> list[str]:
        urls = list(self.urls)
        random.Random(f"{self.seed}/{self.epoch}/shards").shuffle(urls)
        if self.split == "node" and self.world > 1:
            if len(urls) < self.world:
                raise UserError(f"{len(urls)} shard(s) cannot feed {self.world} ranks with split=node; "
                                f"use more shards or data.split=global_batch")
            urls = urls[self.rank::self.world]
        return urls[worker::nworkers]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, nworkers = (info.id, info.num_workers) if info else (0, 1)
        rank_tag = self.rank if self.split == "node" else 0
        rng = random.Random(f"{self.seed}/{self.epoch}/{rank_tag}/{worker}/buffer")
        buf: list[dict] = []
        bad = 0

        def raw_samples():
            for url in self._my_urls(worker, nworkers):
                try:
                    yield from _iter_tar(url)
                except Exception as e:  # noqa: BLE001 - a corrupt tar tail: count it, continue with the next shard
                    log.warning("shard %s: stopped reading (%s: %s)", url, type(e).__name__, e)
                    yield None

        for raw in raw_samples():
            if raw is None:
                bad += 1
                continue
            try:
                s = decode_sample(raw, self.size, self.want_lr)
            except Exception as e:  # noqa: BLE001 - bad sample: skip and count
                log.debug("skipping bad sample %s: %s", raw.get("__key__"), e)
                bad += 1
                continue
            if self.buffer <= 1:
                s["bad"], bad = bad, 0
                yield s
                continue
            buf.append(s)
            if len(buf) >= self.buffer:
                out = buf.pop(rng.randrange(len(buf)))
                out["bad"], bad = bad, 0
                yield out
        rng.shuffle(buf)
        for s in buf:
            s["bad"], bad = bad, 0
            yield s


def collate(samples: list[dict]) -> dict:
    out = {
        "hr": torch.stack([s["hr"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "class_id": torch.tensor([s["class_id"] for s in samples], dtype=torch.long),
        "key": [s["key"] for s in samples],
        "bad": sum(s["bad"] for s in samples),
    }
    if "lr" in samples[0]:
        out["lr"] = torch.stack([s["lr"] for s in samples])
    return out


@dataclass
class DataPosition:
    epoch: int = 0
    batches_in_epoch: int = 0
    samples_consumed: int = 0  # per rank, over the whole run
    bad_samples: int = 0


class BatchStream:
    """Endless per-rank batches over epochs, with a resumable :class:`DataPosition`."""

    def __init__(self, shards: ShardSet, *, size: int, want_lr: bool, batch_size: int, workers: int, seed: int,
                 rank: int, world: int, split: str = "node", shuffle_buffer: int = 64,
                 position: DataPosition | None = None):
        self.shards, self.size, self.want_lr = shards, size, want_lr
        self.batch_size, self.workers, self.seed = batch_size, workers, seed
        self.rank, self.world, self.split, self.buffer = rank, world, split, shuffle_buffer
        self.pos = position or DataPosition()

    def _epoch_batches(self, epoch: int) -> Iterator[dict]:
        global_bs = self.batch_size * (self.world if self.split == "global_batch" else 1)
        ds = ShardStream(self.shards.urls, size=self.size, want_lr=self.want_lr, seed=self.seed, epoch=epoch,
                         rank=self.rank, world=self.world, split=self.split, shuffle_buffer=self.buffer,
                         batch_size=global_bs)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=global_bs, num_workers=self.workers, collate_fn=collate, drop_last=True,
            persistent_workers=False, prefetch_factor=4 if self.workers else None,
            # its own generator: creating the iterator must not draw from the global torch RNG (exact resume)
            generator=torch.Generator().manual_seed(self.seed * 1000 + epoch),
        )
        for b in loader:
            if self.split == "global_batch" and self.world > 1:
                sl = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
                b = {k: (v[sl] if isinstance(v, (torch.Tensor, list)) else v) for k, v in b.items()}
            yield b

    def __iter__(self) -> Iterator[dict]:
        while True:
            skip = self.pos.batches_in_epoch
            got_any = False
            for i, b in enumerate(self._epoch_batches(self.pos.epoch)):
                got_any = True
                if i < skip:
                    continue
                self.pos.batches_in_epoch += 1
                self.pos.samples_consumed += len(b["key"])
                self.pos.bad_samples += int(b["bad"])
                yield b
            if not got_any:
                raise UserError(
                    f"shards {self.shards.location!r} yielded no complete batch of {self.batch_size} "
                    f"at {self.size}px for rank {self.rank} (too few valid samples?)")
            self.pos.epoch += 1
            self.pos.batches_in_epoch = 0
