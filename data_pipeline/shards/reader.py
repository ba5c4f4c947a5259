"""The one shard reader: training (every stage), evaluation and the tests read shards through this module.

* :func:`resolve_shards` turns a dataset folder / URL (its ``manifest.json`` is the source of truth), a glob, a brace
  pattern or a comma list of tars into a :class:`ShardSet` with the manifest's lineage (sha256, sample count, sizes).
* :func:`iter_tar` streams one tar from a local path or any fsspec URL (``s3://`` included) through the platform's
  storage layer, grouping members by sample key as ``webdataset`` does; nothing is copied to local disk first.
* :class:`ShardStream` is one epoch of decoded samples for one rank and one DataLoader worker: a seeded shard shuffle
  per epoch, a split by rank (``split="node"``) or a whole stream per rank that keeps its slice of every global batch
  (``split="global_batch"``), then by worker, and a seeded sample shuffle buffer. Undecodable samples are skipped and
  counted, never fatal; a member whose PNG header declares more pixels than the sample may hold is refused from its
  header, before any pixel is decoded (:func:`decode_sample`), logged and counted the same way.
* Integrity: a dataset read through its manifest is checked against it, by size when resolved
  (:func:`resolve_shards`, :meth:`ShardSet.token_urls`) and by sha256 as each shard streams (the bytes are hashed as
  they pass, the tail after the tar's end included). A mismatch is an error, never a skip: the run stops with one line
  naming the shard (:class:`ShardIntegrityError`), because the run records the manifest's sha256 as its lineage and
  must not train on other bytes under that name. The check of a shard completes when its last byte has been read, so
  samples of the shards being read at that moment (one per DataLoader worker) may have reached a few steps before
  the run stops; a run that stops this way is recorded FAILED (docs/SECURITY.md).
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
import hashlib
import json
import logging
import os
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from infra.core import storage
from infra.core.errors import UserError

from ..degrade.online import DrawLog, OnlineDegradation
from ..degrade.resize import RESIZE_BACK_MODES, random_resize_back, resize_back
from .format import (
    Manifest,
    MemberTooLarge,
    ShardEntry,
    TokenCache,
    decode_png,
    decode_token_members,
    is_token_shard,
    read_manifest,
    token_shard_name,
)

log = logging.getLogger(__name__)

LR_MODES = ("pil_bicubic", "bicubic", "bilinear", "area", "random")


class ShardIntegrityError(UserError):
    """A shard's bytes differ from what its manifest records (size or sha256): the dataset changed or is damaged."""


def _integrity_error(url: str, what: str, location: str | None = None) -> ShardIntegrityError:
    where = storage.parent(url) if location is None else location
    return ShardIntegrityError(
        f"shard {url}: {what}; the dataset changed or is damaged since its manifest was "
        f"written (check it with: varsr data verify {where})"
    )


def check_sizes(urls: list[str], expected: dict[str, ShardEntry], location: str) -> None:
    """The cheap check at start: every shard with a manifest entry exists and has the size it records."""
    for u in urls:
        e = expected.get(u)
        if e is None:
            continue
        if not storage.exists(u):
            raise UserError(f"manifest of {location} lists a missing shard {u}")
        n = storage.size(u)
        if n != e.bytes:
            raise _integrity_error(u, f"{n} bytes where the manifest records {e.bytes}", location)


# ---- which shards -------------------------------------------------------------------------------------------------
@dataclass
class ShardSet:
    """Resolved shard URLs plus what the manifest says about them (lineage)."""

    urls: list[str]
    location: str
    manifest: Manifest | None = None
    manifest_sha256: str | None = None
    # shard URL -> its manifest entry (originals and token shards): what readers verify (size, then sha256 as read)
    expected: dict[str, ShardEntry] = field(default_factory=dict)

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
            raise UserError(
                f"the token cache of {self.location} does not list {absent[0]} "
                f"({len(absent)} shard(s) uncovered): run varsr data tokenize again"
            )
        urls = [storage.join(storage.parent(u), n) for u, n in zip(self.urls, names)]
        if check:
            missing = [u for u in urls if not storage.exists(u)]
            if missing:
                raise UserError(
                    f"the token cache of {self.location} lists {len(missing)} missing shard(s), e.g. {missing[0]}"
                )
            check_sizes(urls, self.expected, self.location)
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
        m, sha = read_manifest(s)  # its shard names are plain relative names inside s (format.check_shard_name)
        urls = [storage.join(s, e.name) for e in m.shards if e.samples > 0]
        expected = {storage.join(s, e.name): e for e in m.shards + (m.tokens.shards if m.tokens else [])}
        if check:
            missing = [u for u in urls if not storage.exists(u)]
            if missing:
                raise UserError(f"manifest of {s} lists {len(missing)} missing shard(s), e.g. {missing[0]}")
            check_sizes(urls, expected, s)
        return ShardSet(urls, s, m, sha, expected)
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


class _HashingReader:
    """A sequentially read file object that hashes (sha256) and counts the bytes that pass through it."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        b = self.f.read(size)
        self.h.update(b)
        self.n += len(b)
        return b

    def drain(self) -> None:
        """Read (and hash) what is left: the tar's end-of-archive blocks and record padding, or a corrupt rest."""
        while self.read(1 << 20):
            pass


def iter_verified_tar(url: str, entry: ShardEntry | None, location: str | None = None) -> Iterator[dict]:
    """:func:`iter_tar` that hashes the shard's bytes as they stream and, at its end, raises
    :class:`ShardIntegrityError` when size or sha256 differ from the manifest's ``entry`` (None: no check). A tar
    error inside a verified shard is re-raised only after the rest is hashed, so a tampered shard is reported as
    such, and a damaged one that still matches its manifest keeps its old treatment (counted as bad)."""
    if entry is None:
        yield from iter_tar(url)
        return
    with storage.open_url(url) as f:
        r = _HashingReader(f)
        try:
            yield from iter_tar_stream(r, url)
        except (tarfile.TarError, OSError, EOFError):
            r.drain()
            _verify(url, r, entry, location)
            raise
        r.drain()
        _verify(url, r, entry, location)


def _verify(url: str, r: _HashingReader, entry: ShardEntry, location: str | None) -> None:
    if r.n != entry.bytes:
        raise _integrity_error(url, f"{r.n} bytes read where the manifest records {entry.bytes}", location)
    got = r.h.hexdigest()
    if got != entry.sha256:
        recorded = entry.sha256[:16] or "(empty)"
        raise _integrity_error(url, f"sha256 {got[:16]}… where the manifest records {recorded}…", location)


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
            f = tar.extractfile(m)
            if f is None:  # not a regular file's data (isfile() was checked above)
                continue
            cur[ext] = f.read()
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
    hr = decode_png(raw["hr.png"], max_pixels=size * size)  # a bigger header is refused before decoding
    if hr.shape[0] != size or hr.shape[1] != size:
        raise ValueError(f"HR is {hr.shape[1]}x{hr.shape[0]}, expected {size}x{size}")
    return _to_tensor(hr)


def decode_sample(
    raw: dict,
    size: int,
    want_lr: bool,
    lr_mode: str = "pil_bicubic",
    rng: random.Random | None = None,
    tokens: TokenCache | None = None,
    online: OnlineDegradation | None = None,
    seed: int = 0,
    epoch: int = 0,
) -> dict:
    """Raw members -> {hr, lr (re-upsampled), lr_mode, label, class_id, key} (+ tokens, resid from the token cache
    ``tokens``); raises on bad data (undecodable PNG, wrong size, missing member, token members of another
    tokenizer) so the stream can skip and count it. ``online``: the LR is drawn from the HR for (``seed``,
    ``epoch``, key) instead of read (the drawn parameters go into ``degradation``)."""
    if want_lr and online is not None:
        return _degrade_online(raw, size, lr_mode, tokens, online, seed, epoch)
    hr = decode_hr(raw, size)
    meta = json.loads(raw["json"])
    out = {"hr": hr, "label": int(meta["label"]), "class_id": int(meta["class_id"]), "key": raw["__key__"]}
    if tokens is not None:
        idx, resid = decode_token_members(raw, tokens.tokenizer_sha256, tokens.patch_nums)
        out["tokens"], out["resid"] = torch.from_numpy(idx), torch.from_numpy(resid)
    if want_lr:
        lr = decode_png(raw["lr.png"], max_pixels=size * size)  # the LR is smaller than its HR
        if lr_mode == "random":
            modes = meta.get("degradation", {}).get("params", {}).get("resize_back", {}).get("modes", RESIZE_BACK_MODES)
            out["lr"], drawn = random_resize_back(lr, (size, size), rng or random.Random(0), modes)
            out["lr_mode"] = drawn["mode"]
        else:
            out["lr"] = upsample_lr(lr, (size, size), lr_mode)
            out["lr_mode"] = lr_mode
    return out


def _degrade_online(
    raw: dict, size: int, lr_mode: str, tokens: TokenCache | None, online: OnlineDegradation, seed: int, epoch: int
) -> dict:
    hr8 = decode_png(raw["hr.png"], max_pixels=size * size)
    if hr8.shape[0] != size or hr8.shape[1] != size:
        raise ValueError(f"HR is {hr8.shape[1]}x{hr8.shape[0]}, expected {size}x{size}")
    out = decode_sample({k: v for k, v in raw.items() if k != "lr.png"}, size, False, tokens=tokens)
    lr, params = online.draw(hr8, seed, epoch, out["key"])
    if lr_mode == "random":
        out["lr"], drawn = random_resize_back(
            lr, (size, size), online.resize_back_rng(seed, epoch, out["key"]), params["resize_back"]["modes"]
        )
        out["lr_mode"] = drawn["mode"]
    else:
        out["lr"], out["lr_mode"] = upsample_lr(lr, (size, size), lr_mode), lr_mode
    out["degradation"] = params
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
    give the same sample order as its originals. ``expected``: the manifest entries of ``urls`` (from
    :class:`ShardSet`); each such shard is hashed as it streams and a mismatch stops the stream
    (:func:`iter_verified_tar`).
    """

    def __init__(
        self,
        urls,
        *,
        size: int,
        want_lr: bool,
        seed: int,
        epoch: int,
        rank: int,
        world: int,
        split: str = "node",
        shuffle_buffer: int = 64,
        lr_mode: str = "pil_bicubic",
        tokens: TokenCache | None = None,
        expected: dict[str, ShardEntry] | None = None,
        skip: list[int] | None = None,
        online: OnlineDegradation | None = None,
    ):
        if lr_mode not in LR_MODES:
            raise UserError(f"lr_mode must be one of {', '.join(LR_MODES)}, got {lr_mode!r}")
        self.urls, self.size, self.want_lr, self.lr_mode = list(urls), size, want_lr, lr_mode
        self.tokens, self.expected = tokens, dict(expected or {})
        self.seed, self.epoch, self.rank, self.world = seed, epoch, rank, world
        self.split, self.buffer = split, shuffle_buffer
        # samples to drop from the start of each DataLoader worker's stream (a resume on another number of ranks,
        # :func:`regroup_position`): they were consumed before the checkpoint
        self.skip = list(skip or [])
        self.online = online  # degrade each HR on the fly (data_pipeline/degrade/online.py) instead of reading its LR

    def shards_for(self, worker: int, nworkers: int) -> list[str]:
        """This (rank, worker)'s shards of the epoch: seeded shuffle, then split by rank (split=node) and worker."""
        urls = list(self.urls)
        random.Random(f"{self.seed}/{self.epoch}/shards").shuffle(urls)
        if self.split == "node" and self.world > 1:
            if len(urls) < self.world:
                raise UserError(
                    f"{len(urls)} shard(s) cannot feed {self.world} ranks with split=node: write more, "
                    f"smaller shards (shard.max_samples_per_shard) or use data.split=global_batch"
                )
            urls = urls[self.rank :: self.world]
        return urls[worker::nworkers]

    def __iter__(self):
        """This worker's samples, each tagged with ``worker`` (which DataLoader worker's stream it comes from), less
        the first ``skip[worker]`` of them."""
        info = torch.utils.data.get_worker_info()
        worker, nworkers = (info.id, info.num_workers) if info else (0, 1)
        skip = self.skip[worker] if worker < len(self.skip) else 0
        for i, s in enumerate(self._decoded(worker, nworkers)):
            if i >= skip:
                s["worker"] = worker
                yield s

    def _decoded(self, worker: int, nworkers: int):
        rank_tag = self.rank if self.split == "node" else 0
        rng = random.Random(f"{self.seed}/{self.epoch}/{rank_tag}/{worker}/buffer")
        lr_rng = random.Random(f"{self.seed}/{self.epoch}/{rank_tag}/{worker}/lr_mode")
        buf: list[dict] = []
        bad = 0

        def raw_samples():
            for url in self.shards_for(worker, nworkers):
                try:
                    yield from iter_verified_tar(url, self.expected.get(url))
                except UserError:
                    raise  # storage unreachable / refused, or not the manifest's bytes: not a bad sample, a failed run
                except (tarfile.TarError, OSError, EOFError) as e:  # a corrupt tar tail: count it, go on
                    log.warning("shard %s: stopped reading (%s: %s)", url, type(e).__name__, e)
                    yield None

        for raw in raw_samples():
            if raw is None:
                bad += 1
                continue
            try:
                s = decode_sample(
                    raw, self.size, self.want_lr, self.lr_mode, lr_rng, self.tokens, self.online, self.seed, self.epoch
                )
            except MemberTooLarge as e:  # refused from its header, nothing decoded: worth a line, then skip and count
                log.warning("skipping sample %s of %s: %s", raw.get("__key__"), raw.get("__url__"), e)
                bad += 1
                continue
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
        "worker": int(samples[0].get("worker", 0)),  # a DataLoader batch comes from one worker's stream
    }
    if "lr" in samples[0]:
        out["lr"] = torch.stack([s["lr"] for s in samples])
        out["lr_mode"] = [s["lr_mode"] for s in samples]
    if "degradation" in samples[0]:
        out["degradation"] = [s["degradation"] for s in samples]
    if "tokens" in samples[0]:
        out["tokens"] = torch.stack([s["tokens"] for s in samples])
        out["resid"] = torch.stack([s["resid"] for s in samples])
    return out


# ---- endless, resumable batches -----------------------------------------------------------------------------------
@dataclass
class DataPosition:
    """Where a rank's :class:`BatchStream` stands; saved with every training checkpoint.

    ``batches_in_epoch`` counts the batches since the epoch's stream was (re)built; ``epoch_skip`` is what that stream
    left out of each DataLoader worker's samples (empty: nothing, the normal case; set after a resume on another
    number of ranks, :func:`regroup_position`); ``worker_samples`` counts the samples of the epoch consumed from each
    worker's stream by all ranks together (split=global_batch) or by this rank (split=node), skipped ones included.
    """

    epoch: int = 0
    batches_in_epoch: int = 0
    samples_consumed: int = 0  # per rank, over the whole run
    bad_samples: int = 0
    epoch_skip: list[int] = field(default_factory=list)
    worker_samples: list[int] = field(default_factory=list)


def regroup_position(
    positions: list[DataPosition], world: int, rank: int, split: str, workers: int
) -> tuple[DataPosition, str]:
    """The position of ``rank`` of ``world`` ranks that resume from the per-rank ``positions`` a checkpoint of
    another number of ranks saved, and one line saying what the regrouping guarantees (docs/ELASTIC.md).

    * ``split=global_batch``: every rank reads the whole epoch stream and keeps its slice of each global batch, so the
      epoch's sample order does not depend on the world size: the new stream leaves out exactly the samples consumed
      from each worker's stream and forms batches of the new global size from the rest. No sample of the epoch is seen
      twice or skipped, bar the tail of each worker's stream that fills no whole batch (as in every epoch).
    * ``split=node``: each rank read its own shards, and that split changes with the world size; the run goes on at
      the start of the next epoch, so no sample is seen twice in an epoch, and the interrupted epoch's unread samples
      (their number is in the line) are not seen in it.
    """
    nw = max(1, workers)
    first = positions[0]
    consumed = sum(p.samples_consumed for p in positions)
    if split == "global_batch":
        if not first.worker_samples:
            raise UserError(
                "this checkpoint predates per-worker data positions: resume it on the number of ranks "
                f"that wrote it ({len(positions)})"
            )
        if len(first.worker_samples) != nw:
            raise UserError(
                f"the checkpoint's data stream had {len(first.worker_samples)} DataLoader worker "
                f"stream(s), this run has {nw}: set data.workers={len(first.worker_samples)} "
                f"(0 for one stream) to resume on another number of ranks"
            )
        pos = DataPosition(
            epoch=first.epoch,
            batches_in_epoch=0,
            samples_consumed=consumed // world,
            bad_samples=first.bad_samples,
            epoch_skip=list(first.worker_samples),
            worker_samples=list(first.worker_samples),
        )
        return pos, (
            f"data position carried over exactly: epoch {first.epoch}, {sum(first.worker_samples)} "
            f"sample(s) of it consumed, batches re-formed for {world} rank(s)"
        )
    seen = sum(sum(p.worker_samples) for p in positions)
    pos = DataPosition(
        epoch=first.epoch + 1,
        batches_in_epoch=0,
        samples_consumed=consumed // world,
        bad_samples=sum(p.bad_samples for p in positions) // world,
    )
    return pos, (
        f"data.split=node: the shard split changes with the number of ranks, so the run goes on at the "
        f"start of epoch {first.epoch + 1} ({seen} sample(s) of epoch {first.epoch} were read before the "
        f"checkpoint; its other samples are not seen in it; data.split=global_batch resumes exactly)"
    )


class BatchStream:
    """Endless per-rank batches over epochs, with a resumable :class:`DataPosition`.

    ``tokens=True`` reads the dataset's token cache (:meth:`ShardSet.token_urls`): the same batches, each with the
    cached ``tokens`` (B, L) and ``resid`` (B, pn_last², Cvae) added.
    """

    def __init__(
        self,
        shards: ShardSet,
        *,
        size: int,
        want_lr: bool,
        batch_size: int,
        workers: int,
        seed: int,
        rank: int,
        world: int,
        split: str = "node",
        shuffle_buffer: int = 64,
        position: DataPosition | None = None,
        lr_mode: str = "pil_bicubic",
        tokens: bool = False,
        degrade: str = "",
        record_draws: tuple[str | os.PathLike, int] | None = None,
    ):
        self.shards, self.size, self.want_lr = shards, size, want_lr
        # ``degrade``: a degradation preset -> every epoch draws each sample's LR afresh (data_pipeline/degrade/
        # online.py); "" -> the LR stored in the shards. ``record_draws``: (JSONL path, every N-th batch) -> the
        # parameters drawn for a sample of the batches are appended there (:class:`DrawLog`, replayable)
        self.online = OnlineDegradation.from_preset(degrade) if degrade and want_lr else None
        self.draw_log = DrawLog(Path(record_draws[0]), record_draws[1]) if record_draws and self.online else None
        m = shards.manifest
        if want_lr and self.online is None and m is not None and m.lr_variants == 0:
            raise UserError(
                f"shards {shards.location!r} are HR-only (built with shard.lr_variants=0) and this run "
                f"reads stored LR: set data.degrade to a degradation preset (e.g. varsr-mild)"
            )
        self.batch_size, self.workers, self.seed = batch_size, workers, seed
        self.rank, self.world, self.split, self.buffer = rank, world, split, shuffle_buffer
        self.lr_mode = lr_mode
        self.tokens = shards.token_cache if tokens else None
        self.urls = shards.token_urls() if tokens else shards.urls
        self.pos = position or DataPosition()

    def epoch_stream(self, epoch: int, skip: list[int] | None = None) -> ShardStream:
        return ShardStream(
            self.urls,
            size=self.size,
            want_lr=self.want_lr,
            seed=self.seed,
            epoch=epoch,
            rank=self.rank,
            world=self.world,
            split=self.split,
            shuffle_buffer=self.buffer,
            lr_mode=self.lr_mode,
            tokens=self.tokens,
            expected={u: self.shards.expected[u] for u in self.urls if u in self.shards.expected},
            skip=skip,
            online=self.online,
        )

    @property
    def global_batch(self) -> int:
        """Samples one DataLoader batch takes from the epoch stream (all ranks' slices with split=global_batch)."""
        return self.batch_size * (self.world if self.split == "global_batch" else 1)

    def _epoch_batches(self, epoch: int, skip: list[int] | None = None) -> Iterator[dict]:
        global_bs = self.global_batch
        loader = torch.utils.data.DataLoader(
            self.epoch_stream(epoch, skip),
            batch_size=global_bs,
            num_workers=self.workers,
            collate_fn=collate,
            drop_last=True,
            persistent_workers=False,
            prefetch_factor=4 if self.workers else None,
            # its own generator: creating the iterator must not draw from the global torch RNG (exact resume)
            generator=torch.Generator().manual_seed(self.seed * 1000 + epoch),
        )
        try:
            for b in loader:
                if self.split == "global_batch" and self.world > 1:
                    sl = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
                    b = {k: (v[sl] if isinstance(v, (torch.Tensor, list)) else v) for k, v in b.items()}
                yield b
        except UserError as e:  # raised in a DataLoader worker: torch re-raises it with the worker's traceback
            one = _worker_message(str(e))
            if one is None:
                raise
            raise type(e)(one) from None

    def __iter__(self) -> Iterator[dict]:
        nw = max(1, self.workers)
        while True:
            skip = self.pos.batches_in_epoch
            recount = len(self.pos.worker_samples) != nw  # a position saved before per-worker counts existed
            if recount:
                self.pos.worker_samples = list(self.pos.epoch_skip) or [0] * nw
            got_any = False
            for i, b in enumerate(self._epoch_batches(self.pos.epoch, self.pos.epoch_skip)):
                got_any = True
                if i < skip:
                    if recount:
                        self.pos.worker_samples[b["worker"]] += self.global_batch
                    continue
                self.pos.batches_in_epoch += 1
                self.pos.samples_consumed += len(b["key"])
                self.pos.bad_samples += int(b["bad"])
                self.pos.worker_samples[b["worker"]] += self.global_batch
                if self.draw_log is not None:
                    self.draw_log(b, self.pos.epoch)
                yield b
            if not got_any and not any(self.pos.epoch_skip):
                raise UserError(
                    f"shards {self.shards.location!r} yielded no complete batch of {self.batch_size} "
                    f"at {self.size}px for rank {self.rank} (too few valid samples?)"
                )
            self.pos.epoch += 1
            self.pos.batches_in_epoch = 0
            self.pos.epoch_skip, self.pos.worker_samples = [], [0] * nw


def _worker_message(text: str) -> str | None:
    """The original one-line message of an error torch re-raised from a DataLoader worker (``Caught X in DataLoader
    worker process N. Original Traceback ... module.X: message``); None for an error raised in this process."""
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return None
    last = text.rstrip().splitlines()[-1]
    head, sep, msg = last.partition(": ")
    return msg if sep and " " not in head else last


# ---- evaluation pairs ---------------------------------------------------------------------------------------------
def eval_pairs(spec: str | list[str]) -> list[tuple[str, bytes, bytes]]:
    """(key, HR PNG bytes, LR PNG bytes) for every sample that has both images, in shard order (decoding is the
    evaluator's business: it applies its own input limits)."""
    shards = resolve_shards(spec)
    pairs = [
        (raw["__key__"].replace("/", "_"), raw["hr.png"], raw["lr.png"])
        for url in shards.urls
        for raw in iter_verified_tar(url, shards.expected.get(url), shards.location)
        if "hr.png" in raw and "lr.png" in raw
    ]
    if not pairs:
        raise UserError(f"no samples with both .hr.png and .lr.png in {spec}")
    return pairs
