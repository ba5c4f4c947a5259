"""MLflow tracking for training runs (rank 0 only; every other rank gets a no-op tracker).

A training run is a named MLflow run (``stage2-isr tiny seed0 2026-11-30T12:37``), nested under a parent run when
one is given (``tracking.parent_run_id`` or ``$VARSR_PARENT_RUN_ID``), in the pipeline's experiment. It holds:

* params: the resolved config, flattened, with local paths written relative to the run's output folder;
* the same lineage tags on every stage (:data:`LINEAGE_KEYS`): stage, model preset, config hash, git commit, shard
  manifest sha256 and location, the output folder, and the runs/checkpoints it starts from;
* dataset inputs: the shard manifest (``log_inputs``: its sha256 as digest, its URL as source), and the models it
  starts from as model inputs (the tokenizer of stage 0, the stage-1 export for stage 2);
* metrics under one vocabulary (``loss/total``, ``loss/ce``, ``loss/refiner``, ``acc/scale_k``, ``lr``,
  ``throughput/tokens_per_s``, ``val/...``), system metrics (CPU, memory, disk, network, GPU where present);
* artifacts: config files, sample grids and loss curves (training/figures.py), the summary;
* its export as a logged model (:meth:`MlflowTracker.log_checkpoint_model`) unless the CLI logs the served model
  into the run at registration.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from infra.core.config import config_hash
from infra.core.redact import redact, redact_config
from infra.core.tracking import portable_ref, store_dir
from training.figures import grid_tiles  # noqa: F401 - re-exported: tools and tests read a run's grids from here

log = logging.getLogger(__name__)

STAGE_RUN_KIND = {"vqvae": "stage0-vqvae", "c2i": "stage1-c2i", "isr": "stage2-isr"}
LINEAGE_KEYS = (
    "varsr.stage",
    "varsr.model_preset",
    "varsr.config_hash",
    "varsr.git_commit",
    "varsr.data.location",
    "varsr.data.manifest_sha256",
    "varsr.output_dir",
)
PATH_PARAMS_SKIPPED = ("tracking.tracking_uri",)  # the store the run lives in: not a property of the run


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "training", "model"],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        sha = out.stdout.strip() or "unknown"
        return sha + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def system_info() -> dict[str, Any]:
    import torch

    info = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception:  # noqa: BLE001
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return {k: v[:500] for k, v in out.items()}


def _is_local_abs(s: str) -> bool:
    return s.startswith("/") or s.startswith("file://")


def portable_value(value: str, base: str) -> str:
    """A config value as a run records it: absolute local paths (also inside a comma list) relative to ``base``."""
    if "{" in value or not value:
        return value
    parts = value.split(",")
    if not any(_is_local_abs(p.strip()) for p in parts):
        return value
    return ",".join(portable_ref(p.strip(), base) if _is_local_abs(p.strip()) else p for p in parts)


def portable_location(location: str, base: str) -> str:
    """A data location (folder, URL, glob, brace pattern or comma list) with every local part relative to ``base``."""
    parts = [location] if "{" in location else location.split(",")
    return ",".join(p if "://" in p and not p.startswith("file://") else portable_ref(p.strip(), base) for p in parts)


def run_params(config: dict, base: str) -> dict[str, str]:
    """The flattened config as params, with local paths relative to the run's folder ``base``."""
    return {k: portable_value(v, base) for k, v in flatten(config).items() if k not in PATH_PARAMS_SKIPPED}


def output_ref(output_url: str, tracking_uri: str) -> str:
    """Where a run's output folder is, as its ``varsr.output_dir`` tag says: a URL as given; a local folder relative
    to the SQLite store's folder (both move together), else relative to the folder the run was launched from."""
    if "://" in output_url and not output_url.startswith("file://"):
        return output_url
    d = store_dir(tracking_uri)
    return portable_ref(output_url, d if d is not None else os.getcwd())


def lineage_tags(
    *,
    stage: str,
    preset: str,
    config: Any,
    data_location: str,
    manifest_sha256: str | None,
    run_base: str,
    output_url: str,
    tracking_uri: str,
) -> dict[str, str]:
    """The lineage tags every stage sets (:data:`LINEAGE_KEYS`), plus MLflow's own git-commit key."""
    commit = git_commit()
    tags = {
        "varsr.stage": stage,
        "varsr.model_preset": preset,
        "varsr.config_hash": config_hash(config),
        "varsr.git_commit": commit,
        "varsr.data.location": portable_location(data_location, run_base),
        "varsr.data.manifest_sha256": manifest_sha256 or "none",
        "varsr.output_dir": output_ref(output_url, tracking_uri),
    }
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    return tags


def manifest_source(location: str, run_base: str) -> str | None:
    """The shard manifest of a dataset folder / URL, as a dataset source (URL, or path relative to the run)."""
    from data_pipeline.shards import manifest_ref
    from infra.core import storage

    url = manifest_ref(location)
    if url is None:
        return None
    return url if not storage.is_local(url) else portable_ref(storage.local_path(url), run_base)


def checkpoint_lineage(ref: str | None) -> dict:
    """The ``lineage`` a native checkpoint folder (local or URL) recorded in its ``config.json`` ({} if none), read by
    the checkpoint format's owner (model/checkpoint.py); a URL is read from the local copy the run loads it from."""
    if not ref:
        return {}
    from model.checkpoint import read_metadata
    from training.model_setup import local_checkpoint

    try:
        meta = read_metadata(local_checkpoint(ref))
    except Exception:  # noqa: BLE001 - an official .pth, a missing folder: no lineage to follow
        return {}
    lineage = meta.get("lineage")
    return lineage if isinstance(lineage, dict) else {}


class NullTracker:
    """What non-zero ranks (and disabled tracking) get."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def log_artifact(self, path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_dataset(self, source: str, digest: str, **kw) -> None: ...
    def log_model_input(self, model_id: str | None) -> bool:
        return False

    def log_checkpoint_model(self, name: str, folder, **kw) -> str | None:
        return None

    def end(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    """One training run, logged through an ``MlflowClient`` bound to its store (MLflow's global state is untouched).

    ``name``: the run name; ``params``: already flattened; ``config``: logged as ``config/resolved_config.json``;
    ``tags``: lineage; ``system_metrics``: CPU / memory / disk / network (and GPU with NVML) every
    ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (default 10) as ``system/...`` metrics. Every param, tag,
    dataset source and the config go through infra/core/redact.py on their way in, so no credential of a URI (the
    tracking URI, a signed data URL) reaches the store.
    """

    def __init__(
        self,
        tracking_uri: str,
        name: str,
        *,
        experiment: str | None = None,
        parent_run_id: str | None = None,
        params: dict[str, str] | None = None,
        config: dict | None = None,
        tags: dict | None = None,
        source: str | None = None,
        system_metrics: bool = True,
    ):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        from infra.core.tracking import start_run

        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        run = start_run(
            tracking_uri,
            name,
            experiment=experiment,
            parent_run_id=parent_run_id,
            tags={k: redact(str(v)) for k, v in (tags or {}).items()},
            source=source,
        )
        self.run_id, self.experiment_id, self.name = run.info.run_id, run.info.experiment_id, name
        items = [Param(k, redact(v)) for k, v in (params or {}).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        if config is not None:
            self.client.log_dict(self.run_id, redact_config(config), "config/resolved_config.json")
        sysinfo = system_info()
        self.client.log_dict(self.run_id, sysinfo, "system/info.json")
        self.set_tags({f"sys.{k}": v for k, v in sysinfo.items()})
        self.monitor = None
        if system_metrics:
            self.monitor = _system_monitor(self.run_id, tracking_uri)

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, redact(str(v))[:8000]) for k, v in tags.items()])

    def log_dataset(
        self,
        source: str,
        digest: str,
        *,
        name: str | None = None,
        context: str = "training",
        profile: dict | None = None,
    ) -> None:
        """A dataset input of the run (e.g. the shard manifest: source = its URL, digest = its sha256)."""
        from infra.core.tracking import dataset_input

        self.client.log_inputs(
            self.run_id, datasets=[dataset_input(redact(source), digest, name=name, context=context, profile=profile)]
        )

    def log_model_input(self, model_id: str | None) -> bool:
        """Record a logged model (e.g. the stage-1 export) as an input of this run; False if it is not in this
        store."""
        from mlflow.entities import LoggedModelInput
        from mlflow.exceptions import MlflowException

        if not model_id:
            return False
        try:
            self.client.get_logged_model(model_id)
        except MlflowException:
            log.info("model %s is not in this tracking store: not linked as an input", model_id)
            return False
        self.client.log_inputs(self.run_id, models=[LoggedModelInput(model_id)])
        return True

    def create_model(self, name: str, *, model_type: str, tags: dict | None = None, params: dict | None = None):
        """A pending logged model of this run (its id can go into the export before the files are uploaded)."""
        return self.client.create_logged_model(
            self.experiment_id,
            name=name,
            source_run_id=self.run_id,
            tags={k: redact(str(v)) for k, v in (tags or {}).items()},
            params={k: redact(str(v)) for k, v in (params or {}).items()},
            model_type=model_type,
        )

    def log_checkpoint_model(
        self,
        name: str,
        folder,
        *,
        model_id: str | None = None,
        model_type: str = "varsr",
        tags: dict | None = None,
        weights: bool = True,
        step: int = 0,
    ) -> str:
        """Upload a native checkpoint folder as a logged model of this run (shown on the run page, usable as a
        model input by later stages); ``weights=False`` uploads only the small files (config, lineage) and records
        where the weights are in the ``varsr.weights`` tag. Returns the model id."""
        import tempfile

        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        if model_id is None:
            model_id = self.create_model(name, model_type=model_type, tags=tags).model_id
        folder = Path(folder)
        if weights:
            self.client.log_model_artifacts(model_id, str(folder))
        else:
            with tempfile.TemporaryDirectory(prefix="varsr-model-") as tmp:
                for f in folder.iterdir():
                    if f.is_file() and f.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
                        Path(tmp, f.name).write_bytes(f.read_bytes())
                self.client.log_model_artifacts(model_id, tmp)
        self.client.finalize_logged_model(model_id, LoggedModelStatus.READY)
        self.client.log_outputs(self.run_id, [LoggedModelOutput(model_id, step)])
        return model_id

    def end(self, status: str = "FINISHED") -> None:
        if self.monitor is not None:
            m, self.monitor = self.monitor, None
            m.finish()  # the sampler drops what it gathered since its last publish: publish one last sample, so a
            try:  # run shorter than the sampling interval still records its CPU and memory
                m.collect_metrics()
                m.publish_metrics(m.aggregate_metrics())
                m.mlflow_logger.flush()
            except Exception as e:  # noqa: BLE001 - metrics about the machine must never fail a run
                log.warning("last system-metrics sample not logged: %s", e)
        self.client.set_terminated(self.run_id, status)


def _system_monitor(run_id: str, tracking_uri: str):
    """MLflow's system-metrics sampler for this run (None if it cannot start, e.g. without psutil)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        m = SystemMetricsMonitor(run_id, tracking_uri=tracking_uri)
        m.start()
        return m
    except Exception as e:  # noqa: BLE001 - metrics about the machine must never stop a training run
        log.warning("system metrics are off: %s", e)
        return None
