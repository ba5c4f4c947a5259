"""Stage 0 (optional): train a multi-scale VQVAE tokenizer on shard HR crops.

The released VARSR freezes VAR's VQVAE (docs/MODEL.md §5.1); small presets such as ``tiny`` have no released tokenizer,
so the platform trains one here with VAR's VQVAE objective (docs/MODEL.md §1.7: phi at every scale, straight-through
estimator, codebook + commitment loss) plus an L1 + MSE reconstruction loss. The export is a native checkpoint folder
holding the tokenizer only (``vqvae.*`` tensors + config.json); stages 1 and 2 load it through
``model.vqvae_checkpoint``. Tracked like every stage (training/run_start.py, training/tracking.py): run
``stage0-vqvae <preset> seed<N> <time>``, the shared lineage tags, the shard manifest as dataset input, ``loss/...``
metrics, an HR | reconstruction | tokens-only grid of distinct samples, and the export as the run's logged model
(stage 1 links it as a model input).

Stage 0b, the decoder finetune (``train_parts: decoder`` + ``init_from``, configs/demo/pretrain_decoder.yaml): only
``post_quant_conv`` and the decoder learn, on the tokens-only latent (and, for a ``residual_mix`` share of crops, on
the encoder latent), with the high-pass L1 and the patch critic of training/patch_gan.py when they are weighted;
encoder, quantizer and codebook stay bit-identical, so a transformer trained on the codes of
``init_from`` still fits, and ``model.checkpoint.with_decoder`` puts the new decoder beside it (docs/EXPERIMENTS.md).

Colour check: every step logs ``recon/chroma_err`` (how far the batch's mean colours are off), and the run ends by
measuring ``eval/chroma_gain[_tokens]`` on ``colour_check_images`` held-out crops: 1 when the decoded images keep
each crop's colour, 0 when they all come out with one tint (training/stage0_finish.py). Below ``MIN_CHROMA_GAIN`` it
warns, because a transformer trained on such tokens cannot produce colour whatever it learns (docs/EXPERIMENTS.md).
The figures and the verdict are stored in the export's config.json (``colour_check``); `varsr demo pretrain` stops on
``lost``.

Checkpoints (model, optimiser, LR schedule, RNG states, data position and the metric history) go to
``{output_dir}/checkpoints/step_N/`` every ``checkpoint_every`` steps and at the end; ``--resume auto`` continues from
the latest complete one with the same losses as an uninterrupted run.

Its config is :class:`training.config.VQVAETrainConfig`, checked by its ``validate()`` before any work.

    varsr train vqvae --config configs/demo/vqvae.yaml [--set max_steps=400 --set data.batch_size=8 ...] [--resume auto]
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from data_pipeline.shards import BatchStream, DataPosition, resolve_shards
from infra.core.config import to_dict
from infra.core.errors import UserError
from infra.core.log import say, summary
from infra.core.metrics import chroma_fidelity
from infra.core.redact import redact_config
from model import VQVAE, VARSRConfig
from model.sampling import stream_generator
from training import checkpointing
from training.augment import augment_crops
from training.config import VQVAETrainConfig, load_vqvae_config  # noqa: F401 - load_vqvae_config re-exported (tests)
from training.run_dir import RunDir
from training.run_start import choose_device, run_lineage, start_tracking
from training.stage0_finish import finish_run
from training.timing import Stopwatch

log = logging.getLogger(__name__)


def train_vqvae(cfg: VQVAETrainConfig, resume: str | None = None) -> dict:
    """Train the tokenizer (``resume``: ``auto`` or a checkpoint folder); returns {losses, psnr, export_dir, run_id,
    model_id, resumed_from, colour}."""
    cfg.validate()
    mcfg = VARSRConfig.preset(cfg.model.preset.removeprefix("c2i-"), **cfg.model.overrides)
    shards = resolve_shards(cfg.data.shards)
    if shards.hr_size is not None and shards.hr_size != mcfg.image_size:
        raise UserError(f"shards hold {shards.hr_size}px crops but preset {mcfg.name!r} works at {mcfg.image_size}px")
    dev = choose_device(cfg.device)
    parts = Tokenizer.build(cfg, mcfg, dev)
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = RunDir(str(out))
    fingerprint = _fingerprint(cfg, mcfg)
    ckpt = checkpointing.find_resume(run, resume)
    history, position = parts.resume(ckpt, cfg, fingerprint) if ckpt is not None else ([], DataPosition())
    batches = BatchStream(
        shards,
        size=mcfg.image_size,
        want_lr=False,
        batch_size=cfg.data.batch_size,
        workers=cfg.data.workers,
        seed=cfg.seed,
        rank=0,
        world=1,
        shuffle_buffer=cfg.data.shuffle_buffer,
        position=position,
    )

    def checkpoint(step: int, hist: list[dict]) -> None:
        checkpointing.save_module_state(
            run, step, {**parts.state(batches.pos, hist), "fingerprint": fingerprint}, cfg.keep_checkpoints
        )

    (out / "resolved_config.json").write_text(json.dumps(redact_config(to_dict(cfg)), indent=2))  # no secret
    tracker = start_tracking(
        cfg.tracking,
        stage="vqvae",
        preset=mcfg.name,
        seed=cfg.seed,
        config=to_dict(cfg),
        tags=run_lineage("vqvae", mcfg.name, cfg, shards, str(out), cfg.tracking),
        run_url=str(out),
        datasets=[(shards, "training")],
        prefix="[vqvae]",
    )
    status = "FAILED"
    try:
        history = _train_loop(cfg, parts, iter(batches), dev, tracker, history, checkpoint)
        colour, export, model_id = finish_run(cfg, parts.vqvae, mcfg, shards, dev, out, tracker, history)
        status = "FINISHED"
    finally:
        tracker.end(status)
    first, last = history[0], history[-1]
    summary(
        f"[vqvae] done: {cfg.max_steps} steps, loss {first['loss/total']:.4f} -> {last['loss/total']:.4f}, "
        f"rec-PSNR {first['recon/psnr']:.2f} -> {last['recon/psnr']:.2f} dB; tokenizer -> {export}"
    )
    return dict(
        losses=[h["loss/total"] for h in history],
        psnr=[h["recon/psnr"] for h in history],
        export_dir=str(export),
        run_id=tracker.run_id,
        model_id=model_id,
        resumed_from=str(ckpt) if ckpt else None,
        colour=colour,
    )


@dataclass
class Tokenizer:
    """What stage 0 trains: the VQVAE (all of it, or for stage 0b only ``post_quant_conv`` and the decoder), its
    AdamW and lr schedule, and the patch critic with its own optimiser when ``gan_weight`` > 0."""

    vqvae: VQVAE
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    critic: tuple[torch.nn.Module, torch.optim.Optimizer] | None = None

    @classmethod
    def build(cls, cfg: VQVAETrainConfig, mcfg: VARSRConfig, dev: torch.device) -> Tokenizer:
        """Seeded by ``cfg.seed``, in a fixed order of random draws (tokenizer, then critic), so that a resumed run,
        whose checkpoint then restores the RNG states, continues an uninterrupted one exactly."""
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
        return cls(vqvae, opt, sched, critic)

    def state(self, position: DataPosition, history: list[dict]) -> dict:
        """What a checkpoint holds besides the RNG states (training/checkpointing.py: save_module_state)."""
        c = self.critic
        return {
            "model": self.vqvae.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "record_hit": self.vqvae.quantize.record_hit,
            "position": asdict(position),
            "history": history,
            **({"critic": c[0].state_dict(), "critic_optimizer": c[1].state_dict()} if c else {}),
        }

    def resume(self, ckpt: Path, cfg: VQVAETrainConfig, fingerprint: dict) -> tuple[list[dict], DataPosition]:
        """Load checkpoint ``ckpt`` (after the model is built: its RNG states replace the init's draws); the run's
        metric history so far and the data position to continue from."""
        st = checkpointing.load_module_state(ckpt, fingerprint)
        self.vqvae.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        # the lr of the next step follows this run's schedule (a run extended to more steps decays over the new span)
        for group, base in zip(self.opt.param_groups, self.sched.base_lrs):
            group["lr"] = base * lr_factor(cfg, self.sched.last_epoch)
        self.vqvae.quantize.record_hit = int(st["record_hit"])  # usage EMA updates count (a plain attribute)
        if self.critic is not None:
            self.critic[0].load_state_dict(st["critic"])
            self.critic[1].load_state_dict(st["critic_optimizer"])
        position = DataPosition(**st["position"])
        say(f"[vqvae] resumed from {ckpt} at step {st['step']} (epoch {position.epoch})")
        return st["history"], position


def _fingerprint(cfg: VQVAETrainConfig, mcfg) -> dict:
    """What a resumed run must share with the checkpoint it continues (not max_steps: a run can be extended)."""
    return {
        "geometry": json.dumps(mcfg.to_dict(), sort_keys=True),
        "seed": cfg.seed,
        "lr": cfg.lr,
        "batch_size": cfg.data.batch_size,
        "shards": cfg.data.shards,
        "warmup_steps": cfg.warmup_steps,
        "losses": [cfg.l1_weight, cfg.mse_weight, cfg.vq_weight, cfg.lowpass_weight, cfg.lowpass_factor],
        **({"augment": [True, cfg.augment_colour_p]} if cfg.augment else {}),
        **({"lr_schedule": [cfg.lr_schedule, cfg.min_lr_ratio]} if cfg.lr_schedule != "constant" else {}),
        **({"finetune": [cfg.init_from, cfg.train_parts]} if cfg.init_from else {}),
        **(
            {"sharpness": [cfg.hf_weight, cfg.hf_sigma, cfg.gan_weight, cfg.gan_start, cfg.disc_width, cfg.disc_lr]}
            if cfg.hf_weight or cfg.gan_weight
            else {}
        ),
    }


def _load_init(vqvae, init_from: str) -> None:
    """The weights of the tokenizer to finetune (``init_from``: local folder or URL of a native checkpoint)."""
    from model.checkpoint import load_tokenizer
    from training.model_setup import local_checkpoint

    load_tokenizer(vqvae, local_checkpoint(init_from))
    vqvae.requires_grad_(True)
    say(f"[vqvae] starting from the tokenizer of {init_from}")


EXTRA_LOSSES = ("loss/highpass", "loss/generator", "loss/critic")  # the optional terms, in the order they are added


def _train_loop(
    cfg: VQVAETrainConfig, parts: Tokenizer, stream, dev: torch.device, tracker, history: list[dict], checkpoint
) -> list[dict]:
    """The optimisation steps after those in ``history`` (a resumed run's); returns the per-step metrics of the whole
    run (also logged). ``checkpoint(step, history)`` every ``checkpoint_every`` steps and after the last."""
    history, start, clock = list(history), len(history), Stopwatch().start()
    for step in range(start + 1, cfg.max_steps + 1):
        x = next(stream)["hr"].to(dev) * 2 - 1
        if cfg.augment:
            x = augment_crops([x], stream_generator(cfg.seed, step), cfg.augment_colour_p)[0]
        m = _step(cfg, parts, x, step, dev)
        history.append({"step": step, **m})
        tracker.log_metrics(m, step=step)
        if step % cfg.log_every == 0 or step in (1, cfg.max_steps):
            el = clock.elapsed
            say(
                f"[vqvae] step {step}/{cfg.max_steps} loss {m['loss/total']:.4f} l1 {m['loss/l1']:.4f} "
                f"vq {m['loss/vq']:.4f} rec-PSNR {m['recon/psnr']:.2f} dB "
                + (f"usage {m['codebook/usage_pct']:.1f}% " if "codebook/usage_pct" in m else "")
                + "".join(f"{k.split('/')[1]} {m[k]:.4f} " for k in EXTRA_LOSSES if k in m)
                + f"({el:.0f} s, ETA {el / (step - start) * (cfg.max_steps - step):.0f} s)"
            )
        if step == cfg.max_steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            checkpoint(step, history)
    if not history:
        raise UserError(f"nothing to train: max_steps={cfg.max_steps}")
    return history


def _step(cfg: VQVAETrainConfig, parts: Tokenizer, x: torch.Tensor, step: int, dev: torch.device) -> dict:
    """One optimiser step of the tokenizer (and of the critic, when there is one) on crops ``x`` in [-1, 1]; the
    step's metrics."""
    from training.patch_gan import generator_loss, highpass_l1, hinge_d_loss

    vqvae, critic, decoder_only = parts.vqvae, parts.critic, cfg.train_parts == "decoder"
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
    parts.opt.zero_grad(set_to_none=True)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_([p for p in vqvae.parameters() if p.requires_grad], cfg.grad_clip)
    parts.opt.step()
    parts.sched.step()
    if critic is not None:  # the critic's step on this batch: real crops against the (detached) reconstructions
        disc, disc_opt = critic
        d_loss = hinge_d_loss(disc(x), disc(rec.detach()))
        disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        disc_opt.step()
        extra["loss/critic"] = d_loss
    if (
        cfg.restart_dead_codes_every
        and not decoder_only
        and step % cfg.restart_dead_codes_every == 0
        and step < cfg.max_steps
    ):
        restarted = restart_dead_codes(vqvae, x)
        if restarted:
            log.info("step %d: re-seeded %d unused codes", step, restarted)
    return {
        "loss/total": loss.item(),
        "loss/l1": l1.item(),
        "loss/mse": mse.item(),
        "loss/vq": vq_loss.item(),
        **({"loss/lowpass": lowpass.item()} if lowpass is not None else {}),
        **{k: float(v.detach()) for k, v in extra.items()},
        "optim/grad_norm": float(gn),
        "recon/psnr": float(10 * torch.log10(4.0 / mse.detach().clamp_min(1e-12))),
        "recon/chroma_err": chroma_fidelity(x, rec.detach())["chroma_err"],
        **({"codebook/usage_pct": float(sum(usage) / len(usage))} if usage else {}),
        "lr": parts.sched.get_last_lr()[0],
    }


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
