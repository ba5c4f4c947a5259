"""End-to-end build on a real corpus with a real Ray runtime: accounting, contract, determinism, reader, CLI."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import data_pipeline as dp
from data_pipeline.degrade import apply_degradation
from data_pipeline.reader import make_dataset, make_loader
from data_pipeline.sample_corpus import write_sample_corpus
from data_pipeline.shards import decode_png

CONTRACT_FIELDS = {"key", "source_uri", "sha256", "original_size", "label", "class_id", "scores", "crop",
                   "hr_size", "lr_size", "scale", "variant", "degradation", "pipeline_version", "config_hash"}


class MeanBrightness(torch.nn.Module):
    """A stand-in learned IQA model exported to TorchScript, to exercise the plug-in path."""

    def forward(self, x):
        return x.mean(dim=(1, 2, 3))


def _config(weights_dir: Path):
    return dp.load_build_config(None, ["shard.crop_size=64", "shard.max_samples_per_shard=4", "select.cluster.k=4",
                                 f"score.weights_dir={weights_dir}", "score.batch_size=4"])


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("build")
    info = write_sample_corpus(root / "corpus")
    (root / "iqa").mkdir()
    torch.jit.script(MeanBrightness()).save(str(root / "iqa" / "musiq.pt"))
    cfg = _config(root / "iqa")
    summary = dp.build(str(root / "corpus"), str(root / "out"), cfg)
    return root, info, cfg, summary


def _samples(out: Path):
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as t:
            members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
        keys = sorted({n.split(".", 1)[0] for n in members})
        for k in keys:
            yield tar.name, k, members[f"{k}.hr.png"], members[f"{k}.lr.png"], json.loads(members[f"{k}.json"])


def test_counts_add_up_and_every_bad_file_has_its_reason(built):
    root, info, cfg, summary = built
    out = root / "out"
    m = json.loads((out / "manifest.json").read_text())
    c = m["counts"]
    assert c["inputs"] == len(info) == summary["inputs"]
    assert c["kept"] + c["rejected"] + c["failed"] == c["inputs"]
    rej = pd.read_parquet(out / "rejected.parquet")
    assert len(rej) == c["rejected"] + c["failed"] and rej.uri.is_unique
    by_name = {os.path.relpath(u, root / "corpus"): (s, r) for u, s, r in zip(rej.uri, rej.status, rej.reason)}
    for name, v in info.items():
        if v["expect"] != "ok":
            assert by_name[name] == tuple(v["expect"].split(":")), name
    assert by_name["photos/astronaut_copy.png"] == ("rejected", "duplicate_exact")
    assert by_name["photos/astronaut_q85.jpg"] == ("rejected", "duplicate_near")
    assert c["samples"] == c["kept"] == sum(s["samples"] for s in m["shards"])
    assert sum(c["labels"].values()) == c["samples"] and c["labels"].get("1", 0) >= 1
    assert 1 <= c["classes"] <= 4
    sel = pd.read_parquet(out / "selection.parquet")
    assert len(sel) == c["kept"] and "iqa_musiq" in sel.columns                # plug-in with weights ran
    assert not any(col in sel.columns for col in ("iqa_clipiqa", "iqa_maniqa", "iqa_aesthetic"))  # skipped
    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) == len(info) and set(scores.status) == {"ok", "rejected", "failed"}


def test_shards_follow_the_contract_and_params_reproduce_the_lr(built):
    root, info, cfg, _ = built
    out = root / "out"
    m = json.loads((out / "manifest.json").read_text())
    for sh in m["shards"]:
        p = out / sh["name"]
        assert hashlib.sha256(p.read_bytes()).hexdigest() == sh["sha256"] and p.stat().st_size == sh["bytes"]
        stats = json.loads((out / sh["name"].replace(".tar", ".stats.json")).read_text())
        assert stats["samples"] == sh["samples"] and stats["sha256"] == sh["sha256"]
    assert not list(out.glob(".tmp-*"))
    n = 0
    for _, key, hr_png, lr_png, meta in _samples(out):
        n += 1
        assert CONTRACT_FIELDS <= set(meta) and meta["key"] == key
        assert meta["config_hash"] == cfg.config_hash() and meta["degradation"]["preset"] == "varsr-mild"
        hr, lr = decode_png(hr_png), decode_png(lr_png)
        assert hr.shape == (64, 64, 3) and lr.shape == (16, 16, 3)
        np.testing.assert_array_equal(apply_degradation(hr, meta["degradation"]["params"]), lr)
        assert "iqa_musiq" in meta["scores"] and "sharpness" in meta["scores"]
    assert n == m["counts"]["samples"]


def test_same_config_gives_byte_identical_shards(built, tmp_path):
    root, _, cfg, _ = built
    dp.build(str(root / "corpus"), str(tmp_path / "again"), cfg, print_summary=False)
    names = sorted(p.name for p in (root / "out").iterdir() if p.suffix == ".tar" or p.name.endswith(".stats.json"))
    names.append("manifest.json")
    assert len(names) > 3
    for name in names:
        assert (root / "out" / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_reader_yields_every_sample_once_across_2_nodes_x_2_workers(built):
    root = built[0]
    out = root / "out"
    all_keys = sorted(k for _, k, *_ in _samples(out))
    seen = []
    for rank in range(2):
        loader = make_loader(out, batch_size=2, num_workers=2, shuffle=8, world_size=2, rank=rank, seed=3)
        for batch in loader:
            assert batch["hr"].shape[1:] == (3, 64, 64) and batch["lr"].shape == batch["hr"].shape
            assert batch["hr"].dtype == torch.float32 and 0 <= batch["lr"].min() and batch["lr"].max() <= 1
            assert batch["label"].dtype == torch.long and batch["class_id"].dtype == torch.long
            seen.extend(batch["key"])
    assert sorted(seen) == all_keys


def test_reader_options_and_clear_errors(built):
    out = built[0] / "out"
    n_shards = len(json.loads((out / "manifest.json").read_text())["shards"])
    s = next(iter(make_dataset(out, shuffle=0, hr_size=32, crop="center", keep_lr_lowres=True)))
    assert s["hr"].shape == (3, 32, 32) and s["lr"].shape == (3, 32, 32) and s["lr_lowres"].shape == (3, 8, 8)
    assert set(s) >= {"hr", "lr", "label", "class_id", "key"} and isinstance(s["key"], str)
    s = next(iter(make_dataset(out, shuffle=0, lr_upsample="none", lr_size=16)))
    assert s["lr"].shape == (3, 16, 16)
    for mode in ("bicubic", "bilinear", "area", "random"):
        assert next(iter(make_dataset(out, shuffle=0, lr_upsample=mode)))["lr"].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="cannot feed"):
        make_dataset(out, 2, world_size=n_shards, rank=0, num_workers=2)
    with pytest.raises(ValueError, match="lr_size"):
        next(iter(make_dataset(out, shuffle=0, lr_size=32)))
    rs = list(make_dataset(out, shuffle=0, resampled=True, epoch_samples=7, world_size=4, rank=3))
    assert len(rs) == 7                                               # resampling ignores the coverage rule


def test_cli_inspect_and_verify(built):
    out = built[0] / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(dp.__file__).parent.parent)}
    r = subprocess.run([sys.executable, "-m", "infra.cli", "data", "verify", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ok"] is True


def test_select_reruns_without_rescoring(built, tmp_path):
    root, _, cfg, _ = built
    out = root / "out"
    assert dp.score(str(root / "corpus"), str(out), cfg)["reused"] is True
    cfg2 = dp.load_build_config(cfg, ["select.negatives.rule=percentile", "select.negatives.percentile=50",
                                "select.negatives.max_fraction=1.0", "select.score_min.sharpness=100",
                                "select.cluster.k=2"])
    r = dp.select(str(out / "scores.parquet"), str(tmp_path), cfg2)
    sel = pd.read_parquet(tmp_path / "selection.parquet")
    rej = pd.read_parquet(tmp_path / "rejected.parquet")
    assert len(sel) == r["selected"] and (sel.sharpness >= 100).all() and set(sel.class_id) <= {0, 1}
    assert (rej.reason == "score_below:sharpness").sum() >= 1
    assert sel.label.sum() == (sel.quality <= np.percentile(sel.quality, 50)).sum()
    assert len(sel) + len(rej) == len(pd.read_parquet(out / "scores.parquet"))


def test_cli_register_adds_data_subcommands():
    import argparse
    from data_pipeline.cli import register
    parser = argparse.ArgumentParser(prog="varsr")
    register(parser.add_subparsers(dest="command"))
    a = parser.parse_args(["data", "build", "-i", "src", "-o", "dst", "-c", "tiny", "-s", "seed=3"])
    assert a.data_cmd == "build" and a.overrides == ["seed=3"] and callable(a.func)
    for cmd in (["score", "-i", "a", "-o", "b"], ["select", "--scores", "s", "-o", "b"],
                ["shard", "--selection", "s", "-o", "b"], ["inspect", "d"], ["verify", "d"]):
        assert parser.parse_args(["data", *cmd]).data_cmd == cmd[0]


def test_source_changed_or_missing_at_shard_time_is_recorded(built, tmp_path):
    import shutil
    from data_pipeline.materialise import write_shard
    root, _, cfg, _ = built
    sel = pd.read_parquet(root / "out" / "selection.parquet").head(3).to_dict(orient="records")
    for i, row in enumerate(sel):
        copy = tmp_path / f"src{i}{Path(row['uri']).suffix}"
        shutil.copy(row["uri"], copy)
        row["uri"] = str(copy)
    Path(sel[0]["uri"]).write_bytes(Path(sel[0]["uri"]).read_bytes() + b"x")   # content changed
    Path(sel[1]["uri"]).unlink()                                                # gone
    r = write_shard(0, sel, cfg, str(tmp_path))
    reasons = {f["uri"]: f["reason"] for f in r["stats"]["failed"]}
    assert reasons == {sel[0]["uri"]: "source_changed", sel[1]["uri"]: "read_error"}
    assert r["stats"]["samples"] == 1 and (tmp_path / "shard-000000.tar").exists()


def test_reader_epochs_reshuffle_and_pipeline_pickles(built):
    import pickle
    out = built[0] / "out"
    ds = make_dataset(out, 3, shuffle=16, seed=5)
    pickle.loads(pickle.dumps(ds))                                   # spawn-safe
    keys = lambda: [k for b in ds for k in b["key"]]  # noqa: E731
    ds.set_epoch(0)
    e0 = keys()
    ds.set_epoch(0)
    assert keys() == e0                                              # same epoch, same order
    ds.set_epoch(1)
    e1 = keys()
    assert e1 != e0 and sorted(e1) == sorted(e0)


def test_shard_step_alone_into_another_folder_equals_build(built, tmp_path):
    root, _, cfg, _ = built
    r = dp.shard(str(root / "out" / "selection.parquet"), str(tmp_path), cfg)
    assert r["written"] == r["shards"] and r["skipped"] == 0
    assert (tmp_path / "manifest.json").read_bytes() == (root / "out" / "manifest.json").read_bytes()
    for sh in r["manifest"]["shards"]:
        assert (tmp_path / sh["name"]).read_bytes() == (root / "out" / sh["name"]).read_bytes()
