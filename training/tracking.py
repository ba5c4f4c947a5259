"""MLflow tracking for training runs (rank 0 only; every other rank gets a no-op tracker).

Logs the resolved config (artifact + flattened params), system info, per-step metrics, loss-curve and
LR | SR | HR sample-grid PNGs, and lineage tags (shard manifest sha256 + location, parent checkpoint / run,
git commit, config hash) so a registered model traces back to the data that trained it.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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


class NullTracker:
    """What non-zero ranks (and disabled tracking) get."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def log_artifact(self, path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    def __init__(self, tracking_uri: str, experiment: str, run_name: str | None, config: dict, tags: dict,
                 artifact_root: str | Path | None = None):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        if mlflow.get_experiment_by_name(experiment) is None:
            local = tracking_uri.startswith(("sqlite:", "file:", "/"))
            loc = Path(artifact_root).resolve().as_uri() if artifact_root and local else None
            mlflow.create_experiment(experiment, artifact_location=loc)
        mlflow.set_experiment(experiment)
        self.run = mlflow.start_run(run_name=run_name, tags=tags)
        self.run_id = self.run.info.run_id
        mlflow.log_params(flatten(config))
        mlflow.log_dict(config, "config/resolved_config.json")
        sysinfo = system_info()
        mlflow.log_dict(sysinfo, "system/info.json")
        mlflow.set_tags({f"sys.{k}": str(v) for k, v in sysinfo.items()})

    def log_metrics(self, metrics: dict, step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self.mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict) -> None:
        self.mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


# ---- plots ------------------------------------------------------------------------------------------------------------


def plot_loss_curves(history: list[dict], path: str | Path) -> Path:
    """Loss / CE / refiner loss / lr against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key in ("loss", "ce"):
        axes[0].plot(steps, [h[key] for h in history], label=key)
    val = [h for h in history if "val/loss" in h]
    if val:
        axes[0].plot([h["step"] for h in val], [h["val/loss"] for h in val], "o-", label="val/loss")
    axes[0].set_xlabel("step")
    axes[0].legend()
    axes[0].set_title("loss")
    axes[1].plot(steps, [h["diff"] for h in history], color="C2")
    axes[1].set_title("refiner loss")
    axes[1].set_xlabel("step")
    axes[2].plot(steps, [h["lr"] for h in history], color="C3")
    axes[2].set_title("learning rate")
    axes[2].set_xlabel("step")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def save_grid(rows: list[list], titles: list[str], path: str | Path) -> Path:
    """rows: per sample [img (3,H,W) in [0,1], ...] -> one PNG with a column per title (e.g. LR | SR | HR)."""
    import numpy as np
    from PIL import Image, ImageDraw

    tiles = [[(np.clip(t.detach().float().cpu().permute(1, 2, 0).numpy(), 0, 1) * 255).round().astype(np.uint8)
              for t in row] for row in rows]
    h, w = tiles[0][0].shape[:2]
    pad, head = 4, 14
    W = len(titles) * (w + pad) + pad
    H = head + len(tiles) * (h + pad) + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, t in enumerate(titles):
        draw.text((pad + j * (w + pad), 1), t, fill=(0, 0, 0))
    for i, row in enumerate(tiles):
        for j, img in enumerate(row):
            canvas.paste(Image.fromarray(img), (pad + j * (w + pad), head + pad + i * (h + pad)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return Path(path)
