"""The platform's one MLflow default: ``$MLFLOW_TRACKING_URI`` when set, else a local SQLite store in the current folder.

Training, registration, serving and evaluation all resolve the tracking URI here, so a run, its registered model and
the model server always meet in the same store (``sqlite:///<cwd>/mlflow.db``; artifacts beside it in ``mlartifacts/``).
"""
from __future__ import annotations

import os
from pathlib import Path

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
