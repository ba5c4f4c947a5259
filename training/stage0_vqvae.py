"""Stage 0 (optional): train a multi-scale VQVAE tokenizer on shard HR crops.

The released VARSR freezes VAR's VQVAE (docs/MODEL.md §5.1); small presets such as ``tiny`` have no released tokenizer,
so the platform trains one here with VAR's VQVAE objective (docs/MODEL.md §1.7: phi at every scale, straight-through
estimator, codebook + commitment loss) plus an L1 + MSE reconstruction loss. The export is a native checkpoint folder
holding the tokenizer only (``vqvae.*`` tensors + config.json); stages 1 and 2 load it through
``model.vqvae_checkpoint``. Tracked like every stage (training/tracking.py): run ``stage0-vqvae <preset> seed<N>
<time>``, the shared lineage tags, the shard manifest as dataset input, ``loss/...`` metrics, an HR | reconstruction |
tokens-only grid of distinct samples, and the export as the run's logged model (stage 1 links it as a model input).

Stage 0b, the decoder finetune (``train_parts: decoder`` + ``init_from``, configs/demo/pretrain_decoder.yaml): only
``post_quant_conv`` and the decoder learn, on the tokens-only latent (and, for a ``residual_mix`` share of crops, on
the encoder latent), with the high-pass L1 and the patch critic of training/patch_gan.py when they are weighted;
encoder, quantizer and codebook stay bit-identical, so a transformer trained on the codes of
``init_from`` still fits, and ``model.checkpoint.with_decoder`` puts the new decoder beside it (docs/EXPERIMENTS.md).

Colour check: every step logs ``recon/chroma_err`` (how far the batch's mean colours are off), and the run ends by
measuring ``eval/chroma_gain[_tokens]`` on ``colour_check_images`` held-out crops: 1 when the decoded images keep
each crop's colour, 0 when they all come out with one tint. Below ``MIN_CHROMA_GAIN`` it prints a warning, because a
transformer trained on such tokens cannot produce colour whatever it learns (docs/EXPERIMENTS.md). The figures and the
verdict are stored in the export's config.json (``colour_check``); `varsr demo pretrain` stops on ``lost``.

Checkpoints (model, optimiser, LR schedule, RNG states, data position and the metric history) go to
``{output_dir}/checkpoints/step_N/`` every ``checkpoint_every`` steps and at the end; ``--resume auto`` continues from
the latest complete one with the same losses as an uninterrupted run.

    varsr train vqvae --config configs/demo/vqvae.yaml [--set max_steps=400 --set data.batch_size=8 ...] [--resume auto]
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from infra.core.config import load_config, to_dict
from infra.core.errors import UserError
from infra.core.metrics import chroma_fidelity
from infra.core.redact import redact, redact_config
from model.sampling import stream_generator
from training.augment import augment_crops
from training.config import DataSection, ModelSection, TrackingSection, number_errors
from training.tracking import plot_curves

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
    # after warm-up: ``constant`` (the first recipe), or ``cosine`` from lr down to lr * min_lr_ratio at max_steps.
    # A constant lr leaves the reconstruction loss bouncing on a plateau; the decay settles it (docs/EXPERIMENTS.md).
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.05
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    vq_weight: float = 1.0
    # MSE of the reconstruction's ``lowpass_factor``-px block means: the image's local colour and brightness, the
    # part a per-pixel loss weighs least while texture errors dominate it (docs/EXPERIMENTS.md); 0 = off
    lowpass_weight: float = 0.0
    lowpass_factor: int = 8
    # per-crop random RGB channel order, left-right flip and quarter turn (training/augment.py): a tokenizer trained on
    # a few dozen photos otherwise learns their palette and decodes an unlike photo in it (docs/EXPERIMENTS.md).
    # Off by default (VAR's recipe).
    augment: bool = False
    augment_colour_p: float = 1.0  # share of augmented crops whose channel order is shuffled
    # Decoder finetune (docs/EXPERIMENTS.md): start from the tokenizer of ``init_from`` (a native checkpoint folder,
    # full or tokenizer-only); with ``train_parts: decoder`` only post_quant_conv and the decoder learn, on the
    # token-only latent f_hat, so the codes stay bit-identical and a transformer trained on them keeps working.
    init_from: str | None = None
    train_parts: Literal["all", "decoder"] = "all"
    # decoder finetune only: the share of crops decoded from the encoder latent f = f_hat + (R - e_last) (tokens plus
    # the exact last-scale residual, what a perfect refiner adds) instead of the token-only f_hat. A decoder trained
    # on f_hat alone decodes f worse than f_hat, so the refiner's residual cannot help it (docs/EXPERIMENTS.md); 0 = off
    residual_mix: float = 0.0
    # L1 of the high-pass (image minus its Gaussian blur of ``hf_sigma`` px) of reconstruction vs target: rewards
    # edges where the target has them (training/patch_gan.py); 0 = off
    hf_weight: float = 0.0
    hf_sigma: float = 1.0
    # hinge-loss patch critic (training/patch_gan.py): texture where the codes do not say what it is; 0 = off. The
    # critic trains from step 1, the decoder gets its loss after ``gan_start`` steps.
    gan_weight: float = 0.0
    gan_start: int = 0
    disc_width: int = 32
    disc_lr: float | None = None  # None: lr
    grad_clip: float = 1.0
    restart_dead_codes_every: int = 20  # 0 = off; re-seed unused codes from encoder outputs (avoids codebook collapse)
    seed: int = 0
    log_every: int = 20
    device: str = "auto"
    grid_images: int = 4  # distinct held-out samples in the reconstruction grid
    colour_check_images: int = 32  # distinct held-out crops on which the end-of-run colour check is measured
    checkpoint_every: int = 100  # 0 = only at the end
    keep_checkpoints: int = 1
    tracking: TrackingSection = field(default_factory=TrackingSection)


# optimiser numbers that must be finite and in range (training/config.py: number_errors), refused before any work
VQVAE_RANGES = {"lr": (lambda v: v > 0, "> 0"), "disc_lr": (lambda v: v > 0, "> 0"),
                "betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
                "weight_decay": (lambda v: v >= 0, ">= 0"), "grad_clip": (lambda v: v > 0, "> 0")}


def load_vqvae_config(source=None, overrides=()) -> VQVAETrainConfig:
    """defaults <- YAML <- ``key=value`` overrides."""
    return load_config(VQVAETrainConfig, source, list(overrides))


def train_vqvae(cfg: VQVAETrainConfig, resume: str | None = None) -> dict:
    """Train the tokenizer (``resume``: ``auto`` or a checkpoint folder); returns {losses, psnr, export_dir, run_id,
    model_id, resumed_from}."""
    from data_pipeline.shards import BatchStream, DataPosition, resolve_shards
    from model import VQVAE, VARSRConfig
    from training import checkpointing
    from training.run_dir import RunDir

    if cfg.max_steps < 1:
        raise UserError("max_steps must be >= 1")
    bad = number_errors(cfg, VQVAE_RANGES)
    if bad:
        raise UserError("invalid VQVAE config: " + "; ".join(bad))
    if cfg.lowpass_weight < 0 or cfg.lowpass_factor < 1:
        raise UserError(f"lowpass_weight must be >= 0 and lowpass_factor >= 1, got {cfg.lowpass_weight}, "
                        f"{cfg.lowpass_factor}")
    if cfg.lr_schedule not in ("constant", "cosine") or not 0 <= cfg.min_lr_ratio <= 1:
        raise UserError(f"lr_schedule must be constant or cosine and min_lr_ratio in [0, 1], got "
                        f"{cfg.lr_schedule!r}, {cfg.min_lr_ratio}")
    if not 0 <= cfg.augment_colour_p <= 1:
        raise UserError(f"augment_colour_p must be in [0, 1], got {cfg.augment_colour_p}")
    if cfg.train_parts not in ("all", "decoder"):
        raise UserError(f"train_parts must be all or decoder, got {cfg.train_parts!r}")
    if cfg.train_parts == "decoder" and not cfg.init_from:
        raise UserError("train_parts=decoder finetunes an existing tokenizer: set init_from to its checkpoint folder")
    if not 0.0 <= cfg.residual_mix <= 1.0 or (cfg.residual_mix and cfg.train_parts != "decoder"):
        raise UserError(f"residual_mix is a share in [0, 1] and only applies to train_parts=decoder, got "
                        f"{cfg.residual_mix} with train_parts={cfg.train_parts}")
    if cfg.hf_weight < 0 or cfg.gan_weight < 0 or cfg.hf_sigma <= 0:
        raise UserError(f"hf_weight and gan_weight must be >= 0 and hf_sigma > 0, got {cfg.hf_weight}, "
                        f"{cfg.gan_weight}, {cfg.hf_sigma}")
    mcfg = VARSRConfig.preset(cfg.model.preset.removeprefix("c2i-"), **cfg.model.overrides)
    shards = resolve_shards(cfg.data.shards)
    if shards.hr_size is not None and shards.hr_size != mcfg.image_size:
        raise UserError(f"shards hold {shards.hr_size}px crops but preset {mcfg.name!r} works at {mcfg.image_size}px")
    dev = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if cfg.device == "auto" else cfg.device))
    torch.manual_seed(cfg.seed)
    vqvae = VQVAE(mcfg)
    if cfg.init_from:
        _load_init(vqvae, cfg.init_from)
    vqvae = vqvae.to(dev).train()
    if cfg.train_parts == "decoder":  # the codes' path is frozen: only post_quant_conv + decoder get gradients
        vqvae.requires_grad_(False)
        for part in (vqvae.post_quant_conv, vqvae.decoder):
            part.requires_grad_(True)
    params = [p for p in vqvae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
    critic = None
    if cfg.gan_weight > 0:
        from training.patch_gan import PatchDiscriminator

        disc = PatchDiscriminator(cfg.disc_width).to(dev).train()
        critic = (disc, torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr or cfg.lr, betas=(0.5, 0.9)))
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = RunDir(str(out))
    fingerprint = _fingerprint(cfg, mcfg)
    history, position = [], DataPosition()
    ckpt = checkpointing.find_resume(run, resume)
    if ckpt is not None:  # after the model is built: the checkpoint's RNG states replace the init's draws
        st = checkpointing.load_module_state(ckpt, fingerprint)
        vqvae.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        # the lr of the next step follows this run's schedule (a run extended to more steps decays over the new span)
        for group, base in zip(opt.param_groups, sched.base_lrs):
            group["lr"] = base * lr_factor(cfg, sched.last_epoch)
        vqvae.quantize.record_hit = int(st["record_hit"])  # usage EMA updates count (a plain attribute, not state)
        if critic is not None:
            critic[0].load_state_dict(st["critic"])
            critic[1].load_state_dict(st["critic_optimizer"])
        history, position = st["history"], DataPosition(**st["position"])
        print(f"[vqvae] resumed from {ckpt} at step {st['step']} (epoch {position.epoch})", flush=True)
    batches = BatchStream(shards, size=mcfg.image_size, want_lr=False, batch_size=cfg.data.batch_size,
                          workers=cfg.data.workers, seed=cfg.seed, rank=0, world=1,
                          shuffle_buffer=cfg.data.shuffle_buffer, position=position)

    def checkpoint(step: int, hist: list[dict]) -> None:
        checkpointing.save_module_state(run, step, {
            "model": vqvae.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "record_hit": vqvae.quantize.record_hit, "position": asdict(batches.pos), "history": hist,
            "fingerprint": fingerprint,
            **({"critic": critic[0].state_dict(), "critic_optimizer": critic[1].state_dict()} if critic else {})},
            cfg.keep_checkpoints)
    (out / "resolved_config.json").write_text(json.dumps(redact_config(to_dict(cfg)), indent=2))  # no secret
    tracker = _start_tracking(cfg, shards, mcfg.name, out)
    status = "FAILED"
    try:
        history = _train_loop(cfg, vqvae, opt, sched, iter(batches), dev, tracker, history, checkpoint, critic)
        vqvae.eval()
        val = resolve_shards(cfg.data.val_shards) if cfg.data.val_shards else shards
        grid, colour = _reconstruction_grid(vqvae, mcfg, val, cfg, dev, out / "samples" / "reconstructions.png")
        tracker.log_metrics({f"eval/{k}": v for k, v in colour.items() if k != "images"}, step=len(history))
        _report_colour(colour)
        # NaN (no slope to measure) is stored as null: config.json stays standard JSON
        colour = {**{k: (None if v != v else v) for k, v in colour.items()}, "min_chroma_gain": MIN_CHROMA_GAIN,
                  "verdict": colour_verdict(colour)}
        curve = plot_curves(history, [("tokenizer losses", ["loss/total", "loss/l1", "loss/mse", "loss/vq",
                                                            "loss/lowpass", "loss/highpass"]),
                                      ("adversarial losses", ["loss/generator", "loss/critic"]),
                                      ("reconstruction PSNR (dB)", ["recon/psnr"]),
                                      ("codebook usage (%)", ["codebook/usage_pct"])],
                            out / "plots" / "loss_curve.png", log_panels=("tokenizer losses",))
        tracker.log_artifact(grid, "samples")
        tracker.log_artifact(curve, "plots")
        export, model_id = _export(vqvae, mcfg, cfg, shards, out, tracker, len(history), colour)
        status = "FINISHED"
    finally:
        tracker.end(status)
    first, last = history[0], history[-1]
    print(f"[vqvae] done: {cfg.max_steps} steps, loss {first['loss/total']:.4f} -> {last['loss/total']:.4f}, "
          f"rec-PSNR {first['recon/psnr']:.2f} -> {last['recon/psnr']:.2f} dB; tokenizer -> {export}", flush=True)
    return dict(losses=[h["loss/total"] for h in history], psnr=[h["recon/psnr"] for h in history],
                export_dir=str(export), run_id=tracker.run_id, model_id=model_id,
                resumed_from=str(ckpt) if ckpt else None, colour=colour)


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


def _report_colour(colour: dict) -> None:
    """The end-of-run colour check: one summary line, and a warning line when the tokens lost colour."""
    print(f"[vqvae] colour on {colour['images']} held-out crops: chroma gain {colour['chroma_gain_tokens']:.2f} "
          f"tokens only / {colour['chroma_gain']:.2f} reconstruction (1 = kept, 0 = lost), mean chroma error "
          f"{colour['chroma_err_tokens']:.3f}", flush=True)
    if colour_verdict(colour) == "lost":
        print(f"[vqvae] WARNING: the tokenizer does not reproduce colour (chroma gain "
              f"{colour['chroma_gain_tokens']:.2f} < {MIN_CHROMA_GAIN}); a model trained on its tokens decodes "
              f"near-grey images (docs/EXPERIMENTS.md)", flush=True)


def _fingerprint(cfg: VQVAETrainConfig, mcfg) -> dict:
    """What a resumed run must share with the checkpoint it continues (not max_steps: a run can be extended)."""
    return {"geometry": json.dumps(mcfg.to_dict(), sort_keys=True), "seed": cfg.seed, "lr": cfg.lr,
            "batch_size": cfg.data.batch_size, "shards": cfg.data.shards, "warmup_steps": cfg.warmup_steps,
            "losses": [cfg.l1_weight, cfg.mse_weight, cfg.vq_weight, cfg.lowpass_weight, cfg.lowpass_factor],
            **({"augment": [True, cfg.augment_colour_p]} if cfg.augment else {}),
            **({"lr_schedule": [cfg.lr_schedule, cfg.min_lr_ratio]} if cfg.lr_schedule != "constant" else {}),
            **({"finetune": [cfg.init_from, cfg.train_parts]} if cfg.init_from else {}),
            **({"sharpness": [cfg.hf_weight, cfg.hf_sigma, cfg.gan_weight, cfg.gan_start, cfg.disc_width,
                              cfg.disc_lr]} if cfg.hf_weight or cfg.gan_weight else {})}


def _load_init(vqvae, init_from: str) -> None:
    """The weights of the tokenizer to finetune (``init_from``: local folder or URL of a native checkpoint)."""
    from model.checkpoint import load_tokenizer
    from training.model_setup import local_checkpoint

    load_tokenizer(vqvae, local_checkpoint(init_from))
    vqvae.requires_grad_(True)
    print(f"[vqvae] starting from the tokenizer of {init_from}", flush=True)


def _start_tracking(cfg: VQVAETrainConfig, shards, preset: str, out: Path):
    """The stage-0 run: named, nested when a parent is given, with the lineage tags every stage sets and the shard
    manifest as its dataset input."""
    from infra.core.tracking import default_tracking_uri, run_name
    from training.tracking import STAGE_RUN_KIND, MlflowTracker, NullTracker, lineage_tags, manifest_source, run_params

    t = cfg.tracking
    if not t.enabled:
        return NullTracker()
    uri = t.tracking_uri or default_tracking_uri()
    base = str(out)
    name = t.run_name or run_name(STAGE_RUN_KIND["vqvae"], preset, f"seed{cfg.seed}")
    tags = lineage_tags(stage="vqvae", preset=preset, config=cfg, data_location=shards.location,
                        manifest_sha256=shards.manifest_sha256, run_base=base, output_url=base, tracking_uri=uri)
    tracker = MlflowTracker(uri, name, experiment=t.experiment, parent_run_id=t.parent_run_id,
                            params=run_params(to_dict(cfg), base), config=to_dict(cfg), tags=tags,
                            source="varsr train vqvae", system_metrics=t.system_metrics)
    src = manifest_source(shards.location, base) if shards.manifest_sha256 else None
    if src is not None:
        tracker.log_dataset(src, shards.manifest_sha256, context="training",
                            name=Path(shards.location.rstrip("/")).name,
                            profile={"manifest_sha256": shards.manifest_sha256, "samples": shards.num_samples,
                                     "shards": len(shards.urls), "hr_size": shards.hr_size})
    print(f"[vqvae] MLflow run {tracker.run_id} ({name}) at {redact(uri)}", flush=True)
    return tracker


def _train_loop(cfg: VQVAETrainConfig, vqvae, opt, sched, stream, dev, tracker, history: list[dict],
                checkpoint, critic=None) -> list[dict]:
    """The optimisation steps after those in ``history`` (a resumed run's); returns the per-step metrics of the whole
    run (also logged). ``checkpoint(step, history)`` every ``checkpoint_every`` steps and after the last.
    ``critic``: (patch discriminator, its optimiser) when ``gan_weight`` > 0."""
    from training.patch_gan import generator_loss, highpass_l1, hinge_d_loss

    decoder_only = cfg.train_parts == "decoder"
    history, t0, start = list(history), time.monotonic(), len(history)
    for step in range(start + 1, cfg.max_steps + 1):
        batch = next(stream)
        x = batch["hr"].to(dev) * 2 - 1
        if cfg.augment:
            x = augment_crops([x], stream_generator(cfg.seed, step), cfg.augment_colour_p)[0]
        if decoder_only:  # the token-only latent, as the transformer's codes give it; no codebook loss to learn
            f_hat = decoder_latent(vqvae, x, cfg.residual_mix, stream_generator(cfg.seed, step, 1))
            rec = vqvae.decoder(vqvae.post_quant_conv(f_hat.contiguous(memory_format=torch.channels_last)))
            vq_loss, usage = torch.zeros((), device=dev), []
        else:
            rec, vq_loss, usage = vqvae(x)
        l1 = (rec - x).abs().mean()
        mse = ((rec - x) ** 2).mean()
        loss = cfg.l1_weight * l1 + cfg.mse_weight * mse + cfg.vq_weight * vq_loss
        lowpass = lowpass_mse(rec, x, cfg.lowpass_factor) if cfg.lowpass_weight else None
        if lowpass is not None:
            loss = loss + cfg.lowpass_weight * lowpass
        extra = {}
        if cfg.hf_weight:
            extra["loss/highpass"] = highpass_l1(rec, x, cfg.hf_sigma)
            loss = loss + cfg.hf_weight * extra["loss/highpass"]
        if critic is not None and step > cfg.gan_start:
            extra["loss/generator"] = generator_loss(critic[0](rec))
            loss = loss + cfg.gan_weight * extra["loss/generator"]
        if not torch.isfinite(loss):
            raise UserError(f"non-finite VQVAE loss at step {step} (l1={float(l1)}, vq={float(vq_loss)}); lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_([p for p in vqvae.parameters() if p.requires_grad], cfg.grad_clip)
        opt.step()
        sched.step()
        if critic is not None:  # the critic's step on this batch: real crops against the (detached) reconstructions
            disc, disc_opt = critic
            d_loss = hinge_d_loss(disc(x), disc(rec.detach()))
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
            extra["loss/critic"] = d_loss
        if (cfg.restart_dead_codes_every and not decoder_only and step % cfg.restart_dead_codes_every == 0
                and step < cfg.max_steps):
            restarted = restart_dead_codes(vqvae, x)
            if restarted:
                log.info("step %d: re-seeded %d unused codes", step, restarted)
        rec_psnr = float(10 * torch.log10(4.0 / mse.detach().clamp_min(1e-12)))
        m = {"loss/total": loss.item(), "loss/l1": l1.item(), "loss/mse": mse.item(), "loss/vq": vq_loss.item(),
             **({"loss/lowpass": lowpass.item()} if lowpass is not None else {}),
             **{k: float(v.detach()) for k, v in extra.items()},
             "optim/grad_norm": float(gn), "recon/psnr": rec_psnr,
             "recon/chroma_err": chroma_fidelity(x, rec.detach())["chroma_err"],
             **({"codebook/usage_pct": float(sum(usage) / len(usage))} if usage else {}),
             "lr": sched.get_last_lr()[0]}
        history.append({"step": step, **m})
        tracker.log_metrics(m, step=step)
        if step % cfg.log_every == 0 or step in (1, cfg.max_steps):
            el = time.monotonic() - t0
            print(f"[vqvae] step {step}/{cfg.max_steps} loss {m['loss/total']:.4f} l1 {m['loss/l1']:.4f} "
                  f"vq {m['loss/vq']:.4f} rec-PSNR {rec_psnr:.2f} dB "
                  + (f"usage {m['codebook/usage_pct']:.1f}% " if usage else "")
                  + "".join(f"{k.split('/')[1]} {float(v):.4f} " for k, v in extra.items()) +
                  f"({el:.0f} s, ETA {el / (step - start) * (cfg.max_steps - step):.0f} s)", flush=True)
        if step == cfg.max_steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            checkpoint(step, history)
    if not history:
        raise UserError(f"nothing to train: max_steps={cfg.max_steps}")
    return history


@torch.no_grad()
def decoder_latent(vqvae, x: torch.Tensor, residual_mix: float, gen: torch.Generator) -> torch.Tensor:
    """What stage 0b's decoder learns to decode for crops ``x``: the token-only latent f_hat, except for a
    ``residual_mix`` share of crops (drawn from ``gen``), which get the encoder latent f = f_hat + (R - e_last)."""
    idx, R, f_hat = vqvae.tokenize(x)
    if residual_mix <= 0:
        return f_hat
    f = vqvae.exact_latent(idx, R, f_hat)
    pick = (torch.rand(x.shape[0], generator=gen) < residual_mix).to(x.device)[:, None, None, None]
    return torch.where(pick, f, f_hat)


def lr_factor(cfg: VQVAETrainConfig, s: int) -> float:
    """The multiplier of ``cfg.lr`` after ``s`` optimiser steps: linear warm-up, then constant or cosine decay."""
    warm = min(1.0, (s + 1) / max(cfg.warmup_steps, 1))
    if cfg.lr_schedule == "constant" or s < cfg.warmup_steps:
        return warm
    t = min(1.0, (s - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def lowpass_mse(rec: torch.Tensor, x: torch.Tensor, factor: int) -> torch.Tensor:
    """Mean squared error of the ``factor``×``factor`` block means of ``rec`` and ``x`` (B, 3, H, W)."""
    pool = torch.nn.functional.avg_pool2d
    return ((pool(rec, factor) - pool(x, factor)) ** 2).mean()


@torch.no_grad()
def _reconstruction_grid(vqvae, mcfg, shards, cfg: VQVAETrainConfig, dev, path: Path) -> tuple[Path, dict]:
    """HR | reconstruction | tokens only (the K-scale codes alone, the path the transformer sees) for
    ``grid_images`` distinct samples (shards hold several LR variants of one HR crop: duplicates are skipped), and
    the colour check (:func:`infra.core.metrics.chroma_fidelity` of both decodes) on ``colour_check_images``
    distinct crops."""
    from data_pipeline.shards import BatchStream
    from training.tracking import save_grid

    stream = BatchStream(shards, size=mcfg.image_size, want_lr=False, batch_size=cfg.data.batch_size, workers=0,
                         seed=cfg.seed, rank=0, world=1, shuffle_buffer=0)
    n, seen, picked = max(1, cfg.grid_images, cfg.colour_check_images), set(), []
    for b in stream:
        for i in range(b["hr"].shape[0]):
            d = hash(b["hr"][i].numpy().tobytes())
            if d not in seen:
                seen.add(d)
                picked.append((b["hr"][i], str(b["key"][i])))
        if len(picked) >= n or stream.pos.epoch > 0:
            break
    picked = picked[:n]
    x = torch.stack([p[0] for p in picked]).to(dev)
    rec = (vqvae(x * 2 - 1)[0].clamp(-1, 1) + 1) / 2
    idx, _ = vqvae.img_to_idxBl(x * 2 - 1)
    f_hat = torch.zeros_like(vqvae.encode(x * 2 - 1))
    for si, pn in enumerate(mcfg.patch_nums):
        h = vqvae.embed_idx(idx[si]).transpose(1, 2).reshape(x.shape[0], -1, pn, pn)
        f_hat, _ = vqvae.get_next_autoregressive_input(si, f_hat, h)
    tok = (vqvae.fhat_to_img(f_hat).clamp(-1, 1) + 1) / 2
    colour = {"images": len(picked), **chroma_fidelity(x, rec),
              **{f"{k}_tokens": v for k, v in chroma_fidelity(x, tok).items()}}
    g = max(1, cfg.grid_images)
    labels = [f"{key[-28:]}   rec PSNR {10 * math.log10(1.0 / max(float(((r - a) ** 2).mean()), 1e-12)):.2f} dB"
              for (a, key), r in zip(((x[i], picked[i][1]) for i in range(min(g, len(picked)))), rec)]
    grid = save_grid([[a, b, c] for a, b, c in list(zip(x, rec, tok))[:g]], ["HR", "reconstruction", "tokens only"],
                     path, row_labels=labels)
    return grid, colour


def _export(vqvae, mcfg, cfg: VQVAETrainConfig, shards, out: Path, tracker, step: int, colour: dict):
    """The tokenizer-only checkpoint in ``final/`` (lineage and the colour check inside its config.json, where
    `varsr demo pretrain` reads it), logged as the run's model; (folder, model id)."""
    from model.checkpoint import save_tokenizer
    from training.tracking import STAGE_RUN_KIND, MlflowTracker

    model = None
    if isinstance(tracker, MlflowTracker):
        model = tracker.create_model(STAGE_RUN_KIND["vqvae"], model_type="varsr-vqvae-checkpoint",
                                     tags={"varsr.stage": "vqvae", "varsr.model_preset": mcfg.name})
    lineage = {"mlflow_run_id": tracker.run_id, "mlflow_model_id": model.model_id if model else None,
               "varsr.data.manifest_sha256": shards.manifest_sha256, "step": step,
               **({"varsr.tokenizer.init_from": cfg.init_from, "varsr.tokenizer.train_parts": cfg.train_parts}
                  if cfg.init_from else {})}
    export = save_tokenizer(out / "final", vqvae.cpu(), mcfg, extra={"lineage": lineage, "colour_check": colour})
    tracker.set_tags({"varsr.export_dir": "final"})
    if model is not None:
        tracker.log_checkpoint_model(model.name, export, model_id=model.model_id,
                                     weights=cfg.tracking.log_checkpoint, step=step)
    return export, model.model_id if model else None


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
