"""Stage 0 (optional): train a multi-scale VQVAE tokenizer on shard HR crops.

The released VARSR freezes VAR's VQVAE (spec §5.1); small presets such as ``tiny`` have no released tokenizer, so the
platform trains one here with VAR's VQVAE objective (spec §1.7: phi at every scale, straight-through estimator,
codebook + commitment loss) plus an L1 + MSE reconstruction loss. The export is a native checkpoint folder holding the
tokenizer only (``vqvae.*`` tensors + config.json); stages 1 and 2 load it through ``model.vqvae_checkpoint``.

    varsr train vqvae --config configs/demo/vqvae.yaml [--set max_steps=400 --set data.batch_size=8 ...]
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from infra.core.config import load_config, to_dict
from infra.core.errors import UserError
from training.config import DataSection, ModelSection, TrackingSection

log = logging.getLogger(__name__)


@dataclass
class VQVAETrainConfig:
    """What `varsr train vqvae` reads (YAML + key=value overrides)."""

    output_dir: str = "runs/vqvae"
    model: ModelSection = field(default_factory=ModelSection)  # preset + overrides give the VQVAE geometry
    data: DataSection = field(default_factory=DataSection)
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    max_steps: int = 400
    warmup_steps: int = 20
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    vq_weight: float = 1.0
    grad_clip: float = 1.0
    restart_dead_codes_every: int = 20  # 0 = off; re-seed unused codes from encoder outputs (avoids codebook collapse)
    seed: int = 0
    log_every: int = 20
    device: str = "auto"
    tracking: TrackingSection = field(default_factory=lambda: TrackingSection(experiment="varsr-vqvae"))


def load_vqvae_config(source=None, overrides=()) -> VQVAETrainConfig:
    """defaults <- YAML <- ``key=value`` overrides."""
    return load_config(VQVAETrainConfig, source, list(overrides))


def train_vqvae(cfg: VQVAETrainConfig) -> dict:
    """Train the tokenizer; returns {losses, export_dir, run_id}."""
    from model import VARSRConfig, VQVAE
    from model.checkpoint import save_tokenizer
    from data_pipeline.shards import BatchStream, resolve_shards
    from infra.core.tracking import default_tracking_uri
    from training.tracking import MlflowTracker, NullTracker, save_grid

    if cfg.max_steps < 1:
        raise UserError("max_steps must be >= 1")
    mcfg = VARSRConfig.preset(cfg.model.preset.removeprefix("c2i-"), **cfg.model.overrides)
    shards = resolve_shards(cfg.data.shards)
    if shards.hr_size is not None and shards.hr_size != mcfg.image_size:
        raise UserError(f"shards hold {shards.hr_size}px crops but preset {mcfg.name!r} works at {mcfg.image_size}px")
    dev = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if cfg.device == "auto" else cfg.device))
    torch.manual_seed(cfg.seed)
    vqvae = VQVAE(mcfg).to(dev).train()
    opt = torch.optim.AdamW(vqvae.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1)))
    stream = iter(BatchStream(shards, size=mcfg.image_size, want_lr=False, batch_size=cfg.data.batch_size,
                              workers=cfg.data.workers, seed=cfg.seed, rank=0, world=1,
                              shuffle_buffer=cfg.data.shuffle_buffer))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "resolved_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    tracker = NullTracker()
    uri = cfg.tracking.tracking_uri or default_tracking_uri()
    if cfg.tracking.enabled:
        tracker = MlflowTracker(uri, cfg.tracking.experiment, cfg.tracking.run_name or "stage0-vqvae", to_dict(cfg),
                                {"varsr.stage": "vqvae", "varsr.data.manifest_sha256": shards.manifest_sha256 or "none"},
                                artifact_root=out / "mlartifacts")
        print(f"[vqvae] MLflow run {tracker.run_id} at {uri}", flush=True)
    history, t0 = [], time.monotonic()
    batch = None
    for step in range(1, cfg.max_steps + 1):
        batch = next(stream)
        x = batch["hr"].to(dev) * 2 - 1
        rec, vq_loss, usage = vqvae(x)
        l1 = (rec - x).abs().mean()
        mse = ((rec - x) ** 2).mean()
        loss = cfg.l1_weight * l1 + cfg.mse_weight * mse + cfg.vq_weight * vq_loss
        if not torch.isfinite(loss):
            raise UserError(f"non-finite VQVAE loss at step {step} (l1={float(l1)}, vq={float(vq_loss)}); lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(vqvae.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if cfg.restart_dead_codes_every and step % cfg.restart_dead_codes_every == 0 and step < cfg.max_steps:
            restarted = restart_dead_codes(vqvae, x)
            if restarted:
                log.info("step %d: re-seeded %d unused codes", step, restarted)
        rec_psnr = float(10 * torch.log10(4.0 / mse.detach().clamp_min(1e-12)))
        m = dict(step=step, loss=float(loss), l1=float(l1), mse=float(mse), vq=float(vq_loss), grad_norm=float(gn),
                 psnr=rec_psnr, usage=float(sum(usage) / max(len(usage), 1)), lr=sched.get_last_lr()[0])
        history.append(m)
        tracker.log_metrics({f"vqvae/{k}": v for k, v in m.items() if k != "step"}, step=step)
        if step % cfg.log_every == 0 or step in (1, cfg.max_steps):
            el = time.monotonic() - t0
            print(f"[vqvae] step {step}/{cfg.max_steps} loss {m['loss']:.4f} l1 {m['l1']:.4f} vq {m['vq']:.4f} "
                  f"rec-PSNR {rec_psnr:.2f} dB usage {m['usage']:.1f}% ({el:.0f} s, "
                  f"ETA {el / step * (cfg.max_steps - step):.0f} s)", flush=True)
    vqvae.eval()
    with torch.no_grad():
        x = batch["hr"][:4].to(dev)
        rec = ((vqvae(x * 2 - 1)[0].clamp(-1, 1) + 1) / 2)
        # the tokenised path the transformer sees: K-scale codes + continuous residual (= exact f) decode
        idx, _ = vqvae.img_to_idxBl(x * 2 - 1)
        f_hat = torch.zeros_like(vqvae.encode(x * 2 - 1))
        for si, pn in enumerate(mcfg.patch_nums):
            h = vqvae.embed_idx(idx[si]).transpose(1, 2).reshape(x.shape[0], -1, pn, pn)
            f_hat, _ = vqvae.get_next_autoregressive_input(si, f_hat, h)
        tok = (vqvae.fhat_to_img(f_hat) + 1) / 2
    grid = save_grid([[a, b, c] for a, b, c in zip(x, rec, tok)], ["HR", "reconstruction", "tokens only"],
                     out / "samples" / "reconstructions.png")
    curve = _plot(history, out / "plots" / "loss_curve.png")
    export = save_tokenizer(out / "final", vqvae.cpu(), mcfg,
                            extra={"lineage": {"mlflow_run_id": tracker.run_id,
                                                 "shards_manifest_sha256": shards.manifest_sha256}})
    tracker.log_artifact(grid, "samples")
    tracker.log_artifact(curve, "plots")
    tracker.end()
    first, last = history[0], history[-1]
    print(f"[vqvae] done: {cfg.max_steps} steps in {time.monotonic() - t0:.0f} s, loss {first['loss']:.4f} -> "
          f"{last['loss']:.4f}, rec-PSNR {first['psnr']:.2f} -> {last['psnr']:.2f} dB; tokenizer -> {export}", flush=True)
    return dict(losses=[h["loss"] for h in history], psnr=[h["psnr"] for h in history], export_dir=str(export),
                run_id=tracker.run_id)


@torch.no_grad()
def restart_dead_codes(vqvae, x: torch.Tensor, min_hits: float = 0.5) -> int:
    """Codes hit (EMA, summed over scales) less than ``min_hits`` times per step are re-seeded with encoder outputs
    of the current batch (plus a little noise): a small VQVAE otherwise collapses onto a handful of codes."""
    q = vqvae.quantize
    dead = (q.ema_vocab_hit_SV.sum(0) < min_hits).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    f = vqvae.encode(x).permute(0, 2, 3, 1).reshape(-1, q.embedding.weight.shape[1])
    pick = torch.randint(0, f.shape[0], (dead.numel(),), device=f.device)
    q.embedding.weight[dead] = f[pick] + 0.01 * f.std() * torch.randn_like(f[pick])
    q.ema_vocab_hit_SV[:, dead] = min_hits  # give the new codes a grace period before the next check
    return int(dead.numel())


def _plot(history: list[dict], path: Path) -> Path:
    """Loss terms and reconstruction PSNR against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in ("loss", "l1", "mse", "vq"):
        axes[0].plot(steps, [h[key] for h in history], label=key)
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[0].set_title("tokenizer losses")
    axes[1].plot(steps, [h["psnr"] for h in history], color="C4")
    axes[1].set_title("reconstruction PSNR (dB)")
    for a in axes:
        a.set_xlabel("step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
