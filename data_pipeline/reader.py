"""Training reader: a WebDataset pipeline over the shards, split by node and worker, shuffled, optionally resampled.

Yields dicts (or collated batches of them) with
  hr        float32 tensor (3, H, W) in [0, 1]
  lr        float32 tensor (3, H, W) in [0, 1]: the stored low-resolution LR re-upsampled to the HR size
            (`lr_upsample`: "pil_bicubic" = inference as in the spec (default); "bicubic" | "bilinear" | "area" =
            torch F.interpolate; "random" = one of the torch modes per sample as in training upstream; "none" =
            keep the low-resolution LR (3, H/s, W/s)); re-upsampled LRs are quantised to 8 bits as upstream
  label     int, 0 = high-quality positive, 1 = low-quality negative (image-based CFG)
  class_id  int, semantic cluster id (stage-1 C2I)
  key       str, sample key
Optionally `lr_lowres` (the stored LR as a tensor) and `meta` (the sample's JSON dict).
"""
from __future__ import annotations


import itertools
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from .shards import decode_png

LR_MODES = ("pil_bicubic", "bicubic", "bilinear", "area", "random", "none")


def resolve_shards(urls_or_dir, validate: bool = True) -> list[str]:
    """A folder with manifest.json (checked: every listed shard present) or *.tar files, a brace pattern, a glob,
    or a list of URLs."""
    if isinstance(urls_or_dir, (list, tuple)):
        return [str(u) for u in urls_or_dir]
    s = str(urls_or_dir)
    if os.path.isdir(s):
        man = Path(s) / "manifest.json"
        if man.exists():
            m = json.loads(man.read_text())
            urls = [str(Path(s) / sh["name"]) for sh in m["shards"] if sh["samples"] > 0]
            if validate:
                missing = [u for u in urls if not os.path.exists(u)]
                if missing:
                    raise FileNotFoundError(f"manifest {man} lists {len(missing)} missing shards, e.g. {missing[0]}")
            return urls
        urls = sorted(str(p) for p in Path(s).glob("*.tar"))
        if not urls:
            raise FileNotFoundError(f"no manifest.json and no .tar shards in {s}")
        return urls
    if "{" in s:
        return list(wds.shardlists.expand_urls(s))
    if any(c in s for c in "*?["):
        import glob
        return sorted(glob.glob(s))
    return [s]


def dist_info(world_size: int | None, rank: int | None) -> tuple[int, int]:
    if world_size is not None:
        return int(world_size), int(rank or 0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))


def _worker() -> tuple[int, int]:
    wi = torch.utils.data.get_worker_info()
    return (wi.id, wi.num_workers) if wi is not None else (0, 1)


def check_coverage(n_shards: int, world_size: int, num_workers: int) -> None:
    need = world_size * max(1, num_workers)
    if n_shards < need:
        raise ValueError(f"{n_shards} shards cannot feed {world_size} nodes x {max(1, num_workers)} workers = "
                         f"{need} readers: every reader needs at least one shard. Write more, smaller shards "
                         f"(shard.max_samples_per_shard), use fewer workers, or read with resampled=True.")


class _ShardSource(torch.utils.data.IterableDataset):
    """Shard URLs for this (node, worker): a seeded per-epoch shard shuffle, then a disjoint split, or resampling."""

    def __init__(self, urls, world_size, rank, seed, shuffle, resampled):
        self.urls, self.world_size, self.rank = list(urls), world_size, rank
        self.seed, self.shuffle, self.resampled, self.epoch = seed, shuffle, resampled, 0

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1                     # in-process re-iteration moves on; DataLoader workers use set_epoch
        w, nw = _worker()
        if self.resampled:
            rng = random.Random(hash((self.seed, epoch, self.rank, w)) & 0xFFFFFFFF)
            while True:
                yield {"url": self.urls[rng.randrange(len(self.urls))]}
        check_coverage(len(self.urls), self.world_size, nw)
        urls = list(self.urls)
        if self.shuffle:
            random.Random(self.seed * 1000003 + epoch).shuffle(urls)
        for u in urls[self.rank::self.world_size][w::nw]:
            yield {"url": u}


class _Shuffle:
    """Sample shuffle buffer; its RNG is seeded by (seed, epoch, rank, worker)."""

    def __init__(self, bufsize: int, seed: int, rank: int):
        self.bufsize, self.seed, self.rank, self.epoch = bufsize, seed, rank, 0

    def __call__(self, src):
        w, _ = _worker()
        rng = random.Random(hash((self.seed, self.epoch, self.rank, w, "shuffle")) & 0xFFFFFFFF)
        self.epoch += 1
        yield from _shuffle(src, self.bufsize, rng)


def _shuffle(src, bufsize: int, rng: random.Random):
    buf = []
    for s in src:
        if len(buf) < bufsize:
            buf.append(s)
            continue
        i = rng.randrange(len(buf))
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


def _to_tensor(a: np.ndarray) -> torch.Tensor:
    a = a if a.flags.writeable and a.flags.c_contiguous else np.array(a, order="C")
    return torch.from_numpy(a).permute(2, 0, 1).float().div_(255.0)


def upsample_lr(lr: np.ndarray, size_hw: tuple[int, int], mode: str) -> torch.Tensor:
    """LR uint8 (h, w, 3) -> float (3, H, W) in [0, 1], 8-bit quantised."""
    if mode == "pil_bicubic":
        up = Image.fromarray(lr).resize((size_hw[1], size_hw[0]), Image.Resampling.BICUBIC)
        return _to_tensor(np.asarray(up))
    x = _to_tensor(lr)[None]
    kw = {} if mode == "area" else {"align_corners": False}
    y = F.interpolate(x, size=size_hw, mode=mode, **kw)[0]
    return y.clamp_(0, 1).mul_(255).round_().div_(255)


class _Decode:
    """PNG/JSON -> tensors; random crop / random LR mode use an RNG seeded by (seed, epoch, rank, worker)."""

    def __init__(self, hr_size, lr_size, lr_upsample, crop, keep_lr_lowres, keep_meta, seed, rank):
        self.hr_size, self.lr_size, self.mode, self.crop = hr_size, lr_size, lr_upsample, crop
        self.keep_lr_lowres, self.keep_meta, self.seed, self.rank, self.epoch = (keep_lr_lowres, keep_meta,
                                                                                 seed, rank, 0)

    def __call__(self, src):
        w, _ = _worker()
        rng = random.Random(hash((self.seed, self.epoch, self.rank, w, "decode")) & 0xFFFFFFFF)
        self.epoch += 1
        for s in src:
            yield self.decode(s, rng)

    def decode(self, s: dict, rng: random.Random) -> dict:
        meta = json.loads(s["json"])
        hr = decode_png(s["hr.png"])
        lr = decode_png(s["lr.png"])
        scale = hr.shape[0] // lr.shape[0]
        if self.hr_size is not None and self.hr_size != hr.shape[0]:
            if self.hr_size > min(hr.shape[:2]) or self.hr_size % scale:
                raise ValueError(f"hr_size {self.hr_size} must be <= stored {hr.shape[0]} and divisible by the "
                                 f"scale {scale}")
            lc = self.hr_size // scale
            if self.crop == "random":
                ly, lx = rng.randrange(lr.shape[0] - lc + 1), rng.randrange(lr.shape[1] - lc + 1)
            else:
                ly, lx = (lr.shape[0] - lc) // 2, (lr.shape[1] - lc) // 2
            lr = lr[ly:ly + lc, lx:lx + lc]
            hr = hr[ly * scale:(ly + lc) * scale, lx * scale:(lx + lc) * scale]
        if self.lr_size is not None and self.lr_size != lr.shape[0]:
            raise ValueError(f"lr_size {self.lr_size} does not match the shards' LR {lr.shape[0]} "
                             f"(HR {hr.shape[0]}, scale {scale})")
        mode = self.mode if self.mode != "random" else rng.choice(("area", "bilinear", "bicubic"))
        out = {"hr": _to_tensor(hr),
               "lr": _to_tensor(lr) if mode == "none" else upsample_lr(lr, hr.shape[:2], mode),
               "label": int(meta["label"]), "class_id": int(meta["class_id"]), "key": s["__key__"]}
        if self.keep_lr_lowres:
            out["lr_lowres"] = _to_tensor(lr)
        if self.keep_meta:
            out["meta"] = meta
        return out


class _Take:
    def __init__(self, n: int):
        self.n = n

    def __call__(self, src):
        yield from itertools.islice(src, self.n)


class _Batch:
    def __init__(self, batch_size: int, partial: bool):
        self.batch_size, self.partial = batch_size, partial

    def __call__(self, src):
        buf = []
        for s in src:
            buf.append(s)
            if len(buf) == self.batch_size:
                yield collate(buf)
                buf = []
        if buf and self.partial:
            yield collate(buf)


class VarsrShards(wds.DataPipeline):
    """The reader pipeline; `set_epoch(e)` before each epoch varies shard/sample order and random crops per epoch
    (also inside DataLoader worker processes, which copy the pipeline when they start)."""

    def set_epoch(self, epoch: int) -> None:
        for stage in self.pipeline:
            if hasattr(stage, "epoch"):
                stage.epoch = int(epoch)


def collate(samples: list[dict]) -> dict:
    out = {}
    for k in samples[0]:
        v = [s[k] for s in samples]
        if isinstance(v[0], torch.Tensor):
            out[k] = torch.stack(v)
        elif isinstance(v[0], int):
            out[k] = torch.tensor(v, dtype=torch.long)
        else:
            out[k] = v
    return out


def make_dataset(urls_or_dir, batch_size: int | None = None, *, shuffle: int = 1000, resampled: bool = False,
                 epoch_samples: int | None = None, seed: int = 0, lr_size: int | None = None,
                 hr_size: int | None = None, lr_upsample: str = "pil_bicubic", crop: str = "random",
                 world_size: int | None = None, rank: int | None = None, num_workers: int | None = None,
                 keep_lr_lowres: bool = False, keep_meta: bool = False, partial: bool = True) -> VarsrShards:
    """WebDataset pipeline (a torch IterableDataset) over VARSR shards.

    shuffle: sample shuffle buffer (0 = shard and sample order as written); resampled: draw shards with
    replacement per node/worker (infinite; bound it with epoch_samples); epoch_samples: samples per
    (node, worker) per epoch; hr_size: crop HR (and the aligned LR) to this size; lr_size: expected LR size
    (checked); world_size/rank: node split (default: torch.distributed or WORLD_SIZE/RANK env); num_workers: the
    DataLoader workers, checked against the shard count up front (also checked inside each worker).
    With batch_size, yields collated batches (use DataLoader(ds, batch_size=None, num_workers=...)).
    Call `ds.set_epoch(e)` before each epoch for a new shard/sample order; the pipeline is picklable (spawn-safe).
    """
    if lr_upsample not in LR_MODES:
        raise ValueError(f"lr_upsample must be one of {LR_MODES}")
    urls = resolve_shards(urls_or_dir)
    if not urls:
        raise ValueError(f"no shards in {urls_or_dir!r}")
    ws, rk = dist_info(world_size, rank)
    if not resampled and num_workers is not None:
        check_coverage(len(urls), ws, num_workers)
    if resampled and epoch_samples is None:
        raise ValueError("resampled=True is infinite: give epoch_samples")
    stages = [_ShardSource(urls, ws, rk, seed, shuffle > 0, resampled), wds.tarfile_to_samples()]
    if shuffle > 0:
        stages.append(_Shuffle(shuffle, seed, rk))
    stages.append(_Decode(hr_size, lr_size, lr_upsample, crop, keep_lr_lowres, keep_meta, seed, rk))
    if epoch_samples is not None:
        stages.append(_Take(epoch_samples))
    if batch_size:
        stages.append(_Batch(batch_size, partial))
    return VarsrShards(*stages)


def make_loader(urls_or_dir, batch_size: int, num_workers: int = 2, **kw) -> torch.utils.data.DataLoader:
    """DataLoader over `make_dataset` (batching happens inside the pipeline)."""
    ds = make_dataset(urls_or_dir, batch_size, num_workers=num_workers, **kw)
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers,
                                       persistent_workers=False, pin_memory=False)


def read_manifest(directory) -> dict:
    return json.loads((Path(directory) / "manifest.json").read_text())


