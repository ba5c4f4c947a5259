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
                   validate_example: bool = True):
    """Log ``ckpt_dir`` as the VARSR pyfunc model in a new run, register it under ``name``, set ``alias``.

    ``tags`` (e.g. training lineage) go on the run and the model version. ``config``: the InferenceConfig served
    with the model (limits, defaults); default configs/inference/default.yaml. Returns the MLflow ModelVersion.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from .config import load_inference_config
    from .mlflow_model import log_pyfunc_model

    ckpt = Path(ckpt_dir)
    if not ((ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file()):
        from infra.core.errors import UserError

        raise UserError(f"{ckpt} is not a native VARSR checkpoint (needs model.safetensors + config.json)")
    uri = resolve_tracking_uri(tracking_uri)
    cfg = config or load_inference_config()
    tags = {str(k): str(v) for k, v in (tags or {}).items()}
    with tracking_uri_scope(uri):
        exp_id = ensure_experiment(uri, experiment)
        # called from inside a training run (train ... register: true): the register run nests under it
        with mlflow.start_run(experiment_id=exp_id, run_name=f"register-{name}",
                              nested=mlflow.active_run() is not None) as run:
            mlflow.set_tags({"varsr.checkpoint": str(ckpt.resolve()), **tags})
            info = log_pyfunc_model(ckpt, cfg, registered_model_name=name, validate_example=validate_example)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        version = info.registered_model_version
        if version is None:  # older clients: look it up by run
            found = client.search_model_versions(f"name='{name}' and run_id='{run.info.run_id}'")
            version = max(int(v.version) for v in found)
        for k, v in tags.items():
            client.set_model_version_tag(name, str(version), k, v)
        if alias:
            client.set_registered_model_alias(name, alias, str(version))
        mv = client.get_model_version(name, str(version))
    log.info("registered %s version %s%s (run %s) in %s", name, mv.version, f" @{alias}" if alias else "",
             run.info.run_id, uri)
    return mv
