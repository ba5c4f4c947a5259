"""MLflow records of registration and evaluation (real SQLite stores, a tiny untrained checkpoint): named runs nested
under a parent, artifacts under the store whatever the current folder, no absolute local path in tags / params /
MLmodel, evaluation runs that say which model ran on which data, and a store that keeps working after its folder moves.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data as skdata

from infra.cli import main
from model import VARSRConfig, build, save_pretrained

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    vqvae, varsr = build(VARSRConfig.preset("tiny"))
    return save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny", vqvae, varsr)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A SQLite store in its own folder, used from another current folder (artifacts must not follow the cwd)."""
    root = tmp_path / "store"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("VARSR_PARENT_RUN_ID", raising=False)
    return {"root": root, "uri": f"sqlite:///{root / 'mlflow.db'}", "cwd": elsewhere}


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _pairs(tmp_path) -> tuple[Path, Path]:
    hr_dir, lr_dir = tmp_path / "data" / "HR", tmp_path / "data" / "LR"
    hr_dir.mkdir(parents=True)
    lr_dir.mkdir(parents=True)
    for name, arr in {"astronaut": skdata.astronaut(), "coffee": skdata.coffee()}.items():
        hr = Image.fromarray(arr).resize((64, 48), Image.BICUBIC)
        hr.save(hr_dir / f"{name}.png")
        hr.resize((16, 12), Image.BICUBIC).save(lr_dir / f"{name}.png")
    return hr_dir, lr_dir


@pytest.mark.slow
def test_register_run_is_named_nested_and_records_no_local_path(ckpt, store):
    from inference.registry import register_model
    from infra.core.tracking import end_run, start_run

    parent = start_run(store["uri"], "release tiny").info.run_id
    mv = register_model(
        ckpt, "reg-x", tracking_uri=store["uri"], validate_example=False, parent_run_id=parent, tags={"source": "test"}
    )
    end_run(store["uri"], parent)
    client = _client(store["uri"])
    run = client.get_run(mv.run_id)
    assert re.fullmatch(rf"register reg-x {STAMP}", run.info.run_name)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.info.status == "FINISHED"
    assert run.info.experiment_id == client.get_run(parent).info.experiment_id
    assert client.get_experiment(run.info.experiment_id).name == "varsr"
    # the checkpoint recorded relative to the store, artifacts under the store, nothing in the current folder
    assert run.data.tags["varsr.checkpoint"] == os.path.relpath(ckpt, store["root"])
    assert run.info.artifact_uri.startswith((store["root"] / "mlartifacts" / "varsr").as_uri())
    assert not any(store["cwd"].iterdir())
    (out,) = run.outputs.model_outputs
    mlmodel = next((store["root"] / "mlartifacts").rglob("MLmodel")).read_text()
    assert f"artifact_path: models:/{out.model_id}" in mlmodel and "uri: inference.yaml" in mlmodel
    for text in [mlmodel, *run.data.tags.values(), *mv.tags.values()]:
        assert str(ckpt.parent) not in text and "/tmp/" not in text, text[:300]


@pytest.mark.slow
def test_a_moved_store_finds_its_artifacts_and_the_model_schema(ckpt, store, tmp_path):
    import mlflow

    from inference.registry import register_model
    from infra.core.tracking import relocate_local_store, resolve_tracking_uri, tracking_uri_scope

    register_model(ckpt, "moved", tracking_uri=store["uri"], validate_example=False)
    assert relocate_local_store(store["uri"]) == 0  # nothing moved yet
    new_root = tmp_path / "somewhere" / "else"
    new_root.parent.mkdir()
    shutil.move(str(store["root"]), str(new_root))
    uri = f"sqlite:///{new_root / 'mlflow.db'}"
    assert relocate_local_store(uri) > 0
    assert relocate_local_store(uri) == 0  # idempotent
    client = _client(resolve_tracking_uri(uri))
    mv = client.get_model_version_by_alias("moved", "champion")
    run = client.get_run(mv.run_id)
    assert run.info.artifact_uri.startswith(new_root.as_uri() + "/")
    with tracking_uri_scope(uri):
        info = mlflow.models.get_model_info("models:/moved@champion")
        local = Path(mlflow.artifacts.download_artifacts("models:/moved@champion", dst_path=str(tmp_path / "dl")))
    assert info.signature.inputs.input_names() == ["image"] and info.signature.params is not None
    assert any(local.rglob("model.safetensors")) and (local / "artifacts" / "inference.yaml").is_file()
    # a tracking server, or a store that is not there: nothing to do
    assert relocate_local_store("http://127.0.0.1:1") == 0
    assert relocate_local_store(f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}") == 0


@pytest.mark.slow
def test_eval_run_records_the_model_its_params_and_the_data(ckpt, store, tmp_path, monkeypatch, capsys):
    from inference.registry import register_model
    from infra.core.tracking import start_run

    mv = register_model(ckpt, "evalme", tracking_uri=store["uri"], validate_example=False)
    parent = start_run(store["uri"], "pipeline tiny").info.run_id
    monkeypatch.setenv("VARSR_PARENT_RUN_ID", parent)  # how a multi-stage launch nests the runs of its commands
    hr_dir, lr_dir = _pairs(tmp_path)
    out = tmp_path / "eval-out"
    rc = main(
        [
            "eval",
            "--hr",
            str(hr_dir),
            "--lr",
            str(lr_dir),
            "--model-uri",
            "models:/evalme@champion",
            "--baseline",
            "bicubic",
            "-o",
            str(out),
            "--seed",
            "0",
            "--tracking-uri",
            store["uri"],
        ]
    )
    assert rc == 0, capsys.readouterr().err
    client = _client(store["uri"])
    (run,) = [
        r
        for r in client.search_runs([client.get_experiment_by_name("varsr").experiment_id])
        if r.data.tags.get("varsr.stage") == "eval"
    ]
    run = client.get_run(run.info.run_id)  # search results leave model inputs out
    assert re.fullmatch(rf"eval evalme@champion HR {STAMP}", run.info.run_name)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["varsr.model_uri"] == "models:/evalme@champion"
    assert run.data.tags["varsr.model_version"] == f"evalme/{mv.version}"
    p = run.data.params
    assert p["model_uri"] == "models:/evalme@champion" and p["baseline"] == "bicubic" and p["seed"] == "0"
    assert p["data.hr_dir"] == "../data/HR" and p["data.lr_dir"] == "../data/LR" and p["pairs"] == "2"
    assert p["pipeline.model"] == "tiny"
    # the data: a dataset input whose digest is the hash of the pairs' pixels
    h = hashlib.sha256()
    for stem in ("astronaut", "coffee"):
        h.update(
            stem.encode()
            + Image.open(hr_dir / f"{stem}.png").convert("RGB").tobytes()
            + Image.open(lr_dir / f"{stem}.png").convert("RGB").tobytes()
        )
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.digest == h.hexdigest()[:36] and json.loads(ds.dataset.source)["uri"] == "../data/HR"
    assert {t.key: t.value for t in ds.tags}["mlflow.data.context"] == "evaluation"
    # the model: the registered version's logged model is an input of the evaluation
    model_id = mv.source.removeprefix("models:/")
    assert [m.model_id for m in run.inputs.model_inputs] == [model_id]
    m = run.data.metrics
    assert {"varsr/psnr_y", "varsr/ssim_y", "bicubic/psnr_y", "varsr/images"} <= set(m) and m["varsr/images"] == 2
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"metrics.csv", "summary.json", "crops"}
    assert run.info.artifact_uri.startswith(store["root"].as_uri())


@pytest.mark.slow
def test_on_a_tracking_server_the_server_places_artifacts(ckpt, mlflow_server, tmp_path, monkeypatch):
    """With a tracking server (PostgreSQL + proxied S3), experiments get the server's ``mlflow-artifacts:`` root,
    registration still rewrites MLmodel, and an evaluation's dataset input fits the backend's limits."""
    import secrets

    import mlflow

    from inference.registry import register_model
    from infra.core.tracking import ensure_experiment, start_run, tracking_uri_scope

    monkeypatch.delenv("VARSR_PARENT_RUN_ID", raising=False)
    uri = mlflow_server.uri
    exp_name = f"varsr-{secrets.token_hex(3)}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", exp_name)
    client = _client(uri)
    exp = client.get_experiment(ensure_experiment(uri))
    assert exp.name == exp_name and exp.artifact_location.startswith("mlflow-artifacts:")
    parent = start_run(uri, "server pipeline").info.run_id
    name = f"srv-{secrets.token_hex(3)}"
    mv = register_model(ckpt, name, tracking_uri=uri, validate_example=False, parent_run_id=parent)
    assert client.get_run(mv.run_id).data.tags["mlflow.parentRunId"] == parent
    with tracking_uri_scope(uri):
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path / "m")))
    mlmodel = (local / "MLmodel").read_text()
    assert "artifact_path: models:/m-" in mlmodel and "uri: inference.yaml" in mlmodel
    import yaml

    doc = yaml.safe_load(mlmodel)
    sources = [a["uri"] for a in doc["flavors"]["python_function"]["artifacts"].values()]
    assert not any(os.path.isabs(u) or u.startswith("file:") for u in sources), sources
    hr_dir, lr_dir = _pairs(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "eval",
                "--hr",
                str(hr_dir),
                "--lr",
                str(lr_dir),
                "--model-uri",
                f"models:/{name}@champion",
                "-o",
                str(tmp_path / "ev"),
                "--seed",
                "0",
                "--tracking-uri",
                uri,
            ]
        )
        == 0
    )
    (run,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("varsr.stage") == "eval"]
    run = client.get_run(run.info.run_id)
    assert len(run.inputs.dataset_inputs[0].dataset.digest) == 36 and run.inputs.model_inputs
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
