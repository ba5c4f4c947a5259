"""The start of every stage's tracked run (stage 0 in training/stage0_vqvae.py, stages 1-2 in training/trainer.py):
its lineage tags, the MLflow run with the resolved config as params, the shard manifests as dataset inputs and the
checkpoints it starts from as model inputs (training/tracking.py says what a run holds; docs/CONTRACTS.md).
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import torch

from data_pipeline.shards import ShardSet
from infra.core.errors import UserError
from infra.core.log import say
from infra.core.redact import redact
from infra.core.tracking import default_tracking_uri, portable_ref, run_name, sqlite_path
from training.config import TrackingSection
from training.tracking import (
    STAGE_RUN_KIND,
    MlflowTracker,
    NullTracker,
    checkpoint_lineage,
    lineage_tags,
    manifest_source,
    run_params,
)


def choose_device(name: str) -> torch.device:
    """A single-process stage's device (stage 0): ``auto`` = CUDA when one is visible, else the CPU; any other name
    as torch reads it (``cpu``, ``cuda``, ``cuda:1``), ``cuda`` refused in one line when no GPU is visible."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA device is visible")
    return torch.device(name)


def tracking_uri(t: TrackingSection) -> str:
    """The store a run logs to: ``tracking.tracking_uri``, else the platform default (infra/core/tracking.py)."""
    return t.tracking_uri or default_tracking_uri()


def run_lineage(stage: str, preset: str, config: Any, shards: ShardSet, run_url: str, t: TrackingSection) -> dict:
    """The lineage tags every stage sets (training/tracking.py: LINEAGE_KEYS) for a run writing to ``run_url``."""
    return lineage_tags(
        stage=stage,
        preset=preset,
        config=config,
        data_location=shards.location,
        manifest_sha256=shards.manifest_sha256,
        run_base=run_url,
        output_url=run_url,
        tracking_uri=tracking_uri(t),
    )


def shard_profile(shards: ShardSet) -> dict:
    """What the dataset input of a run says about its shards beyond source and digest."""
    return {
        "manifest_sha256": shards.manifest_sha256,
        "samples": shards.num_samples,
        "shards": len(shards.urls),
        "hr_size": shards.hr_size,
    }


def start_tracking(
    t: TrackingSection,
    *,
    stage: str,
    preset: str,
    seed: int,
    config: dict,
    tags: dict,
    run_url: str,
    datasets: Iterable[tuple[ShardSet | None, str]] = (),
    model_inputs: Iterable[str | None] = (),
    prefix: str = "[train]",
) -> NullTracker | MlflowTracker:
    """The run of one stage (a :class:`NullTracker` when ``tracking.enabled`` is off): named ``<stage kind> <preset>
    seed<N> <time>`` unless ``tracking.run_name`` says otherwise, nested under ``tracking.parent_run_id``, with
    ``config`` as params (local paths relative to ``run_url``), ``tags``, each ``(shards, context)`` of ``datasets``
    with a manifest as a dataset input and the logged models of ``model_inputs`` (checkpoint references) as model
    inputs; says where the run is (``prefix``: the stage's terminal tag)."""
    if not t.enabled:
        return NullTracker()
    uri = tracking_uri(t)
    name = t.run_name or run_name(STAGE_RUN_KIND[stage], preset, f"seed{seed}")
    tracker = MlflowTracker(
        uri,
        name,
        experiment=t.experiment,
        parent_run_id=t.parent_run_id,
        params=run_params(config, run_url),
        config=config,
        tags=tags,
        source=f"varsr train {stage}",
        system_metrics=t.system_metrics,
    )
    for shards, context in datasets:
        if shards is None or not shards.manifest_sha256:
            continue
        src = manifest_source(shards.location, run_url)
        if src is not None:
            tracker.log_dataset(
                src,
                shards.manifest_sha256,
                context=context,
                name=os.path.basename(os.path.normpath(shards.location.rstrip("/"))),
                profile=shard_profile(shards),
            )
    for ref in model_inputs:
        tracker.log_model_input(checkpoint_lineage(ref).get("mlflow_model_id"))
    say(f"{prefix} MLflow run {tracker.run_id} ({name}) at {redact(uri)}")
    return tracker


def store_ref(uri: str | None, output_url: str) -> dict:
    """How summary.json names the tracking store: a SQLite file relative to the output folder (they move together),
    any other store by its URI without credentials (``http://***@host``: infra/core/redact.py; the registry finds
    the full URI again in ``$MLFLOW_TRACKING_URI`` or ``--tracking-uri``)."""
    if uri is None:
        return {"tracking_uri": None}
    db = sqlite_path(uri)
    if db is None or "://" in output_url:
        return {"tracking_uri": redact(uri)}
    return {"tracking_store": portable_ref(db, output_url)}
