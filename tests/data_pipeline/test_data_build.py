"""End-to-end build on a real corpus with a real Ray runtime: accounting, contract, determinism, reader, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import data_pipeline as dp
from data_pipeline.degrade import apply_degradation
from data_pipeline.sample_corpus import write_sample_corpus
from data_pipeline.shards import BatchStream, ShardStream, collate, decode_png, iter_tar, read_manifest, resolve_shards
from infra.core.errors import UserError

CONTRACT_FIELDS = {
    "key",
    "source_uri",
    "sha256",
    "original_size",
    "label",
    "class_id",
    "scores",
    "crop",
    "hr_size",
    "lr_size",
    "scale",
    "variant",
    "degradation",
    "pipeline_version",
    "config_hash",
}


class MeanBrightness(torch.nn.Module):
    """A stand-in learned IQA model exported to TorchScript, to exercise the plug-in path."""

    def forward(self, x):
        return x.mean(dim=(1, 2, 3))


def _config(weights_dir: Path):
    return dp.load_build_config(
        None,
        [
            "shard.crop_size=64",
            "shard.max_samples_per_shard=4",
            "select.cluster.k=4",
            f"score.weights_dir={weights_dir}",
            "score.batch_size=4",
        ],
    )


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
    assert len(sel) == c["kept"] and "iqa_musiq" in sel.columns  # plug-in with weights ran
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


def _stream(out, **kw):
    args = dict(size=64, want_lr=True, seed=3, epoch=0, rank=0, world=1, split="node", shuffle_buffer=8)
    return ShardStream(resolve_shards(str(out)).urls, **{**args, **kw})


def test_reader_yields_every_sample_once_across_2_nodes_x_2_workers(built):
    root = built[0]
    out = root / "out"
    all_keys = sorted(k for _, k, *_ in _samples(out))
    seen = []
    for rank in range(2):
        loader = torch.utils.data.DataLoader(
            _stream(out, rank=rank, world=2), batch_size=2, num_workers=2, collate_fn=collate
        )
        for batch in loader:
            assert batch["hr"].shape[1:] == (3, 64, 64) and batch["lr"].shape == batch["hr"].shape
            assert batch["hr"].dtype == torch.float32 and 0 <= batch["lr"].min() and batch["lr"].max() <= 1
            assert batch["label"].dtype == torch.long and batch["class_id"].dtype == torch.long
            seen.extend(batch["key"])
    assert sorted(seen) == all_keys


def test_reader_options_and_clear_errors(built, tmp_path):
    out = built[0] / "out"
    shards = resolve_shards(str(out))
    manifest, sha = read_manifest(str(out))
    assert shards.manifest_sha256 == sha == hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    assert shards.num_samples == manifest.counts.samples and shards.hr_size == 64
    for mode in ("pil_bicubic", "bicubic", "bilinear", "area", "random"):
        s = next(iter(_stream(out, lr_mode=mode, shuffle_buffer=0)))
        assert s["lr"].shape == (3, 64, 64) and s["lr_mode"] in (mode, "area", "bilinear", "bicubic")
    modes = {s["lr_mode"] for s in _stream(out, lr_mode="random", shuffle_buffer=0)}
    assert modes == {"area", "bilinear", "bicubic"}  # one interpolation drawn per sample
    with pytest.raises(UserError, match="cannot feed"):
        next(iter(_stream(out, world=len(shards.urls) + 1)))
    wrong_size = BatchStream(shards, size=32, want_lr=True, batch_size=2, workers=0, seed=0, rank=0, world=1)
    with pytest.raises(UserError, match="no complete batch"):  # every sample is counted bad, none fit
        next(iter(wrong_size))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither manifest.json nor .tar"):
        resolve_shards(str(tmp_path / "empty"))
    import shutil

    shutil.copytree(out, tmp_path / "broken")
    os.unlink(tmp_path / "broken" / manifest.shards[0].name)
    with pytest.raises(UserError, match="missing shard"):
        resolve_shards(str(tmp_path / "broken"))


def test_reader_streams_from_an_fsspec_url(built):
    """The same reader over fsspec's in-memory file system: shards are streamed through the storage layer."""
    import fsspec

    out = built[0] / "out"
    fs = fsspec.filesystem("memory")
    for p in out.iterdir():
        if p.suffix in (".tar", ".json"):
            fs.pipe(f"/ds/{p.name}", p.read_bytes())
    local = sorted(k for url in resolve_shards(str(out)).urls for k in (s["__key__"] for s in iter_tar(url)))
    remote = resolve_shards("memory://ds")
    assert remote.manifest_sha256 == resolve_shards(str(out)).manifest_sha256
    assert (
        sorted(s["key"] for s in ShardStream(remote.urls, size=64, want_lr=True, seed=0, epoch=0, rank=0, world=1))
        == local
    )


def test_source_changed_or_missing_at_shard_time_is_recorded(built, tmp_path):
    import shutil

    from data_pipeline.materialise import write_shard

    root, _, cfg, _ = built
    sel = pd.read_parquet(root / "out" / "selection.parquet").head(3).to_dict(orient="records")
    for i, row in enumerate(sel):
        copy = tmp_path / f"src{i}{Path(row['uri']).suffix}"
        shutil.copy(row["uri"], copy)
        row["uri"] = str(copy)
    Path(sel[0]["uri"]).write_bytes(Path(sel[0]["uri"]).read_bytes() + b"x")  # content changed
    Path(sel[1]["uri"]).unlink()  # gone
    r = write_shard(0, sel, cfg, str(tmp_path))
    reasons = {f["uri"]: f["reason"] for f in r["stats"]["failed"]}
    assert reasons == {sel[0]["uri"]: "source_changed", sel[1]["uri"]: "read_error"}
    assert r["stats"]["samples"] == 1 and (tmp_path / "shard-000000.tar").exists()


def test_reader_epochs_reshuffle_and_stream_pickles(built):
    import pickle

    out = built[0] / "out"
    keys = lambda e: [s["key"] for s in pickle.loads(pickle.dumps(_stream(out, epoch=e, shuffle_buffer=16)))]  # noqa: E731
    e0 = keys(0)
    assert keys(0) == e0  # same epoch, same order (spawn-safe copy)
    e1 = keys(1)
    assert e1 != e0 and sorted(e1) == sorted(e0)


def test_shard_step_alone_into_another_folder_equals_build(built, tmp_path):
    root, _, cfg, _ = built
    r = dp.shard(str(root / "out" / "selection.parquet"), str(tmp_path), cfg)
    assert r["written"] == r["shards"] and r["skipped"] == 0
    assert (tmp_path / "manifest.json").read_bytes() == (root / "out" / "manifest.json").read_bytes()
    for sh in r["manifest"]["shards"]:
        assert (tmp_path / sh["name"]).read_bytes() == (root / "out" / sh["name"]).read_bytes()
