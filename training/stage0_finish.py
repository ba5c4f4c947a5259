"""The end of a stage-0 run (the tokenizer, docs/MODEL.md §1; the trainer in training/stage0_vqvae.py): the
reconstruction grid and the colour check on held-out crops, the loss curves, and the exported tokenizer-only
checkpoint logged as the run's model. Split from the training loop as stages 1-2 keep theirs in training/finish.py."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from data_pipeline.shards import BatchStream, ShardSet, resolve_shards
from infra.core.log import summary
from infra.core.metrics import chroma_fidelity
from training.config import VQVAETrainConfig
from training.figures import plot_curves, save_grid
from training.tracking import STAGE_RUN_KIND, MlflowTracker
from training.validation import distinct_samples

# the panels of stage 0's loss-curve figure (training/figures.py)
CURVES = [
    ("tokenizer losses", ["loss/total", "loss/l1", "loss/mse", "loss/vq", "loss/lowpass", "loss/highpass"]),
    ("adversarial losses", ["loss/generator", "loss/critic"]),
    ("reconstruction PSNR (dB)", ["recon/psnr"]),
    ("codebook usage (%)", ["codebook/usage_pct"]),
]


def finish_run(
    cfg: VQVAETrainConfig, vqvae, mcfg, shards: ShardSet, dev: torch.device, out: Path, tracker, history: list[dict]
) -> tuple[dict, Path, str | None]:
    """The end of the run: the reconstruction grid and colour check on held-out crops, the loss curves, and the
    export; (colour check as stored in the export, export folder, logged model id)."""
    vqvae.eval()
    val = resolve_shards(cfg.data.val_shards) if cfg.data.val_shards else shards
    grid, colour = reconstruction_grid(vqvae, mcfg, val, cfg, dev, out / "samples" / "reconstructions.png")
    tracker.log_metrics({f"eval/{k}": v for k, v in colour.items() if k != "images"}, step=len(history))
    report_colour(colour)
    # NaN (no slope to measure) is stored as null: config.json stays standard JSON
    colour = {
        **{k: (None if v != v else v) for k, v in colour.items()},
        "min_chroma_gain": MIN_CHROMA_GAIN,
        "verdict": colour_verdict(colour),
    }
    curve = plot_curves(history, CURVES, out / "plots" / "loss_curve.png", log_panels=("tokenizer losses",))
    tracker.log_artifact(grid, "samples")
    tracker.log_artifact(curve, "plots")
    export, model_id = export_tokenizer(vqvae, mcfg, cfg, shards, out, tracker, len(history), colour)
    return colour, export, model_id


# Below this chroma gain of the token-only decode the tokenizer has lost colour (every image decodes with about the
# same tint): stage 1/2 trained on its tokens cannot produce colour either (docs/EXPERIMENTS.md).
MIN_CHROMA_GAIN = 0.5


def colour_verdict(colour: dict) -> str:
    """``kept`` / ``lost`` by the token-only decode's chroma gain, ``undetermined`` when it is NaN (too few or
    identical colours among the checked crops)."""
    g = colour["chroma_gain_tokens"]
    if g != g:
        return "undetermined"
    return "kept" if g >= MIN_CHROMA_GAIN else "lost"


def report_colour(colour: dict) -> None:
    """The end-of-run colour check: one summary line, and a warning line when the tokens lost colour."""
    summary(
        f"[vqvae] colour on {colour['images']} held-out crops: chroma gain {colour['chroma_gain_tokens']:.2f} "
        f"tokens only / {colour['chroma_gain']:.2f} reconstruction (1 = kept, 0 = lost), mean chroma error "
        f"{colour['chroma_err_tokens']:.3f}"
    )
    if colour_verdict(colour) == "lost":
        summary(
            f"[vqvae] WARNING: the tokenizer does not reproduce colour (chroma gain "
            f"{colour['chroma_gain_tokens']:.2f} < {MIN_CHROMA_GAIN}); a model trained on its tokens decodes "
            f"near-grey images (docs/EXPERIMENTS.md)"
        )


@torch.no_grad()
def reconstruction_grid(
    vqvae, mcfg, shards: ShardSet, cfg: VQVAETrainConfig, dev: torch.device, path: Path
) -> tuple[Path, dict]:
    """HR | reconstruction | tokens only (the K-scale codes alone, the path the transformer sees) for
    ``grid_images`` distinct samples (training/validation.py: distinct_samples), and the colour check
    (:func:`infra.core.metrics.chroma_fidelity` of both decodes) on ``colour_check_images`` distinct crops."""
    stream = BatchStream(
        shards,
        size=mcfg.image_size,
        want_lr=False,
        batch_size=cfg.data.batch_size,
        workers=0,
        seed=cfg.seed,
        rank=0,
        world=1,
        shuffle_buffer=0,
    )
    picked = distinct_samples(stream, max(1, cfg.grid_images, cfg.colour_check_images))
    x = torch.stack([p["hr"] for p in picked]).to(dev)
    rec = (vqvae(x * 2 - 1)[0].clamp(-1, 1) + 1) / 2
    idx, _ = vqvae.img_to_idxBl(x * 2 - 1)
    f_hat = torch.zeros_like(vqvae.encode(x * 2 - 1))
    for si, pn in enumerate(mcfg.patch_nums):
        h = vqvae.embed_idx(idx[si]).transpose(1, 2).reshape(x.shape[0], -1, pn, pn)
        f_hat, _ = vqvae.get_next_autoregressive_input(si, f_hat, h)
    tok = (vqvae.fhat_to_img(f_hat).clamp(-1, 1) + 1) / 2
    colour = {
        "images": len(picked),
        **chroma_fidelity(x, rec),
        **{f"{k}_tokens": v for k, v in chroma_fidelity(x, tok).items()},
    }
    g = max(1, cfg.grid_images)
    labels = [
        f"{key[-28:]}   rec PSNR {10 * math.log10(1.0 / max(float(((r - a) ** 2).mean()), 1e-12)):.2f} dB"
        for (a, key), r in zip(((x[i], picked[i]["key"]) for i in range(min(g, len(picked)))), rec)
    ]
    grid = save_grid(
        [[a, b, c] for a, b, c in list(zip(x, rec, tok))[:g]],
        ["HR", "reconstruction", "tokens only"],
        path,
        row_labels=labels,
    )
    return grid, colour


def export_tokenizer(vqvae, mcfg, cfg: VQVAETrainConfig, shards: ShardSet, out: Path, tracker, step: int, colour: dict):
    """The tokenizer-only checkpoint in ``final/`` (lineage and the colour check inside its config.json, where
    `varsr demo pretrain` reads it), logged as the run's model; (folder, model id)."""
    from model.checkpoint import save_tokenizer

    model = None
    if isinstance(tracker, MlflowTracker):
        model = tracker.create_model(
            STAGE_RUN_KIND["vqvae"],
            model_type="varsr-vqvae-checkpoint",
            tags={"varsr.stage": "vqvae", "varsr.model_preset": mcfg.name},
        )
    lineage = {
        "mlflow_run_id": tracker.run_id,
        "mlflow_model_id": model.model_id if model else None,
        "varsr.data.manifest_sha256": shards.manifest_sha256,
        "step": step,
        **(
            {"varsr.tokenizer.init_from": cfg.init_from, "varsr.tokenizer.train_parts": cfg.train_parts}
            if cfg.init_from
            else {}
        ),
    }
    export = save_tokenizer(out / "final", vqvae.cpu(), mcfg, extra={"lineage": lineage, "colour_check": colour})
    tracker.set_tags({"varsr.export_dir": "final"})
    if model is not None:
        tracker.log_checkpoint_model(
            model.name, export, model_id=model.model_id, weights=cfg.tracking.log_checkpoint, step=step
        )
    return export, model.model_id if model else None
