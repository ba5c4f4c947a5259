"""Node failures on the multi-node Ray cluster, with outputs in S3 (moto's server on loopback):

* a worker node killed in the middle of ``varsr data build`` costs only its in-flight shard tasks: they are retried
  on the surviving (and a replacement) node, and the shards and manifest equal those of an uninterrupted build;
* a Ray Train worker killed (with its node) in the middle of ``varsr train`` is restarted by Ray Train's failure
  handling from the last complete checkpoint in s3://, and the run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json

import pytest
import torch

from infra.core import storage
from tests.cluster import commands
from tests.cluster.conftest import run_varsr, start_varsr, varsr_env, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]

# one image per shard, at 256 px with two LR variants: enough shard tasks, each long enough to be caught in flight
MANY_SHARDS = (
    "--set",
    "shard.max_samples_per_shard=1",
    "--set",
    "shard.crop_size=256",
    "--set",
    "shard.lr_variants=2",
    "--set",
    "select.cluster.k=4",
    "--set",
    "score.weights_dir=/nonexistent-iqa-cache",
)
TRAIN = (
    "--set",
    "max_steps=24",
    "--set",
    "checkpoint_every=4",
    "--set",
    "data.workers=0",
    "--set",
    "validation.num_images=1",
    "--set",
    "validation.batches=1",
    "--set",
    "ray.cpus_per_worker=1",
    "--set",
    "model.overrides.num_classes=4",
    "--set",
    "tracking.enabled=false",
    "--set",
    "ray.max_failures=2",
    "--set",
    "optim.warmup_epochs=0",
    "--set",
    "model.overrides.drop_path_rate=0.0",
)


def _upload_corpus(bucket: str, tmp_path) -> None:
    from data_pipeline.sample_corpus import write_sample_corpus

    write_sample_corpus(tmp_path / "corpus", with_bad_files=False)
    for p in sorted((tmp_path / "corpus").rglob("*")):
        if p.is_file():
            storage.write_bytes(f"s3://{bucket}/raw/{p.relative_to(tmp_path / 'corpus')}", p.read_bytes())


def _objects(s3_server, bucket: str, prefix: str) -> dict[str, bytes]:
    c = s3_server.client()
    return {
        k[len(prefix) :]: c.get_object(Bucket=bucket, Key=k)["Body"].read()
        for k in s3_server.list_keys(bucket, prefix)
        if k.endswith((".tar", ".stats.json", "manifest.json", "rejected.parquet"))
    }


def test_a_worker_node_killed_mid_build_costs_only_its_in_flight_shards(ray_cluster, s3_server, tmp_path):
    bucket = s3_server.create_bucket()
    _upload_corpus(bucket, tmp_path)
    env = varsr_env(s3_server)
    values = dict(BUCKET=bucket, RAY=ray_cluster.address)
    # the uninterrupted reference, on the same cluster
    ref_args = commands.argv(commands.DATA_BUILD, MANY_SHARDS, **values)
    ref_args[ref_args.index("--output") + 1] = f"s3://{bucket}/reference"
    run_varsr(ref_args, env, tmp_path, tmp_path / "reference.log")
    reference = _objects(s3_server, bucket, "reference/")
    n_shards = len(json.loads(reference["manifest.json"])["shards"])
    assert n_shards >= 8

    log = tmp_path / "killed.log"
    proc = start_varsr(commands.argv(commands.DATA_BUILD, MANY_SHARDS, **values), env, tmp_path, log)
    try:
        published = lambda: sum(k.endswith(".tar") for k in s3_server.list_keys(bucket, "shards/"))  # noqa: E731
        wait_for(lambda: published() >= 1, 600, "the first published shard", proc, log)
        assert published() < n_shards, "the build finished before a node could be killed"
        victim = ray_cluster.workers[0]
        ray_cluster.kill_worker(victim)  # its raylet and every task on it die now
        ray_cluster.add_worker()  # the cluster heals, as an autoscaler would
        assert proc.wait(timeout=900) == 0, log.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    rebuilt = _objects(s3_server, bucket, "shards/")
    assert rebuilt.keys() == reference.keys()
    for name in sorted(reference):
        assert rebuilt[name] == reference[name], f"{name} differs from the uninterrupted build"
    assert not any(".tmp" in k for k in s3_server.list_keys(bucket, "shards/"))


def _final_weights(bucket: str, run: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(storage.read_bytes(f"s3://{bucket}/runs/{run}/final/model.safetensors"))


def test_a_training_worker_killed_mid_run_resumes_from_the_last_checkpoint(ray_cluster, s3_server, tmp_path):
    bucket = s3_server.create_bucket()
    _upload_corpus(bucket, tmp_path)
    env = varsr_env(s3_server)
    values = dict(BUCKET=bucket, RAY=ray_cluster.address, MLFLOW="unused")
    run_varsr(
        commands.argv(
            commands.DATA_BUILD,
            (
                "--set",
                "shard.max_samples_per_shard=4",
                "--set",
                "select.cluster.k=4",
                "--set",
                "score.weights_dir=/none",
            ),
            **values,
        ),
        env,
        tmp_path,
        tmp_path / "data.log",
    )

    def train_args(run: str) -> list[str]:
        a = commands.argv(commands.TRAIN_C2I, TRAIN, **values)
        a[a.index(f"output_dir=s3://{bucket}/runs/stage1")] = f"output_dir=s3://{bucket}/runs/{run}"
        return a  # tracking is off for these runs (TRAIN), so the MLflow placeholder is never used

    run_varsr(train_args("uninterrupted"), env, tmp_path, tmp_path / "uninterrupted.log")

    log = tmp_path / "killed.log"
    proc = start_varsr(train_args("killed"), env, tmp_path, log)
    try:
        # the first complete checkpoint, once reported to Ray Train (the pointer its failure handling restores)
        def reported() -> bool:
            return any(
                k.endswith("varsr_checkpoint.json") for k in s3_server.list_keys(bucket, "runs/killed/ray_results/")
            )

        wait_for(reported, 900, "the first checkpoint reported to Ray Train", proc, log)
        # the node running the rank-1 training worker: its scratch folder holds that rank's work folder
        victim = next(n for n, d in ray_cluster.scratch_of.items() if any(d.glob("varsr-run-*-rank1")))
        ray_cluster.kill_worker(victim)  # one of the two training workers dies with its node
        ray_cluster.add_worker()
        assert proc.wait(timeout=1200) == 0, log.read_text()[-6000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = json.loads(storage.read_text(f"s3://{bucket}/runs/killed/summary.json"))
    assert summary["status"] == "FINISHED" and summary["steps"] == 24
    text = log.read_text()
    assert "resumed from" in text, "the restarted workers did not resume from the checkpoint"
    assert "steps 0->24 of 24" in text, "the first attempt did not start from step 0"
    a, b = _final_weights(bucket, "uninterrupted"), _final_weights(bucket, "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs from the uninterrupted run"
