"""The training loop: data -> step -> metrics -> checkpoint -> validation, for one rank of a DeepSpeed job.

Every rank runs :func:`train`; rank 0 alone logs to MLflow and writes plots, the export and the summary. The same
function serves the one-process default, torchrun workers and Ray Train workers.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.shards import BatchStream, DataPosition, ShardSet, peek_hr_size, resolve_shards
from infra.core.config import config_hash, save_config, to_dict
from infra.core.errors import UserError
from infra.core.metrics import batch_full_reference
from infra.core.redact import redact
from infra.core.tracking import default_tracking_uri, portable_ref, run_name
from training import checkpointing, deepspeed_engine
from training.config import TrainConfig
from training.model_setup import build_models
from training.run_dir import RunDir
from training.schedule import build_schedule
from training.steps import NonFiniteLoss, _autocast, token_cache_choice, train_step
from training.tracking import (
    STAGE_RUN_KIND,
    MlflowTracker,
    NullTracker,
    checkpoint_lineage,
    lineage_tags,
    manifest_source,
    plot_loss_curves,
    run_params,
    save_grid,
)

log = logging.getLogger("varsr.train")

# what history.jsonl keeps of every step's metrics (the loss-curve plot and benchmarks read it)
HISTORY_KEYS = ("loss/total", "loss/ce", "loss/refiner", "acc/total", "lr", "throughput/tokens_per_s",
                "throughput/step_time_s")

# dense peak FLOP/s for the MFU estimate (bf16 tensor-core numbers; fp32 uses TF32 where it applies)
GPU_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "V100": 125e12}
CPU_PEAK_PER_CORE = 50e9  # rough fp32 AVX2/AVX-512 FMA throughput per core; an estimate, not a measurement


@dataclass
class TrainResult:
    steps: int
    first_loss: float | None
    last_loss: float | None
    losses: list[float] = field(default_factory=list)
    run_id: str | None = None
    export_dir: str | None = None
    init_report: dict | None = None
    bad_samples: int = 0
    skipped_steps: int = 0


def _out(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peak_flops(device: torch.device) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for k, v in GPU_PEAK.items():
            if k in name:
                return v
        return 100e12
    return (os.cpu_count() or 1) * CPU_PEAK_PER_CORE


def step_flops(mcfg, n_params: int, samples: int) -> float:
    """6·params·tokens (fwd+bwd of the dense layers) + 12·depth·C·S² per sample (attention scores and values)."""
    S = mcfg.seq_len
    return 6.0 * n_params * S * samples + 12.0 * mcfg.depth * mcfg.C * S * S * samples


def fingerprint(cfg: TrainConfig, mcfg) -> dict:
    """What a checkpoint must share with the run that resumes it."""
    return {
        "stage": cfg.stage,
        "model_config_hash": config_hash(mcfg.to_dict()),
        "micro_batch": cfg.data.batch_size,
        "grad_accum": cfg.optim.grad_accum,
        "seed": cfg.seed,
        **({"augment": [True, cfg.data.augment_colour_p]} if cfg.data.augment else {}),
    }


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """One rank's view of a training run."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None, on_checkpoint=None, launch: str | None = None):
        self.cfg, self.resume, self.on_checkpoint, self.launch = cfg.validate(), resume, on_checkpoint, launch
        self.device = deepspeed_engine.resolve_device(cfg)
        deepspeed_engine.ensure_dist_env()
        deepspeed_engine.init_distributed(self.device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.run = RunDir(cfg.output_dir, self.rank)
        self.out = self.run.local  # this rank's working folder; published to cfg.output_dir when that is a URL
        self.history: list[dict] = []
        self.tracker = NullTracker()

    # ---- setup -----------------------------------------------------------------------------------------------------
    def _check_shards(self, shards: ShardSet, image_size: int) -> None:
        crop = self.cfg.data.crop_size or image_size
        if crop != image_size:
            raise UserError(f"data.crop_size {crop} does not fit the model: preset {self.cfg.model_preset!r} "
                            f"trains on {image_size}px images")
        seen = shards.hr_size or peek_hr_size(shards.urls[0])
        if seen is not None and seen != image_size:
            raise UserError(f"shards {shards.location!r} hold {seen}px HR crops but model preset "
                            f"{self.cfg.model_preset!r} needs {image_size}px (rebuild the shards at {image_size}px "
                            f"or pick another preset)")

    def setup(self) -> None:
        cfg = self.cfg
        _seed_everything(cfg.seed)
        self.vqvae, varsr, self.init_report, self.parent = build_models(cfg)
        self.mcfg = varsr.cfg
        if cfg.precision == "fp16" and self.device.type == "cpu":
            log.warning("fp16 on CPU: DeepSpeed loss scaling runs, autocast is off (CPU has no fast fp16)")
        self.vqvae.to(self.device)
        self.shards = resolve_shards(cfg.data.shards)
        self._check_shards(self.shards, self.mcfg.image_size)
        n = cfg.data.samples_per_epoch or self.shards.num_samples
        per_step = cfg.data.batch_size * cfg.optim.grad_accum * self.world
        self.iters_per_epoch = max(1, (n // per_step) if n else 100)
        self.total_steps = cfg.total_steps or cfg.max_steps or max(1, math.ceil(cfg.epochs * self.iters_per_epoch))
        self.run_steps = cfg.max_steps or self.total_steps
        self.schedule = build_schedule(cfg.optim, self.total_steps, self.iters_per_epoch)
        self.engine, _, _, self.ds_config = deepspeed_engine.initialize(cfg, varsr.to(self.device), self.schedule)
        self.model = self.engine.module
        self.model.set_vqvae(self.vqvae)
        self.n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed * max(1, self.world) + self.rank)
        self.fingerprint = fingerprint(cfg, self.mcfg)
        self.start_step, position = 0, DataPosition()
        ckpt = checkpointing.find_resume(self.run, self.resume, self.launch)
        self.resumed_from = None
        if ckpt is not None:
            self.start_step, position = checkpointing.load(self.engine, ckpt, self.generator, self.fingerprint)
            self._load_history()
            self.resumed_from = str(self.run.url_of(ckpt.relative_to(self.run.local))
                                    if self.run.remote and ckpt.is_relative_to(self.run.local) else ckpt)
            if self.is_main:
                _out(f"[train] resumed from {redact(self.resumed_from)} at step {self.start_step} "
                     f"(epoch {position.epoch}, {position.samples_consumed} samples consumed on rank 0)")
        if ckpt is None and self.is_main and (self.out / "history.jsonl").exists():
            (self.out / "history.jsonl").unlink()  # a fresh start (or a restart before any checkpoint) begins anew
        self.token_cache, why = token_cache_choice(cfg.data.token_cache, self.shards, self.vqvae, cfg.data.augment)
        if self.is_main:
            _out(f"[train] {why}")
        self.stream = BatchStream(
            self.shards, size=self.mcfg.image_size, want_lr=cfg.stage == "isr", batch_size=cfg.data.batch_size,
            workers=cfg.data.workers, seed=cfg.seed, rank=self.rank, world=self.world, split=cfg.data.split,
            shuffle_buffer=cfg.data.shuffle_buffer, position=position, lr_mode=cfg.data.lr_upsample,
            tokens=self.token_cache)
        if self.is_main:
            save_config(cfg, self.out / "config.yaml")
            (self.out / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=2) + "\n")
            (self.out / "model_config.json").write_text(json.dumps(self.mcfg.to_dict(), indent=2) + "\n")
            names = ["config.yaml", "deepspeed_config.json", "model_config.json"]
            if self.init_report is not None:
                (self.out / "init_report.json").write_text(json.dumps(self.init_report, indent=2) + "\n")
                names.append("init_report.json")
            for name in names:
                self.run.publish(name)
            self._start_tracking()

    def lineage(self) -> dict:
        """The lineage tags of the run (the same keys on every stage, see training/tracking.py), plus where its
        weights start from: ``varsr.parent.*`` (the init checkpoint and its run), ``varsr.tokenizer.*``. Local paths
        are relative to the run's output folder; URLs as given, less any credentials (infra/core/redact.py)."""
        cfg, base = self.cfg, self.run.url
        uri = self.cfg.tracking.tracking_uri or default_tracking_uri()
        tags = lineage_tags(stage=cfg.stage, preset=cfg.model_preset, config=cfg, data_location=self.shards.location,
                            manifest_sha256=self.shards.manifest_sha256, run_base=base, output_url=self.run.url,
                            tracking_uri=uri)
        tags["varsr.model_config_hash"] = self.fingerprint["model_config_hash"]
        if cfg.model.init_from:
            tags["varsr.parent.checkpoint"] = portable_ref(cfg.model.init_from, base)
            if self.parent.get("run_id"):
                tags["varsr.parent.run_id"] = self.parent["run_id"]
        if cfg.model.vqvae_checkpoint:
            tags["varsr.tokenizer.checkpoint"] = portable_ref(cfg.model.vqvae_checkpoint, base)
            tok_run = checkpoint_lineage(cfg.model.vqvae_checkpoint).get("mlflow_run_id")
            if tok_run:
                tags["varsr.tokenizer.run_id"] = tok_run
        if self.resumed_from:
            tags["varsr.resumed_from"] = portable_ref(self.resumed_from, base)
        return {k: redact(v) for k, v in tags.items()}  # also written into the export's config.json: no secret

    def _start_tracking(self) -> None:
        t, cfg = self.cfg.tracking, self.cfg
        if not t.enabled:
            return
        uri = t.tracking_uri or default_tracking_uri()
        self.tracking_uri = uri
        params_cfg = to_dict(cfg)
        params_cfg["resolved"] = {"world_size": self.world, "iters_per_epoch": self.iters_per_epoch,
                                  "total_steps": self.total_steps, "warmup_steps": self.schedule.warmup_steps,
                                  "trainable_params": self.n_params, "image_size": self.mcfg.image_size,
                                  "global_batch": self.ds_config["train_batch_size"]}
        name = t.run_name or run_name(STAGE_RUN_KIND[cfg.stage], cfg.model_preset.removeprefix("c2i-"),
                                      f"seed{cfg.seed}")
        self.tracker = MlflowTracker(uri, name, experiment=t.experiment, parent_run_id=t.parent_run_id,
                                     params=run_params(params_cfg, self.run.url), config=params_cfg,
                                     tags=self.lineage(), source=f"varsr train {cfg.stage}",
                                     system_metrics=t.system_metrics)
        self._log_inputs()
        self.tracker.log_artifact(self.out / "deepspeed_config.json", "config")
        self.tracker.log_artifact(self.out / "model_config.json", "config")
        if self.init_report is not None:
            self.tracker.log_artifact(self.out / "init_report.json", "init")
            self.tracker.log_metrics({f"init/{k}": len(v) for k, v in self.init_report.items()}, step=0)
        _out(f"[train] MLflow run {self.tracker.run_id} ({name}) at {redact(uri)}")

    def _log_inputs(self) -> None:
        """Dataset inputs (the shard manifests) and model inputs (the tokenizer and init checkpoints' logged models,
        when they are in this store)."""
        cfg, base = self.cfg, self.run.url
        for shards, context in ((self.shards, "training"),
                                (resolve_shards(cfg.data.val_shards) if cfg.data.val_shards else None, "validation")):
            if shards is None or not shards.manifest_sha256:
                continue
            src = manifest_source(shards.location, base)
            if src is not None:
                self.tracker.log_dataset(src, shards.manifest_sha256, context=context,
                                         name=os.path.basename(os.path.normpath(shards.location.rstrip("/"))),
                                         profile=_shard_profile(shards))
        for ref in (cfg.model.vqvae_checkpoint, cfg.model.init_from):
            self.tracker.log_model_input(checkpoint_lineage(ref).get("mlflow_model_id"))

    def _load_history(self) -> None:
        p = self.out / "history.jsonl"
        if self.run.remote:
            self.run.fetch("history.jsonl")
        if p.is_file():
            rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
            self.history = [r for r in rows if r["step"] <= self.start_step]
            if self.is_main:  # drop rows of steps after the checkpoint (they will be re-run)
                p.write_text("".join(json.dumps(r) + "\n" for r in self.history))

    # ---- loop --------------------------------------------------------------------------------------------------------
    def _check_labels(self, batch: dict) -> None:
        if self.cfg.stage == "c2i":
            m = int(batch["class_id"].max())
            if m >= self.mcfg.num_classes:
                raise UserError(f"shard class id {m} >= model num_classes {self.mcfg.num_classes}: set "
                                f"model.overrides.num_classes to at least {m + 1}")

    def _labelled(self, batches):
        for b in batches:
            self._check_labels(b)
            yield b

    def _metrics(self, step: int, r, dt: float) -> dict:
        """One step's metrics under the platform's names (loss/..., acc/..., ce/..., throughput/..., optim/...)."""
        samples = r.samples * self.world
        tokens = r.tokens * self.world
        flops = step_flops(self.mcfg, self.n_params, samples)
        m = {"loss/total": r.loss, "loss/ce": r.ce, "loss/refiner": r.diff, "acc/total": r.acc, "lr": r.lr,
             "optim/loss_scale": r.loss_scale,
             "throughput/tokens_per_s": tokens / dt, "throughput/samples_per_s": samples / dt,
             "throughput/mfu": flops / dt / (peak_flops(self.device) * self.world), "throughput/step_time_s": dt,
             "data/skipped_microbatches": r.skipped, "data/bad_samples_total": self.stream.pos.bad_samples,
             "data/epoch": self.stream.pos.epoch}
        if r.grad_norm is not None:
            m["optim/grad_norm"] = r.grad_norm
        for i, (a, c) in enumerate(zip(r.acc_per_scale, r.ce_per_scale)):
            m[f"acc/scale_{i}"] = a
            m[f"ce/scale_{i}"] = c
        for k, v in r.timings.items():
            m[f"time/{k}_s"] = v
        return m

    def _save_nonfinite(self, e: NonFiniteLoss) -> Path:
        d = self.out / f"nonfinite_step_{e.step:08d}"
        d.mkdir(parents=True, exist_ok=True)
        batch = {k: v for k, v in e.batch.items() if isinstance(v, torch.Tensor)}
        torch.save(batch, d / f"batch_rank{self.rank}.pt")
        (d / f"info_rank{self.rank}.json").write_text(json.dumps(
            {"step": e.step, "values": e.values, "keys": e.batch.get("key", [])}, indent=2) + "\n")
        self.run.publish_tree(d.name)
        return d

    def train(self) -> TrainResult:
        self.setup()
        cfg = self.cfg
        batches = self._labelled(iter(self.stream))
        self.model.train()
        step = self.start_step
        losses, skipped_total = [], 0
        t_start = time.perf_counter()
        if self.is_main:
            _out(f"[train] stage {cfg.stage} preset {cfg.model_preset}: {self.n_params / 1e6:.2f} M trainable "
                 f"params, world {self.world}, ZeRO-{cfg.zero_stage} {cfg.precision}, steps {step}->"
                 f"{self.run_steps} of {self.total_steps} (warm-up {self.schedule.warmup_steps})")
        status = "FAILED"
        try:
            while step < self.run_steps:
                t0 = time.perf_counter()
                try:
                    r = train_step(self.engine, self.vqvae, batches, stage=cfg.stage, step=step,
                                   device=self.device, precision=cfg.precision, generator=self.generator,
                                   nan_policy=cfg.nan_policy, grad_accum=cfg.optim.grad_accum,
                                   augment_seed=cfg.seed if cfg.data.augment else None,
                                   augment_colour_p=cfg.data.augment_colour_p, rank=self.rank)
                except NonFiniteLoss as e:
                    d = self._save_nonfinite(e)
                    raise UserError(f"{e}; offending batch saved to {d} (set nan_policy=skip to skip such steps, "
                                    f"or lower optim.lr)") from None
                dt = time.perf_counter() - t0
                step += 1
                skipped_total += r.skipped
                m = self._metrics(step, r, dt)
                losses.append(r.loss)
                self.history.append({"step": step, **{k: m[k] for k in HISTORY_KEYS}})
                if self.is_main:
                    with open(self.out / "history.jsonl", "a") as f:
                        f.write(json.dumps(self.history[-1]) + "\n")
                    if step % cfg.log_every == 0 or step == self.run_steps:
                        self.tracker.log_metrics(m, step=step)
                        _out(f"[train] step {step}/{self.run_steps} loss {r.loss:.4f} ce {r.ce:.4f} "
                             f"refiner {r.diff:.4f} acc {r.acc:.3f} lr {r.lr:.2e} "
                             f"gnorm {m.get('optim/grad_norm', 0):.3f} {m['throughput/samples_per_s']:.1f} samples/s")
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < self.run_steps:
                    self._checkpoint(step)
                if cfg.validation.every and step % cfg.validation.every == 0 and step < self.run_steps:
                    self.validate(step)
            if step not in checkpointing.complete_checkpoints(self.run):
                self._checkpoint(step)
            self.validate(step)
            self.rank_checksums = self._rank_checksums()
            export = self.export(step)
            status = "FINISHED"
        finally:
            if self.is_main:
                self._finish(step, losses, time.perf_counter() - t_start, status)
        return TrainResult(steps=step, first_loss=losses[0] if losses else None,
                           last_loss=losses[-1] if losses else None, losses=losses, run_id=self.tracker.run_id,
                           export_dir=str(export) if export else None, init_report=self.init_report,
                           bad_samples=self.stream.pos.bad_samples, skipped_steps=skipped_total)

    def _checkpoint(self, step: int) -> None:
        """A complete checkpoint (every rank), then the run history with it, so a resumed run sees both."""
        location = checkpointing.save(self.engine, self.run, step, self.stream.pos, self.generator,
                                      self.fingerprint, self.cfg.keep_checkpoints, self.launch)
        if self.is_main:
            self.run.publish("history.jsonl")
        if self.on_checkpoint is not None:  # e.g. Ray Train's failure handling (training/launch.py), every rank
            self.on_checkpoint(step, location)

    # ---- validation --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, step: int) -> dict:
        """Teacher-forced val loss/acc + SR samples (PSNR/SSIM) for fixed inputs; rank 0 (all ranks under ZeRO-3)."""
        if not self.is_main and self.cfg.zero_stage < 3:
            return {}
        from model import compute_loss

        v = self.cfg.validation
        shards = resolve_shards(v_sh) if (v_sh := self.cfg.data.val_shards) else self.shards
        stream = BatchStream(shards, size=self.mcfg.image_size, want_lr=self.cfg.stage == "isr",
                             batch_size=self.cfg.data.batch_size, workers=0, seed=v.seed, rank=0, world=1,
                             split="global_batch", shuffle_buffer=0)
        self.model.eval()
        gen = torch.Generator(device=self.device).manual_seed(v.seed)
        losses, accs, first = [], [], None
        it = iter(stream)
        for _ in range(max(1, v.batches)):
            b = next(it)
            self._check_labels(b)
            first = first or b
            hr = b["hr"].to(self.device)
            lr = b["lr"].to(self.device) if self.cfg.stage == "isr" else None
            label = (b["label"] if self.cfg.stage == "isr" else b["class_id"]).to(self.device)
            with _autocast(self.device, self.cfg.precision):  # the training step's precision
                out = compute_loss(self.vqvae, self.model, hr, lr, label, generator=gen)
            losses.append(out.loss.item())
            accs.append(out.acc)
        metrics = {"val/loss": float(np.mean(losses)), "val/acc": float(np.mean(accs))}
        rows, titles, labels = self._samples(stream, v, metrics)
        self.model.train()
        if self.is_main:
            grid = save_grid(rows, titles, self.out / "samples" / f"samples_step{step:08d}.png", row_labels=labels)
            self.tracker.log_artifact(grid, "samples")
            self.tracker.log_metrics(metrics, step=step)
            self.history.append({"step": step, **metrics})  # a row of its own: history.jsonl draws val curves too
            with open(self.out / "history.jsonl", "a") as f:
                f.write(json.dumps(self.history[-1]) + "\n")
            _out(f"[val] step {step} " + " ".join(f"{k} {val:.4f}" for k, val in metrics.items()))
        return metrics

    def _distinct_samples(self, stream: BatchStream, n: int, prefer_classes: bool) -> list[dict]:
        """Up to ``n`` held-out samples with pairwise different HR images (shards hold several LR variants of one HR
        crop; a grid of one photo four times shows nothing), read from at most one epoch of the validation stream.
        ``prefer_classes``: first one sample per class, then the rest."""
        seen, found = set(), []
        for b in stream:
            self._check_labels(b)
            for i in range(b["hr"].shape[0]):
                digest = hash(b["hr"][i].numpy().tobytes())
                if digest in seen:
                    continue
                seen.add(digest)
                found.append({"hr": b["hr"][i], "lr": b["lr"][i] if "lr" in b else None,
                              "class_id": int(b["class_id"][i]), "key": str(b["key"][i])})
            enough = len({s["class_id"] for s in found}) >= n if prefer_classes else len(found) >= n
            if enough or stream.pos.epoch > 0 or len(found) >= 16 * n:
                break
        if prefer_classes:
            by_class: dict[int, dict] = {}
            for s in found:
                by_class.setdefault(s["class_id"], s)
            first = list(by_class.values())
            found = first + [s for s in found if all(s is not f for f in first)]
        return found[:n]

    def _samples(self, stream: BatchStream, v, metrics: dict):
        """Grid rows for the first ``num_images`` distinct held-out samples: LR | SR | HR (isr; PSNR/SSIM of the SR
        into ``metrics``) or generated | real for that sample's class (c2i; one seed per row)."""
        n = max(1, v.num_images)
        c2i = self.cfg.stage != "isr"
        picked = self._distinct_samples(stream, n, prefer_classes=c2i)
        hr = torch.stack([s["hr"] for s in picked])
        if not c2i:
            lr = torch.stack([s["lr"] for s in picked])
            gen = torch.Generator(device=self.device).manual_seed(v.seed)
            with _autocast(self.device, self.cfg.precision):
                sr = self.model.generate(lr.to(self.device), label=0, cfg=v.cfg, top_k=v.top_k, top_p=v.top_p,
                                         generator=gen).float().cpu()
            metrics.update({f"val/{k}": val for k, val in batch_full_reference(sr, hr).items()})
            labels = [f"{s['key'][-28:]}   SR PSNR-Y {batch_full_reference(sr[i:i + 1], hr[i:i + 1])['psnr_y']:.2f} dB"
                      for i, s in enumerate(picked)]
            return [[lr[i], sr[i], hr[i]] for i in range(len(picked))], ["LR input", "SR", "HR"], labels
        imgs = []
        for i, s in enumerate(picked):  # one generator per row: tiles differ even for one class
            gen = torch.Generator(device=self.device).manual_seed(v.seed + i)
            with _autocast(self.device, self.cfg.precision):
                imgs.append(self.model.generate(None, class_labels=torch.tensor([s["class_id"]], device=self.device),
                                                cfg=v.cfg, top_k=v.top_k, top_p=v.top_p,
                                                generator=gen).float().cpu()[0])
        labels = [f"class {s['class_id']}   seed {v.seed + i}" for i, s in enumerate(picked)]
        return [[imgs[i], hr[i]] for i in range(len(picked))], ["generated", "real, same class"], labels

    # ---- end ---------------------------------------------------------------------------------------------------------
    def export(self, step: int) -> Path | None:
        """Final weights in the native format (+ lineage), optionally registered; rank 0 writes."""
        import deepspeed

        from model import save_pretrained

        params = list(self.model.parameters())
        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if self.cfg.zero_stage == 3 else None
        d = self.out / "final"
        if self.run.remote and d.exists():
            import shutil

            shutil.rmtree(d)
        if ctx is not None:
            ctx.__enter__()
        model = None
        try:
            if self.is_main:
                self.model.float()
                # the export becomes a logged model of this run, unless the CLI logs the served model at registration
                if not self.cfg.register.name and isinstance(self.tracker, MlflowTracker):
                    model = self.tracker.create_model(STAGE_RUN_KIND[self.cfg.stage],
                                                      model_type=f"varsr-{self.cfg.stage}-checkpoint",
                                                      tags=self.lineage())
                lineage = {**self.lineage(), "mlflow_run_id": self.tracker.run_id, "step": step,
                           "mlflow_model_id": model.model_id if model else None}
                save_pretrained(d, self.vqvae, self.model, extra={"lineage": lineage})
                save_config(self.cfg, d / "train_config.yaml")
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
        if not self.is_main:
            return d
        self.tracker.log_artifact(d / "config.json", "final")
        self.tracker.log_artifact(d / "train_config.yaml", "final")
        self.run.publish_tree("final")
        export_ref = "final" if not self.run.remote else self.run.url_of("final")  # relative to the output folder
        self.tracker.set_tags({"varsr.export_dir": export_ref})
        if model is not None:
            self.tracker.log_checkpoint_model(model.name, d, model_id=model.model_id,
                                              weights=self.cfg.tracking.log_checkpoint, step=step)
        _out(f"[train] exported final weights to {redact(self.run.url_of('final'))}")
        return d

    @torch.no_grad()
    def _rank_checksums(self) -> list[float]:
        """sum(p) + sum(p²) over all parameters on every rank (all-gathered): ranks must agree after training."""
        if self.cfg.zero_stage == 3:
            return []
        s = sum(p.double().sum() + p.double().pow(2).sum() for p in self.model.parameters())
        t = torch.tensor([float(s)], dtype=torch.float64, device=self.device)
        out = [torch.zeros_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        vals = [float(x) for x in out]
        if self.is_main and max(vals) - min(vals) > 1e-6 * max(1.0, abs(vals[0])):
            log.warning("parameters differ across ranks: %s", vals)
        return vals

    def _finish(self, step: int, losses: list[float], wall: float, status: str) -> None:
        if self.history:
            png = plot_loss_curves(self.history, self.out / "plots" / "loss_curve.png")
            self.tracker.log_artifact(png, "plots")
        summary = {
            "status": status, "stage": self.cfg.stage, "steps": step, "wall_s": round(wall, 1),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "bad_samples": self.stream.pos.bad_samples if hasattr(self, "stream") else 0,
            "mlflow_run_id": self.tracker.run_id, **_store_ref(getattr(self, "tracking_uri", None), self.run.url),
            "output_dir": redact(self.run.url) if self.run.remote else ".",
            "export_dir": (self.run.url_of("final") if self.run.remote else "final") if status == "FINISHED" else None,
            "world_size": self.world, "rank_param_checksums": getattr(self, "rank_checksums", []),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        for rel in ("history.jsonl", "samples", "plots", "summary.json"):  # summary last: the run is done
            if (self.out / rel).is_dir():
                self.run.publish_tree(rel)
            elif (self.out / rel).is_file():
                self.run.publish(rel)
        self.tracker.log_artifact(self.out / "summary.json")
        self.tracker.end("FINISHED" if status == "FINISHED" else "FAILED")
        summary["output_dir"] = redact(self.run.url)  # on the terminal: where to look
        width = max(len(k) for k in summary)
        _out("[train] summary\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in summary.items()))


def _store_ref(tracking_uri: str | None, output_url: str) -> dict:
    """How summary.json names the tracking store: a SQLite file relative to the output folder (they move together),
    any other store by its URI without credentials (``http://***@host``: infra/core/redact.py; the registry finds
    the full URI again in ``$MLFLOW_TRACKING_URI`` or ``--tracking-uri``)."""
    from infra.core.tracking import sqlite_path

    if tracking_uri is None:
        return {"tracking_uri": None}
    db = sqlite_path(tracking_uri)
    if db is None or "://" in output_url:
        return {"tracking_uri": redact(tracking_uri)}
    return {"tracking_store": portable_ref(db, output_url)}


def _shard_profile(shards: ShardSet) -> dict:
    """What the dataset input of a run says about its shards beyond source and digest."""
    return {"manifest_sha256": shards.manifest_sha256, "samples": shards.num_samples, "shards": len(shards.urls),
            "hr_size": shards.hr_size}


def train(cfg: TrainConfig, resume: str | None = None, shutdown: bool = False, on_checkpoint=None,
          launch: str | None = None) -> TrainResult:
    """Run (or resume) a training job on this rank (``launch``: the Ray Train launch this rank belongs to, see
    ``checkpointing.find_resume``).

    The process group stays up for further runs in this process (DeepSpeed caches its groups) and is torn down at
    exit (or now, with ``shutdown=True``; launchers do that).
    """
    try:
        return Trainer(cfg, resume, on_checkpoint, launch).train()
    finally:
        if shutdown:
            deepspeed_engine.shutdown()
