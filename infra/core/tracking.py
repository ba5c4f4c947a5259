"""The platform's one MLflow default: ``$MLFLOW_TRACKING_URI`` when set, else a local SQLite store in the current folder.

Training, registration, serving and evaluation all resolve the tracking URI here, so a run, its registered model and
the model server always meet in the same store (``sqlite:///<cwd>/mlflow.db``; artifacts beside it in ``mlartifacts/``).
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def default_tracking_uri() -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return f"sqlite:///{(Path.cwd() / DEFAULT_DB).resolve()}"


def default_artifact_root() -> Path:
    """Where a local store keeps artifacts of experiments it creates (next to the SQLite file)."""
    return (Path.cwd() / DEFAULT_ARTIFACTS).resolve()


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


class tracking_uri_scope:
    """``with tracking_uri_scope(uri):`` points MLflow's global tracking and registry URIs (and the env vars MLflow
    sets as a side effect) at ``uri``, and restores exactly the previous state afterwards."""

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
