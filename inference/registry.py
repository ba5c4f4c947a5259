"""MLflow tracking/registry helpers: the default local store, and registering a checkpoint as ``models:/NAME@ALIAS``.

Default store (no setup): ``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlartifacts``; ``MLFLOW_TRACKING_URI``
wins when set. Registered models use aliases (``@champion``), never stages.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)

from infra.tracking import DEFAULT_ARTIFACTS, DEFAULT_DB, default_tracking_uri  # noqa: F401 - the platform default

DEFAULT_EXPERIMENT = "varsr-models"


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """An explicit URI, else :func:`default_tracking_uri`."""
    return tracking_uri or default_tracking_uri()


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(urlparse(tracking_uri).path)


def default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """For a local SQLite store: ``<db folder>/mlartifacts/<experiment>`` (file URI); None lets the server decide."""
    db = sqlite_path(tracking_uri)
    if db is None:
        return None
    return (db.parent / DEFAULT_ARTIFACTS / experiment).resolve().as_uri()


def ensure_experiment(tracking_uri: str, name: str = DEFAULT_EXPERIMENT) -> str:
    """Experiment id of ``name``, created (artifacts beside a local SQLite store) when missing."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    db = sqlite_path(tracking_uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(name, artifact_location=default_artifact_location(tracking_uri, name))


class _TrackingUri:
    """Context manager: point MLflow's global tracking + registry URIs (and their env vars, which MLflow sets as a
    side effect) at ``uri``; restore exactly the previous state afterwards."""

    _ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")

    def __init__(self, uri: str):
        self.uri = uri

    def __enter__(self):
        import mlflow
        from mlflow.tracking._model_registry import utils as reg_utils
        from mlflow.tracking._tracking_service import utils as trk_utils

        self.saved = (trk_utils._tracking_uri, reg_utils._registry_uri, {k: os.environ.get(k) for k in self._ENV})
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        return self

    def __exit__(self, *exc):
        import mlflow
        from mlflow.tracking._model_registry import utils as reg_utils

        tracking, registry, env = self.saved
        mlflow.set_tracking_uri(tracking)
        reg_utils._registry_uri = registry
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        return False


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
        from infra.errors import UserError

        raise UserError(f"{ckpt} is not a native VARSR checkpoint (needs model.safetensors + config.json)")
    uri = resolve_tracking_uri(tracking_uri)
    cfg = config or load_inference_config()
    tags = {str(k): str(v) for k, v in (tags or {}).items()}
    with _TrackingUri(uri):
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
