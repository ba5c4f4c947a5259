"""Shard writing per the DESIGN.md contract: `{prefix}-{000000}.tar` with `{key}.hr.png`, `{key}.lr.png`,
`{key}.json`, plus `{prefix}-{000000}.stats.json`.

Tars are written with fixed member metadata (mtime 0, uid/gid 0, mode 0644, sorted member order per sample) so the
same samples give byte-identical shards; a shard is written to a temporary name and renamed when complete
(stats first, then the tar: a tar under its final name implies its stats exist).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile

import cv2
import fsspec
import numpy as np


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def stats_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.stats.json"


_PNG_STRATEGY = {"default": cv2.IMWRITE_PNG_STRATEGY_DEFAULT, "filtered": cv2.IMWRITE_PNG_STRATEGY_FILTERED,
                 "huffman_only": cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY, "rle": cv2.IMWRITE_PNG_STRATEGY_RLE,
                 "fixed": cv2.IMWRITE_PNG_STRATEGY_FIXED}
_PNG_FILTER = {"none": cv2.IMWRITE_PNG_FILTER_NONE, "sub": cv2.IMWRITE_PNG_FILTER_SUB,
               "up": cv2.IMWRITE_PNG_FILTER_UP, "avg": cv2.IMWRITE_PNG_FILTER_AVG,
               "paeth": cv2.IMWRITE_PNG_FILTER_PAETH, "fast": cv2.IMWRITE_PNG_FAST_FILTERS,
               "all": cv2.IMWRITE_PNG_ALL_FILTERS}


def encode_png(rgb: np.ndarray, level: int, strategy: str = "rle", filt: str = "paeth") -> bytes:
    """Deterministic PNG of an RGB uint8 image via OpenCV/libpng. On 512-px photos zlib level 1 + RLE strategy +
    Paeth filter encodes ~2x faster than the default filters and ~9 % smaller."""
    params = [cv2.IMWRITE_PNG_COMPRESSION, int(level), cv2.IMWRITE_PNG_STRATEGY, _PNG_STRATEGY[strategy],
              cv2.IMWRITE_PNG_FILTER, _PNG_FILTER[filt]]
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


class TarWriter:
    """Writes members with fixed metadata into an in-memory/temporary tar; `commit` renames it into place."""

    def __init__(self, final_url: str):
        self.final_url = final_url
        if is_local(final_url):
            d = os.path.dirname(local_path(final_url)) or "."
            fd, self.tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".tar", dir=d)
            os.close(fd)
        else:
            fd, self.tmp = tempfile.mkstemp(suffix=".tar")
            os.close(fd)
        self.f = open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.f, mode="w", format=tarfile.USTAR_FORMAT)
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def add(self, name: str, data: bytes) -> None:
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        ti.mtime = 0
        ti.mode = 0o644
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        ti.type = tarfile.REGTYPE
        self.tar.addfile(ti, io.BytesIO(data))

    def finish(self) -> tuple[int, str]:
        """Close and fsync the temporary tar; returns (bytes, sha256). Call `publish` to rename it into place."""
        self.tar.close()
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        sha = hashlib.sha256()
        with open(self.tmp, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
        return os.path.getsize(self.tmp), sha.hexdigest()

    def publish(self) -> None:
        if is_local(self.final_url):
            os.replace(self.tmp, local_path(self.final_url))
        else:
            fs, path = fsspec.core.url_to_fs(self.final_url)
            fs.put_file(self.tmp, path)
            os.unlink(self.tmp)

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)


def write_json_atomic(url: str, obj) -> None:
    data = json.dumps(obj, indent=1, sort_keys=True).encode()
    if is_local(url):
        p = local_path(url)
        tmp = f"{os.path.dirname(p) or '.'}/.tmp-{os.path.basename(p)}.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    else:
        with fsspec.open(url, "wb") as f:
            f.write(data)


def read_json(url: str):
    with fsspec.open(url, "rb") as f:
        return json.loads(f.read())


def exists(url: str) -> bool:
    if is_local(url):
        return os.path.exists(local_path(url))
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def remove_stale_temporaries(out_dir: str) -> int:
    """Delete `.tmp-*` files left by a killed run (local outputs)."""
    if not is_local(out_dir):
        return 0
    d = local_path(out_dir)
    n = 0
    for name in os.listdir(d):
        if name.startswith(".tmp-"):
            os.unlink(os.path.join(d, name))
            n += 1
    return n
