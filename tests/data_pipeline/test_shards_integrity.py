"""The shard reader trusts nothing it reads (issue 28, findings 7, 8, 9; data_pipeline/shards/, docs/SECURITY.md).

* Every shard read through a manifest is checked against it: by size when resolved, by sha256 as it streams. A zeroed
  sha256, a shard swapped for another and a same-size byte flip are each refused with one line naming the shard.
* Manifest shard names are plain relative names inside the dataset: ``../outside/secret.tar``, ``/etc/hostname``,
  URLs and the like are refused by the typed manifest, so by training and ``varsr data verify`` alike.
* A member whose PNG header declares more pixels than a sample may hold is refused from its header (ingestion's own
  check), never decoded: its sample is skipped, counted and reported.

The datasets are written with the shard contract's own writer (``TarWriter`` + ``write_manifest``), no Ray needed.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.shards import (
    BatchStream,
    Counts,
    Manifest,
    ShardEntry,
    TarWriter,
    encode_png,
    read_manifest,
    resolve_shards,
    shard_name,
    write_manifest,
)
from data_pipeline.shards.format import MemberTooLarge, decode_png
from data_pipeline.shards.reader import ShardIntegrityError
from infra.core.errors import UserError

SIZE, SCALE = 16, 4
VARSR = str(Path(sys.executable).parent / "varsr")


def _dataset(root: Path, samples=(3, 9), members: dict | None = None) -> Path:
    """A built dataset folder: one shard per entry of ``samples`` (that many samples each; different counts give
    different sizes), and its manifest. ``members``: {(shard, sample): {ext: bytes}} to replace members."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, n in enumerate(samples):
        name = shard_name("shard", i)
        w = TarWriter(str(root / name))
        for j in range(n):
            hr = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            m = {
                "hr.png": encode_png(hr, 1),
                "json": json.dumps({"label": 0, "class_id": j % 2}).encode(),
                "lr.png": encode_png(np.ascontiguousarray(hr[::SCALE, ::SCALE]), 1),
            }
            m.update((members or {}).get((i, j), {}))
            for ext in ("hr.png", "json", "lr.png"):
                w.add(f"s{i}_{j:03d}.{ext}", m[ext])
        size, sha = w.finish()
        w.publish()
        entries.append(ShardEntry(name=name, samples=n, bytes=size, sha256=sha))
    total = sum(samples)
    write_manifest(
        str(root),
        Manifest(
            pipeline_version="test",
            config_hash="test",
            config={},
            counts=Counts(
                inputs=total,
                kept=total,
                rejected=0,
                failed=0,
                rejected_by_reason={},
                failed_by_reason={},
                samples=total,
                labels={"0": total},
                classes=2,
            ),
            hr_size=SIZE,
            lr_size=SIZE // SCALE,
            scale=SCALE,
            lr_variants=1,
            shards=entries,
        ),
    )
    return root


def _edit_manifest(root: Path, edit) -> None:
    m = json.loads((root / "manifest.json").read_text())
    edit(m)
    (root / "manifest.json").write_text(json.dumps(m))


def _read_all(root: Path, workers: int = 0) -> tuple[int, int]:
    """(samples, bad samples) of one epoch of the dataset through the training reader (batches of one)."""
    stream = BatchStream(
        resolve_shards(str(root)),
        size=SIZE,
        want_lr=True,
        batch_size=1,
        workers=workers,
        seed=0,
        rank=0,
        world=1,
        shuffle_buffer=1,
    )
    n = bad = 0
    for b in stream._epoch_batches(0):
        n += len(b["key"])
        bad += int(b["bad"])
    return n, bad


# ---- finding 7: verify what is read ------------------------------------------------------------------------------
def test_an_intact_dataset_reads_whole(tmp_path):
    root = _dataset(tmp_path / "ds")
    assert _read_all(root) == (12, 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_zeroed_sha256_is_refused_as_the_shard_streams(tmp_path, workers):
    root = _dataset(tmp_path / "ds")
    _edit_manifest(root, lambda m: m["shards"][1].update(sha256="0" * 64))
    resolve_shards(str(root))  # the sizes still agree: the cheap check at start passes
    with pytest.raises(ShardIntegrityError) as e:
        _read_all(root, workers)
    msg = str(e.value)
    assert "\n" not in msg and "shard-000001.tar" in msg and "sha256" in msg and "varsr data verify" in msg, msg


@pytest.mark.slow
def test_a_shard_swapped_for_another_is_refused_at_start(tmp_path):
    root = _dataset(tmp_path / "ds")
    shutil.copyfile(root / "shard-000001.tar", root / "shard-000000.tar")  # another shard's bytes, another size
    with pytest.raises(ShardIntegrityError, match=r"shard-000000\.tar: \d+ bytes where the manifest records"):
        resolve_shards(str(root))


@pytest.mark.slow
def test_a_same_size_swap_is_refused_as_the_shard_streams(tmp_path):
    """Two shards of equal size (tar records pad them alike) swapped: the size check cannot see it, the hash does."""
    root = _dataset(tmp_path / "ds", samples=(3, 3))
    a, b = (root / "shard-000000.tar").read_bytes(), (root / "shard-000001.tar").read_bytes()
    assert len(a) == len(b) and a != b
    (root / "shard-000000.tar").write_bytes(b)
    (root / "shard-000001.tar").write_bytes(a)
    with pytest.raises(ShardIntegrityError, match=r"shard-00000[01]\.tar: sha256 "):
        _read_all(root)


@pytest.mark.slow
def test_a_flipped_byte_inside_a_member_is_refused(tmp_path):
    root = _dataset(tmp_path / "ds")
    data = bytearray((root / "shard-000000.tar").read_bytes())
    data[600] ^= 0xFF  # inside the first member's data (its header is the first 512 bytes)
    (root / "shard-000000.tar").write_bytes(bytes(data))
    with pytest.raises(ShardIntegrityError, match=r"shard-000000\.tar: sha256 "):
        _read_all(root)


def test_evaluation_pairs_are_verified_too(tmp_path):
    from data_pipeline.shards import eval_pairs

    root = _dataset(tmp_path / "ds")
    assert len(eval_pairs(str(root))) == 12
    _edit_manifest(root, lambda m: m["shards"][0].update(sha256="0" * 64))
    with pytest.raises(ShardIntegrityError, match="shard-000000.tar"):
        eval_pairs(str(root))


# ---- finding 8: names stay inside the dataset --------------------------------------------------------------------
HOSTILE_NAMES = [
    "../outside/secret.tar",
    "/etc/hostname",
    "s3://bucket/other/shard-000000.tar",
    "file:///etc/passwd.tar",
    "~/shard.tar",
    "sub/../../secret.tar",
    "C:\\shard.tar",
    "manifest.json",
    "shard-000000.tar\n",
    "",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_manifest_name_outside_the_dataset_is_refused(tmp_path, name):
    root = _dataset(tmp_path / "ds")
    (tmp_path / "outside").mkdir()
    shutil.copyfile(root / "shard-000000.tar", tmp_path / "outside" / "secret.tar")
    _edit_manifest(root, lambda m: m["shards"][0].update(name=name))
    with pytest.raises(UserError) as e:
        resolve_shards(str(root))
    assert "\n" not in str(e.value) and "not a plain relative name inside the dataset" in str(e.value), str(e.value)


def test_a_token_cache_name_outside_the_dataset_is_refused(tmp_path):
    root = _dataset(tmp_path / "ds")
    _edit_manifest(
        root,
        lambda m: m.update(
            tokens={
                "tokenizer_sha256": "a" * 64,
                "patch_nums": [1],
                "device": "",
                "shards": [{"name": "/etc/hostname", "samples": 3, "bytes": 1, "sha256": "0" * 64}],
            }
        ),
    )
    with pytest.raises(UserError, match="not a plain relative name"):
        read_manifest(str(root))


def test_plain_relative_names_still_read(tmp_path):
    root = _dataset(tmp_path / "ds")
    (root / "sub").mkdir()
    shutil.move(root / "shard-000001.tar", root / "sub" / "shard-000001.tar")
    _edit_manifest(root, lambda m: m["shards"][1].update(name="sub/shard-000001.tar"))
    assert _read_all(root) == (12, 0)


@pytest.mark.slow
def test_varsr_data_verify_refuses_a_name_outside_the_dataset(tmp_path):
    root = _dataset(tmp_path / "ds")
    _edit_manifest(root, lambda m: m["shards"][0].update(name="../outside/secret.tar"))
    r = subprocess.run([VARSR, "data", "verify", str(root)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "../outside/secret.tar" in lines[0] and "not a plain relative name" in lines[0], lines


# ---- finding 9: pixel limit before decoding ------------------------------------------------------------------------
def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares ``width`` x ``height`` RGB, followed by a few rows of zlib data (truncated)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * width) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decode_png_refuses_a_huge_header_without_decoding():
    bomb = _png_claiming(30000, 30000)
    assert len(bomb) < 10_000
    with pytest.raises(MemberTooLarge, match="30000x30000"):
        decode_png(bomb)
    with pytest.raises(MemberTooLarge, match="17x16 = 272 pixels, over the limit of 256"):
        decode_png(_png_claiming(17, 16), max_pixels=16 * 16)


def test_a_member_declaring_30000x30000_is_skipped_undecoded(tmp_path, monkeypatch, caplog):
    import data_pipeline.shards.format as fmt

    bomb = _png_claiming(30000, 30000)
    root = _dataset(tmp_path / "ds", members={(0, 1): {"hr.png": bomb}, (1, 4): {"lr.png": bomb}})
    seen: list[int] = []
    real = fmt.cv2.imdecode

    def spy(buf, flags):  # records what reaches OpenCV; never lets the bomb itself allocate its 2.7 GB
        seen.append(len(buf))
        return None if len(buf) == len(bomb) else real(buf, flags)

    monkeypatch.setattr(fmt.cv2, "imdecode", spy)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.shards.reader"):
        n, bad = _read_all(root)
    assert (n, bad) == (10, 2)  # both samples skipped and counted, the rest read
    assert seen and len(bomb) not in seen  # the bomb never reached the decoder
    assert sum("30000x30000" in r.getMessage() for r in caplog.records) == 2  # each reported
