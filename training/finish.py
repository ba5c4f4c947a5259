"""The end of a stage-1/2 run (the trainer in training/trainer.py): the exported native checkpoint, the ranks'
parameter checksums and the run's summary. Each function takes the :class:`training.trainer.Trainer` as ``t`` (not
imported here: the trainer imports this module).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from infra.core.config import save_config
from infra.core.log import say
from infra.core.redact import redact
from training.figures import plot_loss_curves
from training.run_start import store_ref
from training.tracking import STAGE_RUN_KIND, MlflowTracker

log = logging.getLogger(__name__)


def export_final(t, step: int) -> Path | None:
    """The final weights of trainer ``t`` in the native format (+ lineage) in ``final/``, logged as the run's model
    unless the run registers one; rank 0 writes."""
    import deepspeed

    from model import save_pretrained

    params = list(t.model.parameters())
    ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if t.cfg.zero_stage == 3 else None
    d = t.out / "final"
    if t.run.remote and d.exists():
        import shutil

        shutil.rmtree(d)
    if ctx is not None:
        ctx.__enter__()
    model = None
    try:
        if t.is_main:
            t.model.float()
            # the export becomes a logged model of this run, unless the CLI logs the served model at registration
            if not t.cfg.register.name and isinstance(t.tracker, MlflowTracker):
                model = t.tracker.create_model(
                    STAGE_RUN_KIND[t.cfg.stage],
                    model_type=f"varsr-{t.cfg.stage}-checkpoint",
                    tags=t.lineage(),
                )
            lineage = {
                **t.lineage(),
                "mlflow_run_id": t.tracker.run_id,
                "step": step,
                "mlflow_model_id": model.model_id if model else None,
            }
            save_pretrained(d, t.vqvae, t.model, extra={"lineage": lineage})
            save_config(t.cfg, d / "train_config.yaml")
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    if not t.is_main:
        return d
    t.tracker.log_artifact(d / "config.json", "final")
    t.tracker.log_artifact(d / "train_config.yaml", "final")
    t.run.publish_tree("final")
    export_ref = "final" if not t.run.remote else t.run.url_of("final")  # relative to the output folder
    t.tracker.set_tags({"varsr.export_dir": export_ref})
    if model is not None:
        t.tracker.log_checkpoint_model(
            model.name, d, model_id=model.model_id, weights=t.cfg.tracking.log_checkpoint, step=step
        )
    say(f"[train] exported final weights to {redact(t.run.url_of('final'))}")
    return d


@torch.no_grad()
def rank_checksums(t) -> list[float]:
    """sum(p) + sum(p²) over trainer ``t``'s parameters on every rank (all-gathered): ranks must agree after
    training."""
    if t.cfg.zero_stage == 3:
        return []
    s = sum(p.double().sum() + p.double().pow(2).sum() for p in t.model.parameters())
    mine = torch.tensor([float(s)], dtype=torch.float64, device=t.device)
    out = [torch.zeros_like(mine) for _ in range(t.world)]
    dist.all_gather(out, mine)
    vals = [float(x) for x in out]
    if t.is_main and max(vals) - min(vals) > 1e-6 * max(1.0, abs(vals[0])):
        log.warning("parameters differ across ranks: %s", vals)
    return vals


def write_summary(t, step: int, losses: list[float], wall: float, status: str) -> None:
    """The run's end on rank 0: the recorded degradation draws and loss curves as artifacts, ``summary.json``
    (written and published last: the run is done), the MLflow run ended, and the summary on the terminal."""
    if (t.out / "degradations.jsonl").is_file():  # data.degrade: the recorded draws (data_pipeline/degrade)
        t.tracker.log_artifact(t.out / "degradations.jsonl", "degradations")
    if t.history:
        png = plot_loss_curves(t.history, t.out / "plots" / "loss_curve.png")
        t.tracker.log_artifact(png, "plots")
    summary = {
        "status": status,
        "stage": t.cfg.stage,
        "steps": step,
        "wall_s": round(wall, 1),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "bad_samples": t.stream.pos.bad_samples if hasattr(t, "stream") else 0,
        "mlflow_run_id": t.tracker.run_id,
        **store_ref(getattr(t, "tracking_uri", None), t.run.url),
        "output_dir": redact(t.run.url) if t.run.remote else ".",
        "export_dir": (t.run.url_of("final") if t.run.remote else "final") if status == "FINISHED" else None,
        "world_size": t.world,
        "rank_param_checksums": getattr(t, "rank_checksums", []),
    }
    (t.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for rel in ("history.jsonl", "samples", "plots", "summary.json"):  # summary last: the run is done
        if (t.out / rel).is_dir():
            t.run.publish_tree(rel)
        elif (t.out / rel).is_file():
            t.run.publish(rel)
    t.tracker.log_artifact(t.out / "summary.json")
    t.tracker.end("FINISHED" if status == "FINISHED" else "FAILED")
    summary["output_dir"] = redact(t.run.url)  # on the terminal: where to look
    width = max(len(k) for k in summary)
    say("[train] summary\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in summary.items()))
