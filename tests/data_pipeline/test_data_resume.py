"""Resume after a real process kill: SIGKILL the build once its first shard is complete, re-run, and compare
with an uninterrupted run byte for byte."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

import data_pipeline as dp
from data_pipeline.config import save_config

N_IMAGES = 24


def _corpus(d: Path) -> None:
    """24 distinct real-photo crops (160 px) from bundled images."""
    d.mkdir(parents=True)
    photos = [
        skimage.data.retina(),
        skimage.data.hubble_deep_field(),
        skimage.data.astronaut(),
        skimage.data.coffee(),
        skimage.data.rocket(),
        skimage.data.immunohistochemistry(),
    ]
    i = 0
    for p in photos:
        h, w = p.shape[:2]
        for y, x in ((0, 0), (h - 160, w - 160), (h // 2 - 80, w // 2 - 80), (0, w - 160)):
            Image.fromarray(np.ascontiguousarray(p[y : y + 160, x : x + 160])).save(
                d / f"img{i:02d}.png", compress_level=1
            )
            i += 1


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, ray_local):
    _corpus(tmp_path / "corpus")
    cfg = dp.load_build_config(
        None,
        [
            "shard.crop_size=128",
            "shard.max_samples_per_shard=1",
            "shard.lr_variants=2",
            "select.dedup.near=false",
            "select.cluster.k=3",
            "score.batch_size=4",
        ],
    )
    save_config(cfg, tmp_path / "cfg.yaml")
    out = tmp_path / "killed"
    address = ray_local.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(Path(dp.__file__).resolve().parent.parent)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "infra.cli",
            "data",
            "build",
            "-i",
            str(tmp_path / "corpus"),
            "-o",
            str(out),
            "-c",
            str(tmp_path / "cfg.yaml"),
            "--ray-address",
            address,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    first = out / "shard-000000.tar"
    deadline = time.monotonic() + 240
    while not first.exists():
        if proc.poll() is not None:
            raise AssertionError(f"build exited before writing a shard: {proc.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, "no shard appeared"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done_at_kill = sorted(p.name for p in out.glob("shard-*.tar"))
    assert len(done_at_kill) < N_IMAGES and not (out / "manifest.json").exists()

    resumed = dp.build(str(tmp_path / "corpus"), str(out), cfg, print_summary=False)
    assert resumed["shards_skipped"] >= 1 and resumed["shards"] == N_IMAGES
    assert resumed["shards_written"] == N_IMAGES - resumed["shards_skipped"]
    clean = tmp_path / "clean"
    dp.build(str(tmp_path / "corpus"), str(clean), cfg, print_summary=False)
    files = sorted(p.name for p in clean.iterdir() if p.suffix == ".tar" or p.name.endswith(".stats.json"))
    assert len(files) == 2 * N_IMAGES
    for name in files + ["manifest.json", "selection.parquet", "rejected.parquet"]:
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    assert not list(out.glob(".tmp-*"))
