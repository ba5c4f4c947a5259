"""The whole platform on a cluster, on one machine, with the real pieces: a multi-node Ray cluster (head with 0
CPUs, two worker nodes), an S3-compatible endpoint (moto's server), and an MLflow tracking server with a PostgreSQL
backend and S3 artifacts (infra/mlflow/start_server.sh). The commands are docs/CLUSTER.md's "The commands"
(tests/cluster/commands.py), with only their sizes reduced:

  raw photos in s3:// -> varsr data build -> shards in s3://                       (shard tasks on both worker nodes)
  -> varsr train c2i, then isr, 2 Ray Train workers on 2 nodes, reading s3:// shards, checkpointing to s3://
  -> registered @champion on the tracking server, from the stage-2 training run itself
  -> served from models:/ over HTTP, answering one request
"""

from __future__ import annotations

import base64
import io
import json

import pytest
import requests
from PIL import Image

from infra.core import storage
from infra.core.net import free_port
from tests.cluster import commands
from tests.cluster.conftest import run_varsr, varsr_env

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]

SMALL_DATA = (
    "--set",
    "shard.max_samples_per_shard=4",
    "--set",
    "select.cluster.k=4",
    "--set",
    "score.weights_dir=/nonexistent-iqa-cache",
)
SMALL_TRAIN = (
    "--set",
    "max_steps=4",
    "--set",
    "checkpoint_every=2",
    "--set",
    "data.workers=0",
    "--set",
    "validation.num_images=2",
    "--set",
    "validation.batches=1",
    "--set",
    "ray.cpus_per_worker=1",
    "--set",
    "model.overrides.num_classes=4",
)


def _upload_corpus(bucket: str, tmp_path) -> int:
    from data_pipeline.sample_corpus import write_sample_corpus

    files = write_sample_corpus(tmp_path / "corpus")
    for p in sorted((tmp_path / "corpus").rglob("*")):
        if p.is_file():
            storage.write_bytes(f"s3://{bucket}/raw/{p.relative_to(tmp_path / 'corpus')}", p.read_bytes())
    return len(files)


def test_data_train_register_serve_through_s3_a_ray_cluster_and_a_tracking_server(
    ray_cluster, s3_server, mlflow_server, tmp_path
):
    bucket = s3_server.create_bucket()
    env = varsr_env(s3_server, mlflow_server)
    values = dict(BUCKET=bucket, RAY=ray_cluster.address, MLFLOW=mlflow_server.uri)
    n_files = _upload_corpus(bucket, tmp_path)

    # data: shard tasks on the worker nodes write straight to s3://; the driver writes the manifest from their stats
    run_varsr(commands.argv(commands.DATA_BUILD, SMALL_DATA, **values), env, tmp_path, tmp_path / "data.log")
    manifest = json.loads(storage.read_text(f"s3://{bucket}/shards/manifest.json"))
    assert manifest["counts"]["inputs"] == n_files and manifest["counts"]["samples"] > 0
    assert len(manifest["shards"]) >= 2
    for sh in manifest["shards"]:
        url = f"s3://{bucket}/shards/{sh['name']}"
        assert storage.size(url) == sh["bytes"] and storage.sha256(url) == sh["sha256"]
    assert not any(n.startswith(".tmp") for n in storage.listdir(f"s3://{bucket}/shards"))

    # stage 1 and stage 2: 2 workers on 2 nodes, s3:// shards in, s3:// checkpoints and exports out
    run_varsr(commands.argv(commands.TRAIN_C2I, SMALL_TRAIN, **values), env, tmp_path, tmp_path / "c2i.log")
    run_varsr(commands.argv(commands.TRAIN_ISR, SMALL_TRAIN, **values), env, tmp_path, tmp_path / "isr.log")
    for stage in ("stage1", "stage2"):
        summary = json.loads(storage.read_text(f"s3://{bucket}/runs/{stage}/summary.json"))
        assert summary["status"] == "FINISHED" and summary["world_size"] == 2 and summary["steps"] == 4
        a, b = summary["rank_param_checksums"]
        assert abs(a - b) <= 1e-9 * max(1.0, abs(a))  # both workers hold the same model
        assert storage.exists(f"s3://{bucket}/runs/{stage}/final/model.safetensors")
        assert storage.exists(f"s3://{bucket}/runs/{stage}/checkpoints/step_00000004/COMPLETE")
    isr_log = (tmp_path / "isr.log").read_text()
    assert "init from" in isr_log or "loaded" in isr_log

    # registered on the tracking server (PostgreSQL + S3), from the stage-2 training run itself
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    mv = client.get_model_version_by_alias("varsr", "champion")
    stage2 = json.loads(storage.read_text(f"s3://{bucket}/runs/stage2/summary.json"))
    assert mv.run_id == stage2["mlflow_run_id"]
    assert mv.tags["varsr.data.manifest_sha256"] != "none"
    artifact_keys = s3_server.list_keys(mlflow_server.bucket)
    assert any(k.endswith("model.safetensors") for k in artifact_keys)  # the model's files live in S3

    # served from models:/ through the tracking server, one real request
    from inference.serve import background_server

    port = free_port()
    serve_args = commands.argv(commands.SERVE, PORT=str(port), **values)
    assert serve_args[:2] == ["serve", "models:/varsr@champion"]
    img = Image.fromarray(__import__("skimage.data", fromlist=["x"]).chelsea()).resize((20, 16))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    payload = {
        "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(buf.getvalue()).decode()]]},
        "params": {"scale": 4, "seed": 0},
    }
    with background_server(
        "models:/varsr@champion",
        port,
        tracking_uri=mlflow_server.uri,
        env=env,
        log_path=tmp_path / "serve.log",
        tmp_dir=tmp_path / "serve-tmp",
    ) as url:
        r = requests.post(f"{url}/invocations", json=payload, timeout=300)
    assert r.status_code == 200, r.text[:500]
    out = Image.open(io.BytesIO(base64.b64decode(r.json()["predictions"][0]["image"])))
    assert out.size == (80, 64)
