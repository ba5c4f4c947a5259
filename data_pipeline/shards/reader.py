"""The one shard reader: training (every stage), evaluation and the tests read shards through this module.

* :func:`resolve_shards` turns a dataset folder / URL (its ``manifest.json`` is the source of truth), a glob, a brace
  pattern or a comma list of tars into a :class:`ShardSet` with the manifest's lineage (sha256, sample count, sizes).
* :func:`iter_tar` streams one tar from a local path or any fsspec URL (``s3://`` included) through the platform's
  storage layer, grouping members by sample key as ``webdataset`` does; nothing is copied to local disk first.
* :class:`ShardStream` is one epoch of decoded samples for one rank and one DataLoader worker: a seeded shard shuffle
  per epoch, a split by rank (``split="node"``) or a whole stream per rank that keeps its slice of every global batch
  (``split="global_batch"``), then by worker, and a seeded sample shuffle buffer. Undecodable samples are skipped and
  counted, never fatal.
* :class:`BatchStream` is the endless, resumable sequence of batches for one rank: its :class:`DataPosition`
  ``(epoch, batches consumed in the epoch)`` is saved with training checkpoints, and resuming rebuilds the same
  epoch and skips the consumed batches, so a resumed run sees exactly the batches an uninterrupted run would.
* The token cache: with ``tokens=True`` a :class:`BatchStream` reads the manifest's token shards instead of the
  originals (same samples, same order, so the same batches) and adds each sample's cached ``tokens`` and ``resid``.

Decoded samples are dicts: ``hr`` (3, H, W) float in [0, 1]; ``lr`` (3, H, W) the stored LR resized back to the HR
size (``lr_mode``: ``pil_bicubic`` as at inference; ``area`` / ``bilinear`` / ``bicubic`` with torch's interpolation
semantics; or ``random``: one of those drawn per sample, as the reference training does — the modes a sample's
degradation recorded, see ``data_pipeline.degrade.resize``), with the mode used under ``lr_mode``; ``label`` (0/1),
``class_id``, ``key``; from a token cache also ``tokens`` (L,) long (every scale's indices, coarse to fine) and
``resid`` (pn_last², Cvae) float32 (the refiner's target).
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import random
import tarfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from infra.core import storage
from infra.core.errors import UserError

from ..degrade.resize import RESIZE_BACK_MODES, random_resize_back, resize_back
from .format import (Manifest, TokenCache, decode_png, decode_token_members, is_token_shard, read_manifest,
                     token_shard_name)

log = logging.getLogger(__name__)

LR_MODES = ("pil_bicubic", "bicubic", "bilinear", "area", "random")


# ---- which shards -------------------------------------------------------------------------------------------------
@dataclass
class ShardSet:
    """Resolved shard URLs plus what the manifest says about them (lineage)."""

    urls: list[str]
    location: str
    manifest: Manifest | None = None
    manifest_sha256: str | None = None

    @property
    def num_samples(self) -> int | None:
        return self.manifest.num_samples if self.manifest else None

    @property
    def hr_size(self) -> int | None:
        return self.manifest.hr_size if self.manifest else None

    @property
    def token_cache(self) -> TokenCache | None:
        """The manifest's token cache (``varsr data tokenize``), if the dataset has a complete one."""
        return self.manifest.tokens if self.manifest else None

    def token_urls(self, check: bool = True) -> list[str]:
        """The token shards that stand in for ``urls`` (same order); UserError when there is no token cache or it
        does not cover every shard (``check``: every one must also exist)."""
        tc = self.token_cache
        if tc is None:
            raise UserError(f"{self.location} has no token cache (run: varsr data tokenize --shards {self.location})")
        listed = {e.name for e in tc.shards}
        names = [token_shard_name(storage.basename(u), tc.tokenizer_sha256) for u in self.urls]
        absent = [n for n in names if n not in listed]
        if absent:
            raise UserError(f"the token cache of {self.location} does not list {absent[0]} "
                            f"({len(absent)} shard(s) uncovered): run varsr data tokenize again")
        urls = [storage.join(storage.parent(u), n) for u, n in zip(self.urls, names)]
        if check:
            missing = [u for u in urls if not storage.exists(u)]
            if missing:
                raise UserError(f"the token cache of {self.location} lists {len(missing)} missing shard(s), "
                                f"e.g. {missing[0]}")
        return urls


def _glob(pattern: str) -> list[str]:
    if storage.is_local(pattern):
        import glob

        return sorted(glob.glob(storage.local_path(pattern)))
    fs, path = storage.filesystem(pattern)
    with storage.storage_errors(pattern, "list"):
        return sorted(f"{storage.protocol(pattern)}://{p}" for p in fs.glob(path))


def resolve_shards(spec: str | list[str], check: bool = True) -> ShardSet:
    """A dataset folder or URL prefix with ``manifest.json`` (every listed shard must exist), a folder of ``.tar``
    files, a glob, a brace pattern (``shard-{000000..000009}.tar``) or a comma list / list of tar URLs."""
    if isinstance(spec, (list, tuple)):
        return ShardSet([str(u) for u in spec], ",".join(map(str, spec)))
    s = str(spec).strip()
    if not s:
        raise UserError("no shards given (a dataset folder / URL with manifest.json, or tar URLs)")
    if "," in s and "{" not in s:
        return ShardSet([u.strip() for u in s.split(",") if u.strip()], s)
    if "{" in s:
        import braceexpand

        return ShardSet(list(braceexpand.braceexpand(s)), s)
    if any(c in s for c in "*?["):
        urls = _glob(s)
        if not urls:
            raise UserError(f"no shards match {s}")
        return ShardSet(urls, s)
    if s.endswith(".tar"):
        return ShardSet([s], s)
    if storage.exists(storage.join(s, "manifest.json")):
        m, sha = read_manifest(s)
        urls = [storage.join(s, e.name) for e in m.shards if e.samples > 0]
        if check:
            missing = [u for u in urls if not storage.exists(u)]
            if missing:
                raise UserError(f"manifest of {s} lists {len(missing)} missing shard(s), e.g. {missing[0]}")
        return ShardSet(urls, s, m, sha)
    if storage.is_local(s) and not os.path.exists(storage.local_path(s)):
        raise UserError(f"shard path {s!r} does not exist")
    urls = [storage.join(s, n) for n in storage.listdir(s) if fnmatch.fnmatch(n, "*.tar") and not is_token_shard(n)]
    if not urls:
        raise UserError(f"{s} holds neither manifest.json nor .tar shards")
    return ShardSet(urls, s)


# ---- raw samples --------------------------------------------------------------------------------------------------
def iter_tar(url: str) -> Iterator[dict]:
    """Samples of one tar, streamed: ``{"__key__": key, "__url__": url, "<ext>": bytes, ...}`` per sample key
    (the key is the member name up to its first dot, as in webdataset; members in tar order)."""
    with storage.open_url(url) as f:
        yield from iter_tar_stream(f, url)


def iter_tar_stream(f, url: str) -> Iterator[dict]:
    """:func:`iter_tar` over an already open, sequentially read file object (``url`` only labels the samples)."""
    with tarfile.open(fileobj=f, mode="r|") as tar:
        cur: dict | None = None
        for m in tar:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            if "." not in base:
                continue
            key = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
            ext = base.split(".", 1)[1]
            if cur is not None and cur["__key__"] != key:
                yield cur
                cur = None
            if cur is None:
                cur = {"__key__": key, "__url__": url}
            cur[ext] = tar.extractfile(m).read()
        if cur is not None:
            yield cur


# ---- decoding -----------------------------------------------------------------------------------------------------
def _to_tensor(a: np.ndarray) -> torch.Tensor:
    a = a if a.flags.writeable and a.flags.c_contiguous else np.array(a, order="C")
    return torch.from_numpy(a).permute(2, 0, 1).float().div_(255.0)


def upsample_lr(lr: np.ndarray, size_hw: tuple[int, int], mode: str) -> torch.Tensor:
    """LR uint8 (h, w, 3) -> float (3, H, W) in [0, 1], quantised to 8 bits like a stored image: PIL bicubic (the
    inference pre-processing) or a torch-semantics interpolation (the training resize-back)."""
    if mode == "pil_bicubic":
        up = Image.fromarray(lr).resize((size_hw[1], size_hw[0]), Image.Resampling.BICUBIC)
        return _to_tensor(np.asarray(up))
    return resize_back(lr, size_hw, mode)


def decode_hr(raw: dict, size: int) -> torch.Tensor:
    """The HR crop of a raw sample as training sees it: (3, size, size) float in [0, 1]; ValueError when it is
    undecodable or another size (the token cache tokenises exactly this tensor)."""
    hr = decode_png(raw["hr.png"])
    if hr.shape[0] != size or hr.shape[1] != size:
        raise ValueError(f"HR is {hr.shape[1]}x{hr.shape[0]}, expected {size}x{size}")
    return _to_tensor(hr)


def decode_sample(raw: dict, size: int, want_lr: bool, lr_mode: str = "pil_bicubic",
                  rng: random.Random | None = None, tokens: TokenCache | None = None) -> dict:
    """Raw members -> {hr, lr (re-upsampled), lr_mode, label, class_id, key} (+ tokens, resid from the token cache
    ``tokens``); raises on bad data (undecodable PNG, wrong size, missing member, token members of another
    tokenizer) so the stream can skip and count it."""
    hr = decode_hr(raw, size)
    meta = json.loads(raw["json"])
    out = {"hr": hr, "label": int(meta["label"]), "class_id": int(meta["class_id"]),
           "key": raw["__key__"]}
    if tokens is not None:
        idx, resid = decode_token_members(raw, tokens.tokenizer_sha256, tokens.patch_nums)
        out["tokens"], out["resid"] = torch.from_numpy(idx), torch.from_numpy(resid)
    if want_lr:
        lr = decode_png(raw["lr.png"])
        if lr_mode == "random":
            modes = (meta.get("degradation", {}).get("params", {}).get("resize_back", {})
                     .get("modes", RESIZE_BACK_MODES))
            out["lr"], drawn = random_resize_back(lr, (size, size), rng or random.Random(0), modes)
            out["lr_mode"] = drawn["mode"]
        else:
            out["lr"] = upsample_lr(lr, (size, size), lr_mode)
            out["lr_mode"] = lr_mode
    return out


def peek_hr_size(url: str) -> int | None:
    """HR side of the first readable sample of a shard (to check the shards fit the model before training)."""
    for s in iter_tar(url):
        try:
            return int(decode_png(s["hr.png"]).shape[0])
        except (KeyError, ValueError):
            continue
    return None


# ---- one epoch for one rank ---------------------------------------------------------------------------------------
class ShardStream(torch.utils.data.IterableDataset):
    """One epoch of decoded samples for one rank, sharded over DataLoader workers; deterministic given the seed.

    Yields dicts with an extra ``bad`` field: the number of undecodable samples skipped just before this one.
    ``tokens``: the token cache ``urls`` belong to (their samples then carry ``tokens`` and ``resid``). The shard and
    sample shuffles depend only on the seed, the epoch and the number of shards, so the token shards of a dataset
    give the same sample order as its originals.
    """

    def __init__(self, urls, *, size: int, want_lr: bool, seed: int, epoch: int, rank: int, world: int,
                 split: str = "node", shuffle_buffer: int = 64, lr_mode: str = "pil_bicubic",
                 tokens: TokenCache | None = None):
        if lr_mode not in LR_MODES:
            raise UserError(f"lr_mode must be one of {', '.join(LR_MODES)}, got {lr_mode!r}")
        self.urls, self.size, self.want_lr, self.lr_mode = list(urls), size, want_lr, lr_mode
        self.tokens = tokens
        self.seed, self.epoch, self.rank, self.world = seed, epoch, rank, world
        self.split, self.buffer = split, shuffle_buffer

    def shards_for(self, worker: int, nworkers: int) -> list[str]:
        """This (rank, worker)'s shards of the epoch: seeded shuffle, then split by rank (split=node) and worker."""
        urls = list(self.urls)
        random.Random(f"{self.seed}/{self.epoch}/shards").shuffle(urls)
        if self.split == "node" and self.world > 1:
            if len(urls) < self.world:
                raise UserError(f"{len(urls)} shard(s) cannot feed {self.world} ranks with split=node: write more, "
                                f"smaller shards (shard.max_samples_per_shard) or use data.split=global_batch")
            urls = urls[self.rank::self.world]
        return urls[worker::nworkers]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, nworkers = (info.id, info.num_workers) if info else (0, 1)
        rank_tag = self.rank if self.split == "node" else 0
        rng = random.Random(f"{self.seed}/{self.epoch}/{rank_tag}/{worker}/buffer")
        lr_rng = random.Random(f"{self.seed}/{self.epoch}/{rank_tag}/{worker}/lr_mode")
        buf: list[dict] = []
        bad = 0

        def raw_samples():
            for url in self.shards_for(worker, nworkers):
                try:
                    yield from iter_tar(url)
                except UserError:
                    raise  # storage unreachable / refused: not a bad sample, a failed run
                except (tarfile.TarError, OSError, EOFError) as e:  # a corrupt tar tail: count it, go on
                    log.warning("shard %s: stopped reading (%s: %s)", url, type(e).__name__, e)
                    yield None

        for raw in raw_samples():
            if raw is None:
                bad += 1
                continue
            try:
                s = decode_sample(raw, self.size, self.want_lr, self.lr_mode, lr_rng, self.tokens)
            except Exception as e:  # noqa: BLE001 - a bad sample: skip and count
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
        "bad": sum(s.get("bad", 0) for s in samples),
    }
    if "lr" in samples[0]:
        out["lr"] = torch.stack([s["lr"] for s in samples])
        out["lr_mode"] = [s["lr_mode"] for s in samples]
    if "tokens" in samples[0]:
        out["tokens"] = torch.stack([s["tokens"] for s in samples])
        out["resid"] = torch.stack([s["resid"] for s in samples])
    return out


# ---- endless, resumable batches -----------------------------------------------------------------------------------
@dataclass
class DataPosition:
    epoch: int = 0
    batches_in_epoch: int = 0
    samples_consumed: int = 0  # per rank, over the whole run
    bad_samples: int = 0


class BatchStream:
    """Endless per-rank batches over epochs, with a resumable :class:`DataPosition`.

    ``tokens=True`` reads the dataset's token cache (:meth:`ShardSet.token_urls`): the same batches, each with the
    cached ``tokens`` (B, L) and ``resid`` (B, pn_last², Cvae) added.
    """

    def __init__(self, shards: ShardSet, *, size: int, want_lr: bool, batch_size: int, workers: int, seed: int,
                 rank: int, world: int, split: str = "node", shuffle_buffer: int = 64,
                 position: DataPosition | None = None, lr_mode: str = "pil_bicubic", tokens: bool = False):
        self.shards, self.size, self.want_lr = shards, size, want_lr
        self.batch_size, self.workers, self.seed = batch_size, workers, seed
        self.rank, self.world, self.split, self.buffer = rank, world, split, shuffle_buffer
        self.lr_mode = lr_mode
        self.tokens = shards.token_cache if tokens else None
        self.urls = shards.token_urls() if tokens else shards.urls
        self.pos = position or DataPosition()

    def epoch_stream(self, epoch: int) -> ShardStream:
        return ShardStream(self.urls, size=self.size, want_lr=self.want_lr, seed=self.seed, epoch=epoch,
                           rank=self.rank, world=self.world, split=self.split, shuffle_buffer=self.buffer,
                           lr_mode=self.lr_mode, tokens=self.tokens)

    def _epoch_batches(self, epoch: int) -> Iterator[dict]:
        global_bs = self.batch_size * (self.world if self.split == "global_batch" else 1)
        loader = torch.utils.data.DataLoader(
            self.epoch_stream(epoch), batch_size=global_bs, num_workers=self.workers, collate_fn=collate,
            drop_last=True, persistent_workers=False, prefetch_factor=4 if self.workers else None,
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


# ---- evaluation pairs ---------------------------------------------------------------------------------------------
def eval_pairs(spec: str | list[str]) -> list[tuple[str, bytes, bytes]]:
    """(key, HR PNG bytes, LR PNG bytes) for every sample that has both images, in shard order (decoding is the
    evaluator's business: it applies its own input limits)."""
    pairs = [(raw["__key__"].replace("/", "_"), raw["hr.png"], raw["lr.png"])
             for url in resolve_shards(spec).urls for raw in iter_tar(url) if "hr.png" in raw and "lr.png" in raw]
    if not pairs:
        raise UserError(f"no samples with both .hr.png and .lr.png in {spec}")
    return pairs
