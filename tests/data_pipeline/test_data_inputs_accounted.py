"""Every input is accounted for (issue 28, findings 12-14): a file name that is not UTF-8, a FIFO, a dangling
symlink, a symlink loop, a directory and a PNG named ``photo.txt`` each end kept, rejected with a reason or failed,
in a folder walk and in an input manifest alike, and the build finishes (``data_pipeline/sources.py``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skimage.data
from PIL import Image

import data_pipeline as dp
from data_pipeline import sources
from data_pipeline.config import SourceConfig, save_config
from data_pipeline.scoring import scores_fingerprint
from data_pipeline.sources import list_sources, read_bytes

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs and symlinks")

BUILD_TIMEOUT_S = 240  # a hang (e.g. opening a FIFO) fails the test instead of blocking the suite
BAD_NAME = b"bad\xff.png"  # not valid UTF-8


def _png(d: Path, name: str | bytes, photo: np.ndarray, y: int, x: int) -> None:
    data = _png_bytes(photo[y : y + 96, x : x + 96])
    if isinstance(name, bytes):
        with open(os.path.join(os.fsencode(d), name), "wb") as f:
            f.write(data)
    else:
        (d / name).write_bytes(data)


def _png_bytes(a: np.ndarray) -> bytes:
    import io

    b = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(b, "PNG", compress_level=1)
    return b.getvalue()


# `varsr data ...` exactly as registered by the `varsr` command (data_pipeline/cli.py), without importing the
# other components the full command registers
_CLI = (
    "import argparse, sys; import data_pipeline.cli as c; p = argparse.ArgumentParser(); "
    "c.register(p.add_subparsers(dest='cmd')); a = p.parse_args(); sys.exit(a.func(a))"
)


def _build(inputs: list[str], out: Path, cfg_path: Path, address: str) -> subprocess.CompletedProcess:
    """`varsr data build` as a user runs it, on the session's Ray runtime, killed (whole group) past the timeout."""
    env = {**os.environ, "PYTHONPATH": str(Path(dp.__file__).resolve().parent.parent)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CLI,
            "data",
            "build",
            "-i",
            *inputs,
            "-o",
            str(out),
            "-c",
            str(cfg_path),
            "--ray-address",
            address,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        so, se = proc.communicate(timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"varsr data build {inputs} did not finish within {BUILD_TIMEOUT_S} s (hung on an input?)")
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, so.decode(errors="replace"), se.decode(errors="replace")
    )


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory):
    cfg = dp.load_build_config(
        None,
        [
            "shard.crop_size=64",
            "shard.max_samples_per_shard=4",
            "select.cluster.k=2",
            "select.dedup.near=false",
            "score.batch_size=4",
        ],
    )
    p = tmp_path_factory.mktemp("cfg") / "cfg.yaml"
    save_config(cfg, p)
    return p


def _accounting(out: Path) -> tuple[dict, dict[str, tuple[str, str]], set[str]]:
    import json

    counts = json.loads((out / "manifest.json").read_text())["counts"]
    rej = pd.read_parquet(out / "rejected.parquet")
    rejected = {u: (s, r) for u, s, r in zip(rej.uri, rej.status, rej.reason)}
    kept = set(pd.read_parquet(out / "selection.parquet").uri)
    assert len(rejected) == len(rej), "an input appears twice in rejected.parquet"
    assert counts["kept"] == len(kept) and counts["rejected"] + counts["failed"] == len(rej)
    assert counts["kept"] + counts["rejected"] + counts["failed"] == counts["inputs"]
    assert not kept & set(rejected)
    return counts, rejected, kept


def test_folder_walk_accounts_for_odd_names_symlinks_fifos_and_extensions(tmp_path, ray_local, cfg_path):
    d = tmp_path / "inp"
    d.mkdir()
    photo = skimage.data.astronaut()
    _png(d, "a.png", photo, 0, 0)
    _png(d, "b.png", photo, 200, 200)
    _png(d, BAD_NAME, photo, 400, 100)  # (12) a name that is not valid UTF-8
    os.mkfifo(d / "pipe.png")  # (13) folder walks must not open it either
    os.symlink(d / "nowhere.png", d / "dangling.png")  # (14) dangling symlink
    os.symlink(d / "loop2.png", d / "loop1.png")  # (14) symlink loop
    os.symlink(d / "loop1.png", d / "loop2.png")
    _png(d, "photo.txt", photo, 300, 300)  # (14) a PNG behind a non-image extension
    (d / ".hidden.png").write_bytes((d / "a.png").read_bytes())
    (d / "sub").mkdir()
    os.symlink(d, d / "sub" / "up")  # a directory symlink back up: not followed
    out = tmp_path / "out"
    r = _build([str(d)], out, cfg_path, ray_local.get_runtime_context().gcs_address)
    assert r.returncode == 0, r.stderr[-3000:]
    counts, rejected, kept = _accounting(out)
    met = {
        "a.png",
        "b.png",
        "bad\\xff.png",
        "pipe.png",
        "dangling.png",
        "loop1.png",
        "loop2.png",
        "photo.txt",
        ".hidden.png",
        "sub/up",
    }
    assert counts["inputs"] == len(met)
    assert {os.path.relpath(u, d) for u in set(rejected) | kept} == met
    by_name = {os.path.relpath(u, d): v for u, v in rejected.items()}
    assert kept == {str(d / "a.png"), str(d / "b.png")}
    assert by_name == {
        "bad\\xff.png": ("rejected", "name_not_utf8"),
        "pipe.png": ("rejected", "not_regular_file"),
        "dangling.png": ("rejected", "dangling_symlink"),
        "loop1.png": ("rejected", "symlink_loop"),
        "loop2.png": ("rejected", "symlink_loop"),
        "photo.txt": ("rejected", "extension"),
        ".hidden.png": ("rejected", "hidden"),
        "sub/up": ("rejected", "not_regular_file"),
    }
    err = pd.read_parquet(out / "rejected.parquet").set_index("uri").error
    assert "FIFO" in err[str(d / "pipe.png")] and "directory" in err[str(d / "sub" / "up")]
    assert "bad\\xff.png" in err[str(d / "bad\\xff.png")]  # the error names the file, escapes shown


def test_manifest_entries_that_are_not_regular_files_are_rejected_not_opened(tmp_path, ray_local, cfg_path):
    d = tmp_path / "listed"
    d.mkdir()
    photo = skimage.data.coffee()
    _png(d, "c.png", photo, 0, 0)
    _png(d, "photo.txt", photo, 200, 200)  # named by the user: decoded by content, kept
    os.mkfifo(d / "fifo.png")  # (13) would block open() forever
    os.symlink(d / "gone.png", d / "dangling.png")
    os.symlink(d / "loop.png", d / "loop.png")
    (d / "subdir").mkdir()
    names = ["c.png", "photo.txt", "fifo.png", "dangling.png", "loop.png", "subdir", "absent.png"]
    (tmp_path / "inputs.csv").write_text("path\n" + "".join(f"listed/{n}\n" for n in names))
    out = tmp_path / "out"
    r = _build([str(tmp_path / "inputs.csv")], out, cfg_path, ray_local.get_runtime_context().gcs_address)
    assert r.returncode == 0, r.stderr[-3000:]
    counts, rejected, kept = _accounting(out)
    assert counts["inputs"] == len(names)
    assert kept == {str(d / "c.png"), str(d / "photo.txt")}
    by_name = {os.path.relpath(u, d): v for u, v in rejected.items()}
    assert by_name == {
        "fifo.png": ("rejected", "not_regular_file"),
        "dangling.png": ("rejected", "dangling_symlink"),
        "loop.png": ("rejected", "symlink_loop"),
        "subdir": ("rejected", "not_regular_file"),
        "absent.png": ("failed", "read_error"),
    }


def test_read_bytes_refuses_non_regular_files_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    got: list = []
    t = threading.Thread(target=lambda: got.append(_raises(read_bytes, str(tmp_path / "fifo"))), daemon=True)
    t.start()
    t.join(60)
    if t.is_alive():  # unblock the reader so the thread ends, then fail
        fd = os.open(tmp_path / "fifo", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("read_bytes blocked on a FIFO")
    assert isinstance(got[0], sources.NotRegularFile) and got[0].reason == "not_regular_file" and "FIFO" in str(got[0])
    assert isinstance(_raises(read_bytes, str(tmp_path)), sources.NotRegularFile)
    if os.path.exists("/dev/zero"):
        e = _raises(read_bytes, "/dev/zero")
        assert isinstance(e, sources.NotRegularFile) and "device" in str(e)
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/acct/dir/x.png", b"x")
    e = _raises(read_bytes, "memory:///acct/dir")
    assert isinstance(e, sources.NotRegularFile) and "directory" in str(e)
    assert read_bytes("memory:///acct/dir/x.png") == b"x"


def _raises(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - returned for the assertions
        return e
    return None


def test_listing_is_honest_and_the_fingerprint_takes_any_name(tmp_path):
    d = tmp_path / "only_text"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    items = list_sources(d)
    assert [(os.path.basename(i.uri), i.status, i.reason) for i in items] == [("notes.txt", "rejected", "extension")]
    assert list_sources(d, SourceConfig(all_files=True))[0].status == ""  # decoded by content instead
    os.mkfifo(d / "given.png")
    (it,) = list_sources(str(d / "given.png"))  # a path given on its own
    assert (it.status, it.reason) == ("rejected", "not_regular_file")
    with pytest.raises(FileNotFoundError):
        list_sources(str(d / "absent.png"))
    cfg = dp.load_build_config(None, [])
    assert len(scores_fingerprint(["/x/bad\udcff.png", "/x/ok.png"], cfg)) == 16


def test_object_store_listing_accounts_for_every_object(s3_env, s3_bucket):
    """The same accounting on s3:// (moto's S3 server on loopback): objects skipped by name are listed with their
    reason, and reading an object needs no extra type check (object stores hold only objects)."""
    from infra.core import storage

    png = _png_bytes(skimage.data.coffee()[:96, :96])
    for name, data in (("a.png", png), ("notes.txt", b"hello"), (".hidden.png", png), ("sub/b.jpg", png)):
        storage.write_bytes(f"s3://{s3_bucket}/raw/{name}", data)
    items = list_sources(f"s3://{s3_bucket}/raw")
    got = [(i.uri.split("/raw/", 1)[1], i.status, i.reason) for i in items]
    assert got == [
        (".hidden.png", "rejected", "hidden"),
        ("a.png", "", ""),
        ("notes.txt", "rejected", "extension"),
        ("sub/b.jpg", "", ""),
    ]
    assert read_bytes(items[1].uri) == png
