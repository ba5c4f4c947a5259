"""Training checks the shards it reads against their manifest (issue 28, finding 7; data_pipeline/shards/reader.py).

The run records the manifest's sha256 as its lineage, so it must not train on other bytes under that name: a shard
swapped for another is refused at start (size), a zeroed sha256 as the shard streams (hash), each with one line
naming the shard, and the run ends FAILED.
"""

from __future__ import annotations

import json
import shutil

import pytest

from data_pipeline.shards.reader import ShardIntegrityError
from infra.core.config import load_config
from training.config import TrainConfig
from training.trainer import train


def _cfg(tmp_path, shards, name):
    return load_config(
        TrainConfig,
        None,
        [
            "stage=isr",
            f"output_dir={tmp_path / name}",
            f"data.shards={shards}",
            "data.batch_size=4",
            "data.workers=2",
            "data.shuffle_buffer=4",
            "total_steps=30",
            "max_steps=30",
            "tracking.enabled=false",
            "validation.num_images=1",
            "validation.batches=1",
            "seed=3",
        ],
    )


def _copy(shards, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(shards, ds)
    m = json.loads((ds / "manifest.json").read_text())
    return ds, m


def test_a_zeroed_sha256_stops_the_run_naming_the_shard(shards, tmp_path, dist_port):
    ds, m = _copy(shards, tmp_path)
    victim = next(e for e in m["shards"] if e["samples"] > 0)
    victim["sha256"] = "0" * 64
    (ds / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardIntegrityError) as e:
        train(_cfg(tmp_path, ds, "run"))
    msg = str(e.value)
    assert "\n" not in msg and victim["name"] in msg and "sha256" in msg, msg
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "FAILED"


def test_a_shard_swapped_for_another_is_refused_at_start(shards, tmp_path, dist_port):
    ds, m = _copy(shards, tmp_path)
    a, b = next(
        (x, y) for x in m["shards"] for y in m["shards"] if x["samples"] and y["samples"] and x["bytes"] != y["bytes"]
    )
    shutil.copyfile(ds / b["name"], ds / a["name"])
    with pytest.raises(ShardIntegrityError, match=rf"{a['name']}: \d+ bytes where the manifest records"):
        train(_cfg(tmp_path, ds, "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
