"""The platform's MLflow conventions, shared by training, registration, evaluation, serving and the demo.

* **Store.** ``$MLFLOW_TRACKING_URI`` when set, else a local SQLite store in the current folder
  (``sqlite:///<cwd>/mlflow.db``), so a run, its registered model and the model server meet in the same store.
* **Experiment.** One per pipeline: the one named (config, or ``$MLFLOW_EXPERIMENT_NAME``), else a child run's
  parent's, else ``varsr``.
* **Artifact locations** are fixed when an experiment is created: for a SQLite store ``<store folder>/mlartifacts/
  <experiment>`` (relative to the store, never to the cwd or a run's output folder); a tracking server decides for
  itself (its proxied ``mlflow-artifacts:`` root). A SQLite store whose folder was moved or copied is re-pointed at
  its new place on first use (:func:`relocate_local_store`), so every artifact and model stays reachable.
* **Runs** are named for what they are (:func:`run_name`: ``stage2-isr tiny seed0 2026-11-30T12:37``) and created
  through :func:`start_run`, which nests them under a parent run (MLflow's ``mlflow.parentRunId``) given explicitly or
  through ``$VARSR_PARENT_RUN_ID`` (how a multi-stage launch such as the demo makes its commands' runs children).
* **References** to local files in tags, params and dataset sources are written relative to the run's folder
  (:func:`portable_ref`); URLs are kept as given.
"""

from __future__ import annotations

import getpass
import os
import posixpath
import re
import sqlite3
import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
DEFAULT_EXPERIMENT = "varsr"
PARENT_RUN_ENV = "VARSR_PARENT_RUN_ID"  # a parent run id for every run a command creates (multi-stage launches)
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"  # MLflow's own variable
ARTIFACT_LOCATION_TAG = "varsr.artifact_location"  # experiment tag: its artifact folder relative to a SQLite store
PARENT_TAG = "mlflow.parentRunId"  # MLflow's nesting key (the UI draws the run tree from it)
MAX_DIGEST = 36  # MLflow's limit on a dataset digest


# ---- store ----------------------------------------------------------------------------------------------------------
def default_tracking_uri() -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return f"sqlite:///{(Path.cwd() / DEFAULT_DB).resolve()}"


def default_experiment() -> str:
    """``$MLFLOW_EXPERIMENT_NAME``, else ``varsr``."""
    return os.environ.get(EXPERIMENT_ENV, "").strip() or DEFAULT_EXPERIMENT


def default_parent_run_id() -> str | None:
    """``$VARSR_PARENT_RUN_ID`` (set by a multi-stage launch for the commands it runs), else None."""
    return os.environ.get(PARENT_RUN_ENV, "").strip() or None


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, absolute (None for other stores)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    rest = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(rest) if rest.startswith("/") else (Path.cwd() / rest).resolve()


def store_dir(tracking_uri: str) -> Path | None:
    """The folder holding a SQLite store (None for a tracking server or other stores)."""
    db = sqlite_path(tracking_uri)
    return db.parent if db is not None else None


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """An explicit URI, else :func:`default_tracking_uri`; a moved SQLite store is re-pointed at its new folder."""
    uri = tracking_uri or default_tracking_uri()
    relocate_local_store(uri)
    return uri


def _folder_name(experiment: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"


def default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """For a SQLite store: ``<store folder>/mlartifacts/<experiment>`` (file URI); None lets a server decide."""
    d = store_dir(tracking_uri)
    if d is None:
        return None
    return (d / DEFAULT_ARTIFACTS / _folder_name(experiment)).as_uri()


def ensure_experiment(tracking_uri: str, name: str | None = None) -> str:
    """Experiment id of ``name`` (default :func:`default_experiment`), created when missing with its artifact
    location under the store (SQLite) or chosen by the server."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name = name or default_experiment()
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    d = store_dir(tracking_uri)
    tags = None
    if d is not None:
        d.mkdir(parents=True, exist_ok=True)
        tags = {ARTIFACT_LOCATION_TAG: f"{DEFAULT_ARTIFACTS}/{_folder_name(name)}"}
    try:
        return client.create_experiment(
            name, artifact_location=default_artifact_location(tracking_uri, name), tags=tags
        )
    except MlflowException:  # created meanwhile by a concurrent process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def relocate_local_store(tracking_uri: str) -> int:
    """Re-point a SQLite store that was moved (or copied) to another folder at its new place; returns the number of
    locations rewritten (0 when nothing moved, and for every other kind of store).

    Experiments created by :func:`ensure_experiment` carry their artifact folder relative to the store as a tag; when
    the recorded location no longer matches ``<store folder>/<that folder>``, every location recorded under the old
    store folder (experiments, runs, logged models, model versions, traces) is rewritten to the same place under the
    new one. MLflow keeps locations absolute, which is why the store needs this after a move.
    """
    d, sp = store_dir(tracking_uri), sqlite_path(tracking_uri)
    if d is None or sp is None or not (d / sp.name).is_file():
        return 0
    db = d / sp.name
    con = sqlite3.connect(db, timeout=60)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"experiments", "experiment_tags"} <= tables:
            return 0
        rows = con.execute(
            "SELECT e.artifact_location, t.value FROM experiments e JOIN experiment_tags t "
            "ON e.experiment_id = t.experiment_id WHERE t.key = ?",
            (ARTIFACT_LOCATION_TAG,),
        ).fetchall()
        old_roots = set()
        for location, rel in rows:
            expected = (d / rel).as_uri()
            if location and location != expected and location.endswith("/" + rel):
                old_roots.add(location[: -len(rel) - 1])  # the old store folder as a file URI
        if not old_roots:
            return 0
        columns = [
            ("experiments", "artifact_location"),
            ("runs", "artifact_uri"),
            ("logged_models", "artifact_location"),
            ("model_versions", "storage_location"),
            ("model_versions", "source"),
            ("trace_tags", "value"),
        ]
        new_uri, changed = d.as_uri(), 0
        with con:
            for old_uri in sorted(old_roots, key=len, reverse=True):
                old_path = old_uri[len("file://") :]
                for prefix, new in ((old_uri + "/", new_uri + "/"), (old_path + "/", str(d) + "/")):
                    for table, col in columns:
                        if table not in tables:
                            continue
                        cur = con.execute(
                            f"UPDATE {table} SET {col} = ? || substr({col}, ?) WHERE substr({col}, 1, ?) = ?",
                            (new, len(prefix) + 1, len(prefix), prefix),
                        )
                        changed += cur.rowcount
        if changed and "mlflow" in sys.modules:  # artifact repositories this process cached for the old places
            from mlflow.tracking._tracking_service import utils as trk_utils

            trk_utils._artifact_repos_cache.clear()
        return changed
    finally:
        con.close()


# ---- runs -----------------------------------------------------------------------------------------------------------
def run_name(kind: str, *details: Any, when: datetime | None = None) -> str:
    """``kind detail... YYYY-MM-DDTHH:MM`` (local time to the minute), e.g. ``stage2-isr tiny seed0 2026-11-30T12:37``.
    Empty details are left out."""
    stamp = (when or datetime.now()).strftime("%Y-%m-%dT%H:%M")
    return " ".join([kind, *(str(d) for d in details if d not in (None, "")), stamp])


def start_run(
    tracking_uri: str,
    name: str,
    *,
    experiment: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, Any] | None = None,
    source: str | None = None,
):
    """Create a named run (status RUNNING) and return it (an ``mlflow.entities.Run``).

    ``parent_run_id`` (default ``$VARSR_PARENT_RUN_ID``) nests it under that run. The experiment is ``experiment``,
    else ``$MLFLOW_EXPERIMENT_NAME``, else the parent's, else ``varsr``. ``source`` is what MLflow shows as the run's
    source (e.g. the command, ``varsr train isr``). The run is not made MLflow's active run: log with an
    ``MlflowClient``, or resume it with ``mlflow.start_run(run_id=...)``; end it with :func:`end_run`.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from infra.core.errors import UserError

    client = MlflowClient(tracking_uri=tracking_uri)
    parent = parent_run_id or default_parent_run_id()
    all_tags = {k: str(v) for k, v in (tags or {}).items()}
    if parent:
        try:
            parent_run = client.get_run(parent)
        except MlflowException:
            raise UserError(f"parent run {parent} is not in the tracking store {tracking_uri}") from None
        all_tags[PARENT_TAG] = parent
    experiment = experiment or os.environ.get(EXPERIMENT_ENV, "").strip() or None
    if experiment or not parent:
        exp_id = ensure_experiment(tracking_uri, experiment)
    else:
        exp_id = parent_run.info.experiment_id
    all_tags.setdefault("mlflow.user", _user())
    all_tags.setdefault("mlflow.source.type", "LOCAL")
    if source:
        all_tags.setdefault("mlflow.source.name", source)
    return client.create_run(exp_id, run_name=name, tags=all_tags)


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark a run made by :func:`start_run` FINISHED / FAILED / KILLED."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=tracking_uri).set_terminated(run_id, status)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


# ---- references and datasets ----------------------------------------------------------------------------------------
REPO_REF = "<repo>/"  # prefix of a file the repository ships (e.g. the shipped base model), see portable_ref
REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout (or installed source tree) this code runs from
# The repository's own top-level folders (README "Layout"): only files under these are "shipped". A user's work
# folder that happens to sit inside the checkout (`varsr demo --workdir varsr-demo`, the README's first command) is
# not one of them, so its files are recorded relative to the run like any other user folder.
SHIPPED_DIRS = ("model", "configs", "data_pipeline", "training", "inference", "infra", "benchmarks", "docs", "tests")


def _local(s: str) -> str:
    return s[len("file://") :] if s.startswith("file://") else s


def _is_url(s: str) -> bool:
    return "://" in s and not s.startswith("file://")


def shipped_relpath(path: str | os.PathLike) -> str | None:
    """``path``'s place in the repository (``model/pretrained/small4-base``) when it is a file the repository ships:
    inside :data:`REPO_ROOT` and under one of :data:`SHIPPED_DIRS`; else None."""
    a = os.path.abspath(_local(os.fspath(path)))
    root = os.fspath(REPO_ROOT)
    if os.path.commonpath([a, root]) != root or a == root:
        return None
    rel = os.path.relpath(a, root)
    return rel if rel.split(os.sep, 1)[0] in SHIPPED_DIRS else None


def portable_ref(ref: str | os.PathLike, base: str | os.PathLike) -> str:
    """How a run records a file or folder, so that no absolute local path ends up in a tag, a param, a dataset
    source or ``summary.json``; :func:`resolve_ref` turns it back into a location.

    * a URL (``s3://…``, ``http://…``): as given;
    * a file the repository ships (:func:`shipped_relpath`: under one of its own top-level folders, such as the base
      model ``model/pretrained/small4-base``): ``<repo>/`` + its path in the repository, so it still names the same
      file on another clone;
    * any other local path, including a user's work folder inside the checkout: relative to ``base`` (the run's
      folder), so the run, its store and its outputs can be moved or copied together;
    * a local path recorded by a run that lives in object storage: its base name (there is nothing to be relative to).
    """
    s = os.fspath(ref)
    if _is_url(s):
        return s
    path = _local(s)
    shipped = shipped_relpath(path)
    if shipped is not None:
        return REPO_REF + shipped.replace(os.sep, "/")
    b = os.fspath(base)
    if _is_url(b):  # a run in object storage referring to a local file
        return os.path.basename(os.path.normpath(path))
    return os.path.relpath(os.path.abspath(path), os.path.abspath(_local(b)))


def resolve_ref(ref: str | os.PathLike, base: str | os.PathLike) -> str:
    """Where a reference recorded by :func:`portable_ref` points now; the one reader of recorded references (the
    registry reading ``summary.json``, the storage layer for ``<repo>/`` paths given to serve, upscale, eval, resume
    and ``model.init_from``, the demo and the model card).

    * a URL: as recorded;
    * ``<repo>/X``: ``X`` in *this* checkout (:data:`REPO_ROOT`), wherever the recording one was;
    * an absolute local path (an older record, or one a user wrote): as recorded;
    * a relative path: joined to ``base``, the folder of the run that recorded it (where ``summary.json`` lies); a URL
      ``base`` gives a URL.
    """
    s = os.fspath(ref)
    if _is_url(s):
        return s
    if s.startswith(REPO_REF):
        return os.path.normpath(os.path.join(os.fspath(REPO_ROOT), *s[len(REPO_REF) :].split("/")))
    path = _local(s)
    if os.path.isabs(path):
        return os.path.normpath(path)
    b = os.fspath(base)
    if _is_url(b):
        scheme, rest = b.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, path.replace(os.sep, '/')))}"
    return os.path.normpath(os.path.join(os.path.abspath(_local(b)), path))


def dataset_input(
    source: str,
    digest: str,
    *,
    name: str | None = None,
    context: str | None = None,
    profile: dict | None = None,
    tags: dict[str, str] | None = None,
):
    """A dataset described by its metadata only (a shard manifest, a folder of image pairs), as the
    ``mlflow.entities.DatasetInput`` that ``MlflowClient.log_inputs`` takes: ``source`` is where it lives (a URL, or a
    path relative to the run's folder), ``digest`` its content hash (a sha256 is cut to MLflow's 36 characters; keep
    the full one in ``profile``), ``context`` e.g. ``training`` / ``validation`` / ``evaluation``."""
    import json

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    with warnings.catch_warnings():  # a local path matches MLflow's two local source types; both are the same
        warnings.simplefilter("ignore", UserWarning)
        src = resolve_dataset_source(source)
    name = name or os.path.basename(os.path.normpath(source.rstrip("/"))) or source
    entity = Dataset(
        name=name,
        digest=digest[:MAX_DIGEST],
        source_type=src._get_source_type(),
        source=src.to_json(),
        profile=json.dumps(profile) if profile is not None else None,
    )
    input_tags = [InputTag(key=k, value=str(v)) for k, v in (tags or {}).items()]
    if context:
        input_tags.append(InputTag(key=MLFLOW_DATASET_CONTEXT, value=context))
    return DatasetInput(dataset=entity, tags=input_tags)


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
