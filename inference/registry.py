"""MLflow tracking/registry helpers: the default local store, and registering a checkpoint as ``models:/NAME@ALIAS``.

Default store (no setup): ``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlartifacts``; ``MLFLOW_TRACKING_URI``
wins when set. Registered models use aliases (``@champion``), never stages.
"""
from __future__ import annotations

import logging
from pathlib import Path

from infra.core.tracking import DEFAULT_EXPERIMENT, ensure_experiment, resolve_tracking_uri, tracking_uri_scope

log = logging.getLogger(__name__)


def register_model(ckpt_dir: str | Path, name: str, alias: str | None = "champion", tracking_uri: str | None = None,
                   tags: dict[str, str] | None = None, config=None, experiment: str = DEFAULT_EXPERIMENT,
                   validate_example: bool = True, run_id: str | None = None):
    """Log ``ckpt_dir`` as the VARSR pyfunc model, register it under ``name`` and set ``alias``.

    The model is logged into ``run_id`` when given (the training run that produced the checkpoint, so the registered
    version's source run is that run), else into a new ``register-NAME`` run of ``experiment``. ``tags`` (training
    lineage) go on the model version. ``config``: the InferenceConfig served with the model (limits, defaults);
    default configs/inference/default.yaml. Returns the MLflow ModelVersion.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from model.checkpoint import require_native_checkpoint

    from .config import load_inference_config
    from .mlflow_model import log_pyfunc_model

    ckpt = require_native_checkpoint(ckpt_dir)
    uri = resolve_tracking_uri(tracking_uri)
    cfg = config or load_inference_config()
    tags = {str(k): str(v) for k, v in (tags or {}).items()}
    with tracking_uri_scope(uri):
        if run_id is not None:
            run_ctx = mlflow.start_run(run_id=run_id)
        else:
            run_ctx = mlflow.start_run(experiment_id=ensure_experiment(uri, experiment), run_name=f"register-{name}")
        with run_ctx as run:
            if run_id is None:
                mlflow.set_tags({"varsr.checkpoint": str(ckpt.resolve()), **tags})
            info = log_pyfunc_model(ckpt, cfg, registered_model_name=name, validate_example=validate_example)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        version = str(info.registered_model_version)
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)
        if alias:
            client.set_registered_model_alias(name, alias, version)
        mv = client.get_model_version(name, version)
    log.info("registered %s version %s%s (run %s) in %s", name, mv.version, f" @{alias}" if alias else "",
             run.info.run_id, uri)
    return mv


def register_training_run(output_dir: str | Path, name: str, alias: str | None = "champion", config=None):
    """Register the final weights of a finished training run (its ``summary.json`` names the export, the MLflow run
    and the tracking store): the model is logged into that training run, and the run's lineage tags (``varsr.*``)
    are copied onto the model version."""
    import json
    import tempfile

    from mlflow.tracking import MlflowClient

    from infra.core import storage
    from infra.core.errors import UserError

    summary_url = storage.join(storage.absolute(output_dir), "summary.json")
    if not storage.exists(summary_url):
        raise UserError(f"{output_dir} has no summary.json: the training run did not finish")
    summary = json.loads(storage.read_text(summary_url))
    if summary.get("status") != "FINISHED" or not summary.get("export_dir"):
        raise UserError(f"training run in {output_dir} did not finish ({summary.get('status')}); nothing to register")
    run_id, uri = summary.get("mlflow_run_id"), summary.get("tracking_uri")
    tags = {}
    if run_id:
        run = MlflowClient(tracking_uri=resolve_tracking_uri(uri)).get_run(run_id)
        tags = {k: v for k, v in run.data.tags.items() if k.startswith("varsr.")}
        tags["varsr.train_run_id"] = run_id
    export = summary["export_dir"]
    if storage.is_local(export):
        return register_model(export, name, alias, tracking_uri=uri, tags=tags, config=config, run_id=run_id)
    with tempfile.TemporaryDirectory(prefix="varsr-export-") as tmp:  # the export lives in object storage
        storage.get_tree(export, tmp)
        return register_model(tmp, name, alias, tracking_uri=uri, tags=tags, config=config, run_id=run_id)
