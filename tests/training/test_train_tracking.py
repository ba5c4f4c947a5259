"""What an ML engineer finds in MLflow after a small staged training: stage 0 -> stage 1 -> stage 2 (registered by
the CLI's composition) as named child runs of one parent run, linked through MLflow's own mechanisms (parent run id,
dataset inputs, model inputs, the model logged from the training run), one metric vocabulary with validation curves,
no absolute local path in tags / params / MLmodel, a store that still finds every artifact after its folder moves,
and sample grids whose tiles differ.

One real SQLite store; the trainings are tiny (tiny preset, a few steps) and shared by every test of the module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import sha256  # tests/training/conftest.py

NAME = re.compile(r"^(stage0-vqvae|stage1-c2i|stage2-isr) tiny seed0 \d{4}-\d\d-\d\dT\d\d:\d\d$")
LINEAGE = {
    "varsr.stage",
    "varsr.model_preset",
    "varsr.config_hash",
    "varsr.git_commit",
    "varsr.data.location",
    "varsr.data.manifest_sha256",
    "varsr.output_dir",
}
OLD_NAMES = {"loss", "ce", "diff", "acc", "acc_scale0", "ce_scale0", "tokens_per_s", "grad_norm", "mfu"}
COMMON = [
    "data.batch_size=4",
    "data.workers=0",
    "optim.lr=2e-3",
    "validation.num_images=4",
    "validation.batches=1",
    "validation.top_k=5",
    "validation.every=2",
    "checkpoint_every=0",
    "log_every=1",
    "max_steps=4",
]


@pytest.fixture(scope="module")
def pipeline(shards, tmp_path_factory):
    """A parent run with stage 0, 1 and 2 as children in one store; stage 2 registered through the CLI's composer."""
    from infra.cli import register_trained_model
    from infra.core.config import load_config
    from infra.core.net import free_port
    from infra.core.tracking import end_run, run_name, start_run
    from training.config import TrainConfig
    from training.stage0_vqvae import load_vqvae_config, train_vqvae
    from training.trainer import train

    root = tmp_path_factory.mktemp("pipeline") / "work"
    root.mkdir()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    saved = {
        k: os.environ.get(k)
        for k in (
            "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL",
            "MASTER_PORT",
            "MASTER_ADDR",
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "MLFLOW_TRACKING_URI",
        )
    }
    os.environ.update(
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1",
        MASTER_ADDR="127.0.0.1",
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_PORT=str(free_port()),
    )
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        parent = start_run(uri, run_name("pipeline", "tiny", "seed0"), experiment="varsr-test").info.run_id
        track = [f"tracking.tracking_uri={uri}", f"tracking.parent_run_id={parent}"]
        s0 = train_vqvae(
            load_vqvae_config(
                None,
                [
                    f"output_dir={root / 'runs' / 'vqvae'}",
                    f"data.shards={shards}",
                    "model.preset=tiny",
                    "data.batch_size=4",
                    "max_steps=6",
                    "log_every=3",
                    *track,
                ],
            )
        )
        c1 = load_config(
            TrainConfig,
            None,
            [
                "stage=c2i",
                f"output_dir={root / 'runs' / 'stage1'}",
                f"data.shards={shards}",
                f"model.vqvae_checkpoint={root / 'runs' / 'vqvae' / 'final'}",
                *COMMON,
                *track,
            ],
        )
        r1 = train(c1)
        os.environ["MASTER_PORT"] = str(free_port())
        c2 = load_config(
            TrainConfig,
            None,
            [
                "stage=isr",
                f"output_dir={root / 'runs' / 'stage2'}",
                f"data.shards={shards}",
                f"model.init_from={root / 'runs' / 'stage1' / 'final'}",
                f"model.vqvae_checkpoint={root / 'runs' / 'vqvae' / 'final'}",
                "register.name=varsr-test",
                *COMMON,
                *track,
            ],
        )
        r2 = train(c2)
        register_trained_model(c2)
        end_run(uri, parent)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return dict(root=root, uri=uri, parent=parent, s0=s0, r1=r1, r2=r2, shards=shards)


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _runs(p) -> dict:
    client = _client(p["uri"])
    return {
        "vqvae": client.get_run(p["s0"]["run_id"]),
        "c2i": client.get_run(p["r1"].run_id),
        "isr": client.get_run(p["r2"].run_id),
    }


def test_one_parent_run_with_named_children_in_one_experiment(pipeline):
    client = _client(pipeline["uri"])
    parent = client.get_run(pipeline["parent"])
    runs = _runs(pipeline)
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.name == "varsr-test"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{pipeline['parent']}'")
    assert {r.info.run_id for r in children} == {r.info.run_id for r in runs.values()}
    names = [r.info.run_name for r in runs.values()]
    assert all(NAME.match(n) for n in names), names
    assert len(set(names)) == 3 and names[2].startswith("stage2-isr tiny seed0 ")
    assert all(r.info.status == "FINISHED" for r in runs.values())
    # one experiment for the pipeline: no per-stage experiments appear
    assert {e.name for e in client.search_experiments()} <= {"varsr-test", "Default"}


def test_same_lineage_keys_on_every_stage_and_links_through_mlflow(pipeline):
    client = _client(pipeline["uri"])
    runs = _runs(pipeline)
    sha = sha256(pipeline["shards"] / "manifest.json")
    for stage, run in runs.items():
        tags = run.data.tags
        assert LINEAGE <= set(tags), (stage, LINEAGE - set(tags))
        assert tags["varsr.stage"] == stage and tags["varsr.model_preset"] in ("tiny", "c2i-tiny")
        assert tags["varsr.data.manifest_sha256"] == sha and len(tags["varsr.config_hash"]) == 16
        assert tags["mlflow.source.git.commit"] in tags["varsr.git_commit"]
        # dataset input: the shard manifest, its sha256 as digest, its location as source (relative to the run)
        (ds,) = run.inputs.dataset_inputs
        assert ds.dataset.digest == sha[:36] and json.loads(ds.dataset.profile)["manifest_sha256"] == sha
        assert json.loads(ds.dataset.source)["uri"] == os.path.relpath(
            pipeline["shards"] / "manifest.json",
            pipeline["root"] / "runs" / stage.replace("c2i", "stage1").replace("isr", "stage2"),
        )
        assert {t.key: t.value for t in ds.tags}["mlflow.data.context"] == "training"
    assert runs["vqvae"].data.tags["varsr.output_dir"] == "runs/vqvae"
    assert runs["isr"].data.tags["varsr.output_dir"] == "runs/stage2"
    # stage 2 starts from stage 1: lineage tags and the stage-1 export (a logged model) as a model input
    s1_model = client.search_logged_models(
        [runs["c2i"].info.experiment_id], filter_string=f"source_run_id = '{runs['c2i'].info.run_id}'"
    ).to_list()
    assert [m.name for m in s1_model] == ["stage1-c2i"]
    tok_model = pipeline["s0"]["model_id"]
    assert client.get_logged_model(tok_model).source_run_id == runs["vqvae"].info.run_id
    assert {m.model_id for m in runs["isr"].inputs.model_inputs} == {tok_model, s1_model[0].model_id}
    assert {m.model_id for m in runs["c2i"].inputs.model_inputs} == {tok_model}
    t2 = runs["isr"].data.tags
    assert t2["varsr.parent.run_id"] == runs["c2i"].info.run_id and t2["varsr.parent.checkpoint"] == "../stage1/final"
    assert t2["varsr.tokenizer.run_id"] == runs["vqvae"].info.run_id
    assert runs["c2i"].data.tags["varsr.tokenizer.checkpoint"] == "../vqvae/final"
    # the logged tokenizer holds the export (weights included) and its lineage names both ids
    files = {a.path for a in client.list_logged_model_artifacts(tok_model)}
    assert {"config.json", "model.safetensors"} <= files
    meta = json.loads((pipeline["root"] / "runs" / "vqvae" / "final" / "config.json").read_text())
    assert (
        meta["lineage"]["mlflow_model_id"] == tok_model
        and meta["lineage"]["mlflow_run_id"] == runs["vqvae"].info.run_id
    )


def test_one_metric_vocabulary_validation_curves_and_system_metrics(pipeline):
    client = _client(pipeline["uri"])
    runs = _runs(pipeline)
    m2 = runs["isr"].data.metrics
    for key in (
        "loss/total",
        "loss/ce",
        "loss/refiner",
        "acc/total",
        "acc/scale_0",
        "ce/scale_0",
        "lr",
        "throughput/tokens_per_s",
        "throughput/mfu",
        "optim/grad_norm",
        "val/loss",
        "val/acc",
        "val/psnr_y",
        "val/ssim_y",
    ):
        assert key in m2, key
    assert not OLD_NAMES & set(m2), OLD_NAMES & set(m2)
    assert "loss/total" in runs["c2i"].data.metrics and "loss/refiner" in runs["c2i"].data.metrics
    for key in (
        "loss/total",
        "loss/l1",
        "loss/mse",
        "loss/vq",
        "recon/psnr",
        "recon/chroma_err",
        "codebook/usage_pct",
        "lr",
        "eval/chroma_gain",
        "eval/chroma_gain_tokens",
        "eval/chroma_err",
        "eval/chroma_err_tokens",
    ):
        assert key in runs["vqvae"].data.metrics, key
    assert len(client.get_metric_history(runs["vqvae"].info.run_id, "loss/l1")) == 6
    colour = pipeline["s0"]["colour"]  # the end-of-run colour check, as returned and as logged
    assert colour["images"] >= 2
    assert runs["vqvae"].data.metrics["eval/chroma_gain_tokens"] == pytest.approx(colour["chroma_gain_tokens"])
    # the check travels with the tokenizer, as standard JSON (no NaN)
    meta = json.loads(
        (pipeline["root"] / "runs" / "vqvae" / "final" / "config.json").read_text(),
        parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"),
    )
    assert meta["colour_check"]["verdict"] in ("kept", "lost") and meta["colour_check"]["images"] == colour["images"]
    # validation every 2 of 4 steps: a curve, not a point
    assert [m.step for m in client.get_metric_history(runs["isr"].info.run_id, "val/psnr_y")] == [2, 4]
    assert [m.step for m in client.get_metric_history(runs["c2i"].info.run_id, "val/loss")] == [2, 4]
    # system metrics (CPU / memory), sampled every second here
    for run in runs.values():
        assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)
        assert any(k.startswith("system/system_memory_usage") for k in run.data.metrics)
    # history.jsonl uses the same names (the loss-curve plot and benchmarks read it)
    hist = [json.loads(x) for x in (pipeline["root"] / "runs" / "stage2" / "history.jsonl").read_text().splitlines()]
    assert {"loss/total", "loss/refiner", "throughput/tokens_per_s"} <= set(hist[0])
    assert [h["step"] for h in hist if "loss/total" in h] == [1, 2, 3, 4]
    assert [h["step"] for h in hist if "val/psnr_y" in h] == [2, 4]


def test_the_training_run_shows_its_logged_and_registered_model(pipeline):
    import mlflow

    client = _client(pipeline["uri"])
    run = client.get_run(pipeline["r2"].run_id)
    (out,) = run.outputs.model_outputs  # "logged models" of the run page
    model = client.get_logged_model(out.model_id)
    assert model.source_run_id == run.info.run_id and model.name == "model"
    (mv,) = client.search_model_versions(f"run_id = '{run.info.run_id}'")  # "registered models" of the run page
    assert mv.name == "varsr-test" and mv.run_id == run.info.run_id and mv.source == f"models:/{out.model_id}"
    assert client.get_model_version_by_alias("varsr-test", "champion").version == mv.version
    assert mv.tags["varsr.data.manifest_sha256"] == run.data.tags["varsr.data.manifest_sha256"]
    assert mv.tags["varsr.train_run_id"] == run.info.run_id
    from infra.core.tracking import tracking_uri_scope

    with tracking_uri_scope(pipeline["uri"]):
        info = mlflow.models.get_model_info("models:/varsr-test@champion")
    assert info.signature is not None and info.signature.inputs.input_names() == ["image"]
    # stage 2 was registered: its export is not logged a second time as a checkpoint model
    assert (
        client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
        .to_list()[0]
        .name
        == "model"
    )


def _all_text(client, pipeline) -> list[tuple[str, str]]:
    """(where, value) for every tag, param and model-version tag of the store, and every MLmodel file."""
    out = []
    for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        out += [(f"tag {k}", v) for k, v in run.data.tags.items()]
        out += [(f"param {k}", v) for k, v in run.data.params.items()]
    for mv in client.search_model_versions("name = 'varsr-test'"):
        out += [(f"version tag {k}", v) for k, v in mv.tags.items()]
    for mlmodel in (pipeline["root"] / "mlartifacts").rglob("MLmodel"):
        out.append((str(mlmodel), mlmodel.read_text()))
    return out


def test_no_absolute_local_paths_in_tags_params_or_mlmodel(pipeline):
    import tempfile

    client = _client(pipeline["uri"])
    texts = _all_text(client, pipeline)
    assert any(w.startswith("param data.shards") for w, _ in texts)
    for where, value in texts:
        for bad in (str(pipeline["root"]), str(pipeline["shards"]), tempfile.gettempdir() + "/"):
            assert bad not in value, (where, value[:300])
    (mlmodel,) = [v for w, v in texts if w.endswith("MLmodel") and "python_function" in v]
    assert "uri: inference.yaml" in mlmodel and "uri: runs/stage2/final" in mlmodel
    assert "artifact_path: models:/m-" in mlmodel


def test_the_store_folder_moves_with_every_artifact_and_the_model_schema(pipeline, tmp_path):
    import mlflow

    from infra.core.tracking import resolve_tracking_uri, tracking_uri_scope

    old = pipeline["root"]
    new = tmp_path / "moved" / "work"
    shutil.copytree(old, new)
    hidden = old.with_name("work-hidden")
    old.rename(hidden)  # the original place is gone while the copy is used
    try:
        uri = resolve_tracking_uri(f"sqlite:///{new / 'mlflow.db'}")  # opening the store re-points it
        client = _client(uri)
        exps = [e for e in client.search_experiments() if e.name == "varsr-test"]
        assert exps[0].artifact_location == (new / "mlartifacts" / "varsr-test").as_uri()
        runs = client.search_runs([exps[0].experiment_id])
        assert len(runs) == 4
        n_files = 0
        for run in runs:
            assert run.info.artifact_uri.startswith(new.as_uri() + "/")
            stack = [None]
            while stack:
                for a in client.list_artifacts(run.info.run_id, stack.pop()):
                    if a.is_dir:
                        stack.append(a.path)
                    else:
                        local = client.download_artifacts(run.info.run_id, a.path, str(tmp_path / "dl"))
                        assert Path(local).stat().st_size == a.file_size
                        n_files += 1
        assert n_files >= 15
        for m in client.search_logged_models([exps[0].experiment_id]).to_list():
            assert m.artifact_location.startswith(new.as_uri() + "/")
            assert client.list_logged_model_artifacts(m.model_id)
        with tracking_uri_scope(uri):
            info = mlflow.models.get_model_info("models:/varsr-test@champion")
            local = mlflow.artifacts.download_artifacts("models:/varsr-test@champion", dst_path=str(tmp_path / "m"))
        assert info.signature is not None and info.signature.params is not None
        assert (Path(local) / "artifacts" / "final" / "model.safetensors").is_file() or any(
            Path(local).rglob("model.safetensors")
        )
        assert (
            resolve_tracking_uri(uri) == uri
            and client.get_experiment(exps[0].experiment_id).artifact_location
            == (new / "mlartifacts" / "varsr-test").as_uri()
        )  # idempotent
    finally:
        hidden.rename(old)


def _assert_tiles_differ(path: Path, columns: list[int], rows: int = 4, min_side: int = 128):
    from training.tracking import grid_tiles

    meta, tiles = grid_tiles(path)
    assert len(tiles) == rows and meta["rows"] and len(meta["rows"]) == rows
    for col in columns:
        col_tiles = [r[col].astype(np.int16) for r in tiles]
        assert min(col_tiles[0].shape[:2]) >= min_side
        for i in range(rows):
            for j in range(i + 1, rows):
                assert np.abs(col_tiles[i] - col_tiles[j]).mean() > 1.0, (path.name, meta["titles"][col], i, j)
    # columns side by side without overlapping, each as wide as its header needs
    boxes = meta["tiles"][0]
    assert all(a[2] < b[0] for a, b in zip(boxes, boxes[1:]))
    return meta


def test_sample_grids_show_different_samples(pipeline):
    root = pipeline["root"] / "runs"
    meta = _assert_tiles_differ(root / "vqvae" / "samples" / "reconstructions.png", [0, 1, 2])
    assert meta["titles"] == ["HR", "reconstruction", "tokens only"]
    meta = _assert_tiles_differ(root / "stage1" / "samples" / "samples_step00000004.png", [0, 1])
    assert meta["titles"] == ["generated", "real, same class"] and meta["rows"][0].startswith("class ")
    # LR and HR: four different samples (SR of a 4-step model may not depend on its input yet)
    meta = _assert_tiles_differ(root / "stage2" / "samples" / "samples_step00000004.png", [0, 2])
    assert meta["titles"] == ["LR input", "SR", "HR"] and "PSNR-Y" in meta["rows"][0]
    # and the grids are what the run shows
    client = _client(pipeline["uri"])
    names = {a.path for a in client.list_artifacts(pipeline["r2"].run_id, "samples")}
    assert {"samples/samples_step00000002.png", "samples/samples_step00000004.png"} <= names
