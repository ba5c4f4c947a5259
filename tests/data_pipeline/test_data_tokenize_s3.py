"""`varsr data tokenize` on an object store: the same dataset tokenised under s3:// (moto's S3 server on loopback)
and in a local folder gives byte-identical token shards and manifests, training's reader streams the cache from
s3://, and a re-run there keeps every shard."""

from __future__ import annotations

import shutil

import pytest
import torch

import data_pipeline as dp
from data_pipeline.sample_corpus import write_sample_corpus
from data_pipeline.shards import BatchStream, read_manifest, resolve_shards
from data_pipeline.token_cache import TokenizeOptions, tokenize
from infra.core import storage
from model import VARSRConfig, build
from model.checkpoint import open_tokenizer, save_tokenizer


@pytest.fixture
def fresh_ray(s3_env):
    """Ray started after the test's S3 environment is set, so that its workers reach the loopback endpoint."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    yield
    ray.shutdown()


def test_tokenize_under_s3_equals_local(tmp_path, s3_env, s3_bucket, fresh_ray):
    write_sample_corpus(tmp_path / "corpus", with_bad_files=False)
    cfg = dp.load_build_config(
        None,
        [
            "shard.crop_size=64",
            "shard.max_samples_per_shard=4",
            "select.cluster.k=4",
            f"score.weights_dir={tmp_path / 'no-iqa'}",
            "shard.lr_variants=1",
        ],
    )
    local = tmp_path / "local"
    dp.build(str(tmp_path / "corpus"), str(local), cfg, print_summary=False)
    remote = f"s3://{s3_bucket}/datasets/tiny"
    storage.put_tree(local, remote)
    torch.manual_seed(0)
    mcfg = VARSRConfig.preset("tiny")
    vq, _ = build(mcfg)
    ckpt = save_tokenizer(tmp_path / "tok", vq, mcfg)
    remote_ckpt = f"s3://{s3_bucket}/models/tok"
    storage.put_tree(ckpt, remote_ckpt)  # the checkpoint is read from the object store too

    r = tokenize(remote, open_tokenizer(remote_ckpt), TokenizeOptions(batch_size=3))
    shutil.rmtree(ckpt)
    here = tokenize(str(local), open_tokenizer(remote_ckpt), TokenizeOptions(batch_size=2))
    assert r["written"] == here["written"] == r["shards"] > 1 and r["tokenizer_sha256"] == here["tokenizer_sha256"]
    m, _ = read_manifest(remote)
    assert storage.read_bytes(storage.join(remote, "manifest.json")) == (local / "manifest.json").read_bytes()
    for t in m.tokens.shards:
        assert storage.read_bytes(storage.join(remote, t.name)) == (local / t.name).read_bytes()
    assert not [k for k in s3_env.list_keys(s3_bucket, "datasets/") if ".tmp" in k]

    kw = dict(size=64, want_lr=True, batch_size=2, workers=0, seed=0, rank=0, world=1)
    a = next(iter(BatchStream(resolve_shards(remote), tokens=True, **kw)))
    b = next(iter(BatchStream(resolve_shards(str(local)), tokens=True, **kw)))
    assert a["key"] == b["key"] and torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["resid"], b["resid"])

    again = tokenize(remote, open_tokenizer(remote_ckpt))
    assert (again["written"], again["kept"]) == (0, r["shards"]) and again["manifest_sha256"] == r["manifest_sha256"]
