"""Registering a checkpoint as ``models:/NAME@ALIAS`` (aliases such as ``@champion``, never stages).

A finished training run is registered from the run itself (:func:`register_training_run`): the served pyfunc model
is logged into that run as one of its models, so the run page shows it and the registered version's source run is
the run that trained it. A checkpoint from elsewhere gets a run of its own, named ``register NAME <time>``
(:func:`register_model` without ``run_id``). The store is ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlflow.db``
(infra/core/tracking.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path

from infra.core.redact import redact, restore
from infra.core.tracking import (
    default_tracking_uri,
    portable_ref,
    resolve_ref,
    resolve_tracking_uri,
    start_run,
    store_dir,
    tracking_uri_scope,
)
from infra.core.tracking import run_name as make_run_name

log = logging.getLogger(__name__)


def register_model(
    ckpt_dir: str | Path,
    name: str,
    alias: str | None = "champion",
    tracking_uri: str | None = None,
    tags: dict[str, str] | None = None,
    config=None,
    experiment: str | None = None,
    validate_example: bool = True,
    run_id: str | None = None,
    checkpoint_ref: str | None = None,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    sampling: dict | None = None,
):
    """Log ``ckpt_dir`` as the VARSR pyfunc model, register it under ``name`` and set ``alias``.

    The model is logged into ``run_id`` when given (the training run that produced the checkpoint: it becomes one of
    that run's models, without re-opening the run), else into a new run ``register NAME <time>`` in ``experiment``
    (default: the pipeline's), nested under ``parent_run_id`` / ``$VARSR_PARENT_RUN_ID``. ``tags`` (training
    lineage) go on the model version. ``checkpoint_ref`` is how the model records where its weights came from (a URL
    or a path relative to the tracking store; default: ``ckpt_dir`` relative to the store). ``config``: the
    InferenceConfig served with the model (limits, defaults); default configs/inference/default.yaml.
    ``sampling``: sampling defaults set at registration (``{"cfg": 0.75, "color_fix": "wavelet"}``), put key by key
    over the checkpoint's own ``sampling.json``; the logged model carries the result as its checkpoint's
    ``sampling.json`` (``ckpt_dir`` itself is left as it is). The version's tags ``varsr.sampling.*`` show the defaults
    a call without params gets, and ``varsr.sampling.source`` whether they are the model's (``model``) or the
    global ones (``global``).
    Returns the MLflow ModelVersion.
    """
    from mlflow.entities import LoggedModelOutput
    from mlflow.tracking import MlflowClient

    from model.checkpoint import read_sampling_defaults, require_native_checkpoint, validate_sampling_defaults

    from .config import load_inference_config
    from .mlflow_model import log_pyfunc_model

    ckpt = require_native_checkpoint(ckpt_dir)
    uri = resolve_tracking_uri(tracking_uri)
    cfg = config or load_inference_config()
    tags = {str(k): str(v) for k, v in (tags or {}).items()}
    given = validate_sampling_defaults(dict(sampling or {}), "sampling defaults given at registration")
    defaults = {**read_sampling_defaults(ckpt), **given}
    tags.update(sampling_tags(cfg.sampling, defaults))
    ref = checkpoint_ref or portable_ref(ckpt, store_dir(uri) or os.getcwd())
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    own_run = run_id is None
    if own_run:
        run = start_run(
            uri,
            run_name or make_run_name("register", name),
            experiment=experiment,
            parent_run_id=parent_run_id,
            tags={"varsr.stage": "register", "varsr.checkpoint": ref, **tags},
            source="varsr register",
        )
        run_id = run.info.run_id
    status = "FAILED"
    try:
        with tracking_uri_scope(uri):
            exp_id = client.get_run(run_id).info.experiment_id
            pending = client.create_logged_model(
                exp_id, name="model", source_run_id=run_id, model_type="varsr-pyfunc", tags={"varsr.checkpoint": ref}
            )
            with tempfile.TemporaryDirectory(prefix="varsr-register-") as tmp:
                src = _with_sampling(ckpt, Path(tmp) / ckpt.name, defaults) if given else ckpt
                info = log_pyfunc_model(
                    src,
                    cfg,
                    registered_model_name=name,
                    validate_example=validate_example,
                    model_id=pending.model_id,
                    checkpoint_ref=ref,
                )
            client.log_outputs(run_id, [LoggedModelOutput(info.model_id, 0)])  # the run page lists its models
        version = str(info.registered_model_version)
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)
        if alias:
            client.set_registered_model_alias(name, alias, version)
        mv = client.get_model_version(name, version)
        status = "FINISHED"
    finally:
        if own_run:
            client.set_terminated(run_id, status)
    log.info(
        "registered %s version %s%s (run %s) in %s",
        name,
        mv.version,
        f" @{alias}" if alias else "",
        run_id,
        redact(uri),
    )
    return mv


def sampling_tags(global_sampling, model_defaults: dict) -> dict[str, str]:
    """Model-version tags of the sampling defaults a call without params gets: ``varsr.sampling.<key>`` for each
    (the model's own over the global ones) and ``varsr.sampling.source`` (``model`` when it carries any)."""
    from .pipeline import effective_sampling

    eff = dataclasses.asdict(effective_sampling(global_sampling, model_defaults))
    return {
        **{f"varsr.sampling.{k}": str(v) for k, v in eff.items()},
        "varsr.sampling.source": "model" if model_defaults else "global",
    }


def _with_sampling(ckpt: Path, dest: Path, defaults: dict) -> Path:
    """A copy of the checkpoint folder ``ckpt`` at ``dest`` whose ``sampling.json`` holds ``defaults``: files are
    hard-linked where the file system allows (the weights are not copied), and the new sampling.json replaces its
    link, so ``ckpt`` is never changed."""
    from model.checkpoint import write_sampling_defaults

    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(ckpt, dest, copy_function=link_or_copy)
    write_sampling_defaults(dest, defaults)
    return dest


def register_training_run(
    output_dir: str | Path,
    name: str,
    alias: str | None = "champion",
    config=None,
    tracking_uri: str | None = None,
    sampling: dict | None = None,
):
    """Register the final weights of a finished training run (its ``summary.json`` names the export, the MLflow run
    and the tracking store): the model is logged into that training run, and the run's lineage tags (``varsr.*``)
    are copied onto the model version. ``sampling``: sampling defaults set at registration (:func:`register_model`;
    the training config's ``register.sampling``)."""
    import json
    import tempfile

    from mlflow.tracking import MlflowClient

    from infra.core import storage
    from infra.core.errors import UserError

    out = storage.absolute(output_dir)
    summary_url = storage.join(out, "summary.json")
    if not storage.exists(summary_url):
        raise UserError(f"{output_dir} has no summary.json: the training run did not finish")
    summary = json.loads(storage.read_text(summary_url))
    if summary.get("status") != "FINISHED" or not summary.get("export_dir"):
        raise UserError(f"training run in {output_dir} did not finish ({summary.get('status')}); nothing to register")
    uri = tracking_uri or restore(summary.get("tracking_uri"), default_tracking_uri())  # recorded without secret
    if uri is None and summary.get("tracking_store") and storage.is_local(out):  # a SQLite store beside the output
        uri = f"sqlite:///{resolve_ref(summary['tracking_store'], storage.local_path(out))}"
    uri = resolve_tracking_uri(uri)
    run_id = summary.get("mlflow_run_id")
    tags = {}
    if run_id:
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
        tags = {k: v for k, v in run.data.tags.items() if k.startswith("varsr.")}
        tags["varsr.train_run_id"] = run_id
    export = summary["export_dir"]
    if storage.is_local(export):  # relative to the run's folder, local or in object storage
        export = resolve_ref(export, out)
    if storage.is_local(export):
        ref = portable_ref(storage.local_path(export), store_dir(uri) or os.getcwd())
        return register_model(
            storage.local_path(export),
            name,
            alias,
            tracking_uri=uri,
            tags=tags,
            config=config,
            run_id=run_id,
            checkpoint_ref=ref,
            sampling=sampling,
        )
    with tempfile.TemporaryDirectory(prefix="varsr-export-") as tmp:  # the export lives in object storage
        storage.get_tree(export, tmp)
        return register_model(
            tmp,
            name,
            alias,
            tracking_uri=uri,
            tags=tags,
            config=config,
            run_id=run_id,
            checkpoint_ref=export,
            sampling=sampling,
        )
