"""A worker node that dies while `varsr data tokenize` runs costs only its in-flight shards: Ray retries them on
another node and the result equals an uninterrupted run byte for byte. A multi-node Ray cluster on this machine
(Ray's own test cluster: a head with 0 CPUs and worker nodes), a node killed without warning."""

from __future__ import annotations

import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import data_pipeline as dp
from data_pipeline.sample_corpus import write_sample_corpus
from data_pipeline.shards import read_manifest
from data_pipeline.token_cache import TokenizeOptions, tokenize
from model import VARSRConfig, build
from model.checkpoint import open_tokenizer, save_tokenizer


class SlowTokenizer:
    """The real frozen tokenizer, slowed down so that a node can be killed while its task is in flight."""

    def __init__(self, tok, delay_s: float):
        self.tok, self.delay_s = tok, delay_s
        self.sha256, self.patch_nums, self.image_size = tok.sha256, tok.patch_nums, tok.image_size

    def to(self, device):
        self.tok.to(device)
        return self

    def __call__(self, hr):
        time.sleep(self.delay_s)
        return self.tok(hr)


@pytest.fixture
def cluster():
    import ray
    import ray.cloudpickle
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 150 * 1024**2})
    node = c.add_node(num_cpus=2, object_store_memory=100 * 1024**2)
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c, node
    ray.shutdown()
    c.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
def test_a_node_killed_mid_job_costs_only_its_shards(tmp_path, cluster):
    c, node = cluster
    write_sample_corpus(tmp_path / "corpus", with_bad_files=False)
    cfg = dp.load_build_config(
        None,
        [
            "shard.crop_size=64",
            "shard.max_samples_per_shard=2",
            "select.cluster.k=4",
            f"score.weights_dir={tmp_path / 'no-iqa'}",
            "shard.lr_variants=1",
        ],
    )
    dp.build(str(tmp_path / "corpus"), str(tmp_path / "pristine"), cfg, print_summary=False)
    torch.manual_seed(0)
    mcfg = VARSRConfig.preset("tiny")
    tok = open_tokenizer(str(save_tokenizer(tmp_path / "tok", build(mcfg)[0], mcfg)))
    ref, hit = tmp_path / "ref", tmp_path / "hit"
    shutil.copytree(tmp_path / "pristine", ref)
    shutil.copytree(tmp_path / "pristine", hit)
    tokenize(str(ref), tok, TokenizeOptions(batch_size=2))

    result: dict = {}
    job = threading.Thread(
        target=lambda: result.update(tokenize(str(hit), SlowTokenizer(tok, 1.0), TokenizeOptions(batch_size=1)))
    )
    job.start()
    deadline = time.monotonic() + 120
    while not list(hit.glob(".tmp-*.tar")):  # a task has opened its token shard: it is in flight on that node
        assert time.monotonic() < deadline and job.is_alive(), "no tokenise task started"
        time.sleep(0.05)
    c.remove_node(node, allow_graceful=False)
    c.add_node(num_cpus=2, object_store_memory=100 * 1024**2)
    job.join(timeout=300)
    assert not job.is_alive() and result, "the job did not finish after the node died"
    assert result["written"] == result["shards"] > 2
    names = [t.name for t in read_manifest(str(ref))[0].tokens.shards]
    assert (hit / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()
    for n in names:
        assert (hit / n).read_bytes() == (ref / n).read_bytes()
    # the killed task's temporary is all that is left of it (so it was in flight); the next run removes it
    assert list(hit.glob(".tmp-*.tar"))
    again = tokenize(str(hit), tok)
    assert again["written"] == 0 and not list(Path(hit).glob(".tmp-*"))
