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
* artifacts: config files, sample grids (:func:`save_grid`), loss curves (:func:`plot_loss_curves`), the summary;
* its export as a logged model (:meth:`MlflowTracker.log_checkpoint_model`) unless the CLI logs the served model
  into the run at registration.
"""
from __future__ import annotations

import json
import logging
import math
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

log = logging.getLogger(__name__)

STAGE_RUN_KIND = {"vqvae": "stage0-vqvae", "c2i": "stage1-c2i", "isr": "stage2-isr"}
LINEAGE_KEYS = ("varsr.stage", "varsr.model_preset", "varsr.config_hash", "varsr.git_commit",
                "varsr.data.location", "varsr.data.manifest_sha256", "varsr.output_dir")
PATH_PARAMS_SKIPPED = ("tracking.tracking_uri",)  # the store the run lives in: not a property of the run


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "training", "model"],
                               cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=10)
        sha = out.stdout.strip() or "unknown"
        return sha + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def system_info() -> dict[str, Any]:
    import torch

    info = {
        "host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available(),
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


def lineage_tags(*, stage: str, preset: str, config: Any, data_location: str, manifest_sha256: str | None,
                 run_base: str, output_url: str, tracking_uri: str) -> dict[str, str]:
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
    from infra.core import storage

    if any(c in location for c in ",{*?[") or location.endswith(".tar"):
        return None
    url = storage.join(location, "manifest.json")
    return url if not storage.is_local(url) else portable_ref(storage.local_path(url), run_base)


def checkpoint_lineage(ref: str | None) -> dict:
    """The ``lineage`` a native checkpoint folder (local or URL) recorded in its ``config.json`` ({} if none)."""
    if not ref:
        return {}
    from infra.core import storage

    try:
        meta = json.loads(storage.read_text(storage.join(ref, "config.json")))
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
    def log_model_input(self, model_id: str | None) -> bool: return False
    def log_checkpoint_model(self, name: str, folder, **kw) -> str | None: return None
    def end(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    """One training run, logged through an ``MlflowClient`` bound to its store (MLflow's global state is untouched).

    ``name``: the run name; ``params``: already flattened; ``config``: logged as ``config/resolved_config.json``;
    ``tags``: lineage; ``system_metrics``: CPU / memory / disk / network (and GPU with NVML) every
    ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (default 10) as ``system/...`` metrics. Every param, tag,
    dataset source and the config go through infra/core/redact.py on their way in, so no credential of a URI (the
    tracking URI, a signed data URL) reaches the store.
    """

    def __init__(self, tracking_uri: str, name: str, *, experiment: str | None = None,
                 parent_run_id: str | None = None, params: dict[str, str] | None = None, config: dict | None = None,
                 tags: dict | None = None, source: str | None = None, system_metrics: bool = True):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        from infra.core.tracking import start_run

        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        run = start_run(tracking_uri, name, experiment=experiment, parent_run_id=parent_run_id,
                        tags={k: redact(str(v)) for k, v in (tags or {}).items()}, source=source)
        self.run_id, self.experiment_id, self.name = run.info.run_id, run.info.experiment_id, name
        items = [Param(k, redact(v)) for k, v in (params or {}).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])
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
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, redact(str(v))[:8000]) for k, v in tags.items()])

    def log_dataset(self, source: str, digest: str, *, name: str | None = None, context: str = "training",
                    profile: dict | None = None) -> None:
        """A dataset input of the run (e.g. the shard manifest: source = its URL, digest = its sha256)."""
        from infra.core.tracking import dataset_input

        self.client.log_inputs(self.run_id, datasets=[dataset_input(redact(source), digest, name=name,
                                                                    context=context, profile=profile)])

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
        return self.client.create_logged_model(self.experiment_id, name=name, source_run_id=self.run_id,
                                               tags={k: redact(str(v)) for k, v in (tags or {}).items()},
                                               params={k: redact(str(v)) for k, v in (params or {}).items()},
                                               model_type=model_type)

    def log_checkpoint_model(self, name: str, folder, *, model_id: str | None = None, model_type: str = "varsr",
                             tags: dict | None = None, weights: bool = True, step: int = 0) -> str:
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
            try:        # run shorter than the sampling interval still records its CPU and memory
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


# ---- plots -----------------------------------------------------------------------------------------------------------
def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [h for h in history if h.get(key) is not None and math.isfinite(float(h[key]))]
    return [h["step"] for h in rows], [float(h[key]) for h in rows]


def plot_curves(history: list[dict], panels: list[tuple[str, list[str]]], path: str | Path,
                log_panels: tuple[str, ...] = ()) -> Path:
    """One panel per ``(title, [metric keys])`` against step (keys missing from the history are left out; a key seen
    only at some steps, such as ``val/...``, is drawn with markers). The figure is saved with its titles and labels
    inside the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, [k for k in keys if _series(history, k)[0]]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 3.8), squeeze=False,
                             layout="constrained")
    n_steps = len(history)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            xs, ys = _series(history, k)
            sparse = len(xs) < max(2, n_steps // 2)
            ax.plot(xs, ys, "o-" if sparse else "-", label=k, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        if title in log_panels:
            ax.set_yscale("log")
        if len(keys) > 1:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return Path(path)


def plot_loss_curves(history: list[dict], path: str | Path) -> Path:
    """Stage 1/2: losses (train and validation), refiner loss, learning rate, validation PSNR-Y against step."""
    return plot_curves(history, [("loss", ["loss/total", "loss/ce", "val/loss"]),
                                 ("refiner loss", ["loss/refiner"]),
                                 ("learning rate", ["lr"]),
                                 ("validation PSNR-Y (dB)", ["val/psnr_y"])], path)


# ---- sample grids ----------------------------------------------------------------------------------------------------
GRID_META_KEY = "varsr.grid"  # PNG text chunk: the tile boxes, so tools (and tests) can cut the tiles back out


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def save_grid(rows: list[list], titles: list[str], path: str | Path, row_labels: list[str] | None = None,
              min_tile: int = 128) -> Path:
    """rows: per sample ``[img (3,H,W) in [0,1], ...]`` -> one PNG with a column per title (e.g. LR | SR | HR).

    Tiles smaller than ``min_tile`` pixels are enlarged by an integer factor with nearest-neighbour (pixels stay
    pixels, so LR / SR / HR differences show); each column is at least as wide as its header, headers are centred
    above their column, and each row gets its label (``row_labels``) above its tiles. The tile boxes are stored in
    the PNG's ``varsr.grid`` text chunk (see :func:`grid_tiles`).
    """
    import numpy as np
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    tiles = [[(np.clip(t.detach().float().cpu().permute(1, 2, 0).numpy(), 0, 1) * 255).round().astype(np.uint8)
              for t in row] for row in rows]
    h, w = tiles[0][0].shape[:2]
    k = max(1, math.ceil(min_tile / max(1, min(h, w))))
    th, tw = h * k, w * k
    head_font, label_font = _font(15), _font(13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str, font) -> tuple[float, float]:
        x0, y0, x1, y1 = probe.textbbox((0, 0), text, font=font)
        return x1 - x0, y1 - y0

    pad, gap = 8, 12
    col_w = [max(tw, text_size(t, head_font)[0] + 2 * pad) for t in titles]
    head_h = max(text_size(t, head_font)[1] for t in titles) + 2 * pad
    label_h = (max(text_size(lbl, label_font)[1] for lbl in row_labels) + pad) if row_labels else 0
    label_w = max((text_size(lbl, label_font)[0] for lbl in row_labels), default=0) if row_labels else 0
    W = max(sum(col_w) + gap * (len(titles) - 1) + 2 * pad, label_w + 2 * pad)
    H = head_h + len(tiles) * (label_h + th + gap) + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    xs, x = [], pad
    for cw in col_w:
        xs.append(x)
        x += cw + gap
    for j, t in enumerate(titles):
        tw_, _ = text_size(t, head_font)
        draw.text((xs[j] + (col_w[j] - tw_) // 2, pad), t, fill=(0, 0, 0), font=head_font)
    boxes = []
    y = head_h
    for i, row in enumerate(tiles):
        if row_labels:
            draw.text((pad, y), row_labels[i], fill=(60, 60, 60), font=label_font)
            y += label_h
        row_boxes = []
        for j, img in enumerate(row):
            x0 = xs[j] + (col_w[j] - tw) // 2
            canvas.paste(Image.fromarray(img).resize((tw, th), Image.Resampling.NEAREST), (x0, y))
            row_boxes.append([x0, y, x0 + tw, y + th])
        boxes.append(row_boxes)
        y += th + gap
    info = PngInfo()
    info.add_text(GRID_META_KEY, json.dumps({"titles": titles, "rows": row_labels, "scale": k, "tiles": boxes}))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, pnginfo=info)
    return Path(path)


def grid_tiles(path: str | Path) -> tuple[dict, list[list]]:
    """Read a grid written by :func:`save_grid`: (its metadata, per row the tiles as HxWx3 uint8 arrays)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        meta = json.loads(im.text[GRID_META_KEY])
        a = np.asarray(im.convert("RGB"))
    return meta, [[a[y0:y1, x0:x1] for x0, y0, x1, y1 in row] for row in meta["tiles"]]
