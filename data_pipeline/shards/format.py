"""The shard contract, typed: file names, tar members, the per-sample JSON, per-shard stats and the manifest.

A built dataset is one folder (a local path or an object-store prefix) holding

  ``{prefix}-{000000}.tar``         POSIX tars readable by plain ``webdataset``; per sample ``{key}.hr.png`` (HR crop),
                                    ``{key}.json`` (:class:`SampleMeta`), ``{key}.lr.png`` (LR at its low resolution)
  ``{prefix}-{000000}.stats.json``  :class:`ShardStats` of that tar (size and sha256 included)
  ``{prefix}-{000000}.tok-{sha12}.tar``   the token cache (``varsr data tokenize``): a new version of that shard made
                                    with the tokenizer whose weights hash to ``sha12…``: every member of the original,
                                    in order, then per sample ``TOKEN_MEMBERS`` (see :class:`TokenCache`)
  ``{prefix}-{000000}.tok-{sha12}.stats.json``   :class:`TokenShardStats` of that tar
  ``manifest.json``                 :class:`Manifest`: config, counts per outcome, every shard with size and sha256,
                                    and the token cache (``tokens``) once one is complete
  ``rejected.parquet``              every input not in a shard, with its reason
  ``scores.parquet`` / ``selection.parquet``   the score and select steps' tables

A shard appears under its final name only when complete; the manifest is written last and is the commit point: a
folder without ``manifest.json`` is an unfinished build. Readers verify what they read against it.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from infra.core import storage
from infra.core.config import ConfigError, build, to_dict
from infra.core.errors import UserError

MANIFEST = "manifest.json"
REJECTED = "rejected.parquet"
SCORES = "scores.parquet"
SELECTION = "selection.parquet"
SAMPLE_MEMBERS = ("hr.png", "json", "lr.png")  # tar member order per sample (fixed: byte-identical shards)
# token-cache members added after a sample's own members: its multi-scale token indices (all scales concatenated,
# coarse to fine, raster order inside a scale; int16 when the vocabulary fits, else int32), the continuous residual
# left before the last scale (the refiner's target; float32, (pn_last², Cvae)) and the tokenizer that made them
TOKEN_MEMBERS = ("tokens.npy", "resid.npy", "tokens.json")
TOKEN_TAG = ".tok-"  # in a token shard's name, before the first 12 hex digits of the tokenizer's sha256


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def stats_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.stats.json"


def token_shard_name(shard: str, tokenizer_sha256: str) -> str:
    """The token-cache version of shard ``shard`` (a ``.tar`` name) for one tokenizer:
    ``shard-000003.tar`` -> ``shard-000003.tok-<first 12 hex digits of its sha256>.tar``."""
    if not shard.endswith(".tar") or TOKEN_TAG in shard:
        raise ValueError(f"{shard!r} is not an original shard name")
    return f"{shard[:-4]}{TOKEN_TAG}{tokenizer_sha256[:12]}.tar"


def token_stats_name(token_shard: str) -> str:
    return token_shard[:-4] + ".stats.json"


def is_token_shard(name: str) -> bool:
    return TOKEN_TAG in storage.basename(name)


# ---- pixels ------------------------------------------------------------------------------------------------------
_PNG_STRATEGY = {
    "default": cv2.IMWRITE_PNG_STRATEGY_DEFAULT,
    "filtered": cv2.IMWRITE_PNG_STRATEGY_FILTERED,
    "huffman_only": cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY,
    "rle": cv2.IMWRITE_PNG_STRATEGY_RLE,
    "fixed": cv2.IMWRITE_PNG_STRATEGY_FIXED,
}
_PNG_FILTER = {
    "none": cv2.IMWRITE_PNG_FILTER_NONE,
    "sub": cv2.IMWRITE_PNG_FILTER_SUB,
    "up": cv2.IMWRITE_PNG_FILTER_UP,
    "avg": cv2.IMWRITE_PNG_FILTER_AVG,
    "paeth": cv2.IMWRITE_PNG_FILTER_PAETH,
    "fast": cv2.IMWRITE_PNG_FAST_FILTERS,
    "all": cv2.IMWRITE_PNG_ALL_FILTERS,
}


def encode_png(rgb: np.ndarray, level: int, strategy: str = "rle", filt: str = "paeth") -> bytes:
    """Deterministic PNG of an RGB uint8 image via OpenCV/libpng. On 512-px photos zlib level 1 + RLE strategy +
    Paeth filter encodes ~2x faster than the default filters and ~9 % smaller."""
    params = [
        cv2.IMWRITE_PNG_COMPRESSION,
        int(level),
        cv2.IMWRITE_PNG_STRATEGY,
        _PNG_STRATEGY[strategy],
        cv2.IMWRITE_PNG_FILTER,
        _PNG_FILTER[filt],
    ]
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


class MemberTooLarge(ValueError):
    """A member whose image header declares more pixels than allowed: refused before any pixel is decoded."""


def decode_png(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """RGB uint8 (H, W, 3) of a PNG member; ValueError when it does not decode, :class:`MemberTooLarge` when its
    header declares more than ``max_pixels`` (default: ingestion's ``DecodeConfig.max_pixels``) or more bytes than
    ingestion accepts. The header is read by ingestion's own check (``data_pipeline.decode.probe``) before OpenCV
    decodes anything, so a few-KB member declaring 30000x30000 costs nothing (a shard is data, possibly not ours)."""
    from ..config import DecodeConfig
    from ..decode import probe

    ingest = DecodeConfig()
    limits = DecodeConfig(
        max_bytes=ingest.max_bytes, min_side=1, max_pixels=min(ingest.max_pixels, max_pixels or ingest.max_pixels)
    )
    head = probe(data, limits)
    if head.status != "ok":
        if head.reason == "decompression_bomb" and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            w, h = struct.unpack(">II", data[16:24])  # PIL's own bomb error does not say the size
            raise MemberTooLarge(
                f"member's PNG header declares {w}x{h} = {w * h} pixels, over the limit of "
                f"{limits.max_pixels}; refused without decoding"
            )
        if head.reason in ("decompression_bomb", "too_many_bytes"):
            raise MemberTooLarge(f"member refused from its header: {head.error}")
        raise ValueError(f"member is not a decodable PNG ({head.reason}: {head.error})")
    head.info.pop("_im").close()
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("member is not a decodable PNG")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


# ---- token-cache members -----------------------------------------------------------------------------------------
def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def encode_token_members(
    tokens: np.ndarray, resid: np.ndarray, tokenizer_sha256: str, patch_nums: list[int] | tuple[int, ...]
) -> dict[str, bytes]:
    """One sample's token-cache members (``TOKEN_MEMBERS``), deterministic bytes.

    tokens: (L,) integer indices of every scale (L = sum of pn²), stored int16 when they fit, else int32 (lossless);
    resid: (pn_last², Cvae) float32, stored as is (bit-exact).
    """
    pn = [int(p) for p in patch_nums]
    t = np.asarray(tokens)
    r = np.asarray(resid)
    if t.ndim != 1 or t.shape[0] != sum(p * p for p in pn) or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"tokens must be ({sum(p * p for p in pn)},) integers, got {t.shape} {t.dtype}")
    if r.dtype != np.float32 or r.ndim != 2 or r.shape[0] != pn[-1] ** 2:
        raise ValueError(f"resid must be ({pn[-1] ** 2}, Cvae) float32, got {r.shape} {r.dtype}")
    lo, hi = (int(t.min()), int(t.max())) if t.size else (0, 0)
    if lo < 0:
        raise ValueError(f"token indices must be >= 0, got {lo}")
    small = hi <= np.iinfo(np.int16).max
    meta = {"tokenizer_sha256": tokenizer_sha256, "patch_nums": pn}
    return {
        "tokens.npy": _npy(t.astype(np.int16 if small else np.int32)),
        "resid.npy": _npy(r),
        "tokens.json": json.dumps(meta, sort_keys=True).encode(),
    }


def decode_token_members(
    raw: dict, tokenizer_sha256: str, patch_nums: list[int] | tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (L,) int64, resid (pn_last², Cvae) float32) of one sample's raw members; ValueError when a member is
    missing, was made by another tokenizer or for other scales, or has the wrong shape or type."""
    missing = [m for m in TOKEN_MEMBERS if m not in raw]
    if missing:
        raise ValueError(f"no token-cache member(s) {', '.join(missing)}")
    meta = json.loads(raw["tokens.json"])
    pn = [int(p) for p in patch_nums]
    if meta.get("tokenizer_sha256") != tokenizer_sha256 or [int(p) for p in meta.get("patch_nums", [])] != pn:
        raise ValueError(
            f"token members made by tokenizer {str(meta.get('tokenizer_sha256'))[:12]} for scales "
            f"{meta.get('patch_nums')}, expected {tokenizer_sha256[:12]} for {pn}"
        )
    t = np.load(io.BytesIO(raw["tokens.npy"]), allow_pickle=False)
    r = np.load(io.BytesIO(raw["resid.npy"]), allow_pickle=False)
    if t.dtype not in (np.int16, np.int32) or t.shape != (sum(p * p for p in pn),):
        raise ValueError(f"tokens.npy is {t.shape} {t.dtype}, expected ({sum(p * p for p in pn)},) int16/int32")
    if r.dtype != np.float32 or r.ndim != 2 or r.shape[0] != pn[-1] ** 2:
        raise ValueError(f"resid.npy is {r.shape} {r.dtype}, expected ({pn[-1] ** 2}, Cvae) float32")
    return t.astype(np.int64), r


# ---- typed records -------------------------------------------------------------------------------------------------
@dataclass
class SampleMeta:
    """``{key}.json``: where a sample comes from and how its LR was made (enough to reproduce it exactly)."""

    key: str
    source_uri: str
    sha256: str  # of the source file's bytes
    original_size: list[int]  # [width, height] of the decoded source
    label: int  # 0 = high-quality positive, 1 = low-quality negative (image-based CFG)
    class_id: int  # semantic cluster (stage-1 class-to-image)
    scores: dict[str, Any]
    crop: dict[str, Any]
    hr_size: list[int]
    lr_size: list[int]
    scale: int
    variant: int  # LR variant index of the same HR
    degradation: dict[str, Any]  # {"preset": name, "params": every sampled parameter incl. the seed}
    source_meta: dict[str, Any]
    pipeline_version: str
    config_hash: str

    def to_bytes(self) -> bytes:
        return json.dumps(to_dict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "SampleMeta":
        return build(cls, json.loads(data))


@dataclass
class ShardFailure:
    uri: str
    reason: str
    error: str


@dataclass
class ShardStats:
    """``{prefix}-{index}.stats.json``: what one shard task wrote (returned to the driver as the task's result)."""

    shard: str
    index: int
    samples: int
    images: int
    failed: list[ShardFailure]
    labels: dict[str, int]
    classes: dict[str, int]
    hr_size: int
    lr_size: int
    config_hash: str
    bytes: int = 0
    sha256: str = ""


def check_shard_name(name: str) -> str:
    """``name`` when it is a plain relative name of a tar inside the dataset folder (``shard-000000.tar``, or
    ``sub/shard-000000.tar``); ValueError otherwise. A manifest is data, possibly from someone else: its names are
    joined onto the dataset's location by training, ``varsr data verify`` and the token cache, so an absolute path
    (``/etc/hostname``), a parent step (``../outside/secret.tar``), a URL (``s3://…``, ``file:…``), a backslash, a
    home folder (``~``) or a control character would read outside the dataset (docs/SECURITY.md)."""
    why = None
    if not isinstance(name, str) or not name:
        why = "empty"
    elif name.startswith("/"):
        why = "an absolute path"
    elif name.startswith("~"):
        why = "a home folder"
    elif ":" in name:
        why = "a URL or drive"
    elif "\\" in name:
        why = "a backslash"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        why = "a control character"
    elif any(part in ("", ".", "..") for part in name.split("/")):
        why = "an empty, '.' or '..' path step"
    elif not name.endswith(".tar"):
        why = "no .tar suffix"
    if why:
        raise ValueError(f"shard name {name!r} is not a plain relative name inside the dataset ({why})")
    return name


@dataclass
class ShardEntry:
    """One tar of the dataset: its name relative to the dataset folder (checked by :func:`check_shard_name`), its
    sample count, size in bytes and sha256 (what readers verify, ``reader.py``)."""

    name: str
    samples: int
    bytes: int
    sha256: str

    def __post_init__(self) -> None:
        check_shard_name(self.name)


@dataclass
class Counts:
    """Every input is counted once: kept, rejected (with a reason) or failed (with an error)."""

    inputs: int
    kept: int
    rejected: int
    failed: int
    rejected_by_reason: dict[str, int]
    failed_by_reason: dict[str, int]
    samples: int
    labels: dict[str, int]
    classes: int


@dataclass
class TokenCache:
    """The optional token cache (``varsr data tokenize``): which tokenizer made it and the shards it wrote.

    ``shards`` holds one entry per non-empty shard of the manifest, in the same order, named by
    :func:`token_shard_name`; each holds the same samples in the same order as its original, so a reader that swaps
    the originals for these sees the same stream. ``device`` says where the tokenizer ran (``cpu/<threads>t`` or
    ``cuda/<name>``): cached values are bit-identical to tokenising on the fly with the same kernels (same device
    and CPU thread count); elsewhere they agree to float32 rounding.
    """

    tokenizer_sha256: str
    patch_nums: list[int]
    shards: list[ShardEntry]
    device: str = ""


@dataclass
class TokenShardStats:
    """``{token shard}.stats.json``: what one tokenise task wrote, checked on resume (size and sha256, and that its
    source shard and tokenizer are still the ones it was made from)."""

    shard: str
    source: str
    source_sha256: str
    tokenizer_sha256: str
    samples: int
    tokenized: int  # samples that got token members (the others have an undecodable or mis-sized HR)
    device: str
    bytes: int = 0
    sha256: str = ""


@dataclass
class Manifest:
    pipeline_version: str
    config_hash: str
    config: dict[str, Any]
    counts: Counts
    hr_size: int
    lr_size: int
    scale: int
    lr_variants: int
    shards: list[ShardEntry]
    tokens: TokenCache | None = None

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def to_bytes(self) -> bytes:
        d = to_dict(self)
        if d["tokens"] is None:
            del d["tokens"]  # manifests without a token cache stay byte-identical to earlier builds
        return json.dumps(d, indent=1, sort_keys=True).encode()


def stats_to_bytes(stats: ShardStats | TokenShardStats) -> bytes:
    return json.dumps(to_dict(stats), indent=1, sort_keys=True).encode()


def read_stats(url: str) -> ShardStats:
    return _parse(ShardStats, url, storage.read_bytes(url))


def read_token_stats(url: str) -> TokenShardStats:
    return _parse(TokenShardStats, url, storage.read_bytes(url))


def _parse(cls, url: str, raw: bytes):
    try:
        return build(cls, json.loads(raw))
    except json.JSONDecodeError as e:
        raise UserError(f"{url} is not valid JSON: {e}") from None
    except ConfigError as e:  # one line: pydantic's report without its input echo and links
        lines = [re.sub(r"\s*\[type=.*\]$", "", ln).strip() for ln in str(e).splitlines()]
        why = "; ".join(ln.rstrip(":") for ln in lines if ln and not ln.startswith("For further information"))
        raise UserError(f"{url} does not follow the shard contract ({cls.__name__}): {why}") from None


def manifest_url(dataset: str) -> str:
    return storage.join(dataset, MANIFEST)


def manifest_ref(spec: str) -> str | None:
    """Where the manifest of a shard spec is (reader.resolve_shards' forms): ``{dataset}/manifest.json`` for a dataset
    folder or URL prefix; None for the forms that name tars rather than a dataset — a glob, a brace pattern, a comma
    list, one ``.tar`` — which have no manifest. Whether the file exists is the caller's question."""
    s = str(spec).strip()
    if not s or any(c in s for c in ",{*?[") or s.endswith(".tar"):
        return None
    return manifest_url(s)


def read_manifest(dataset: str) -> tuple[Manifest, str]:
    """(manifest, sha256 of its bytes) of a built dataset folder / prefix; UserError when it is missing or invalid."""
    url = manifest_url(dataset)
    if not storage.exists(url):
        raise UserError(f"{dataset} has no {MANIFEST}: not a built dataset, or its build has not finished")
    raw = storage.read_bytes(url)
    return _parse(Manifest, url, raw), hashlib.sha256(raw).hexdigest()


def write_manifest(dataset: str, manifest: Manifest) -> None:
    """The commit point of a build: written last, atomically."""
    storage.write_bytes(manifest_url(dataset), manifest.to_bytes())
