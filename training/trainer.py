"""The training loop: data -> step -> metrics -> checkpoint -> validation, for one rank of a DeepSpeed job.

Every rank runs :func:`train`; rank 0 alone logs to MLflow and writes plots, the export and the summary. The same
function serves the one-process default, torchrun workers and Ray Train workers.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.shards import BatchStream, DataPosition, ShardSet, peek_hr_size, resolve_shards
from infra.core.config import config_hash, save_config, to_dict
from infra.core.errors import UserError
from infra.core.log import say
from infra.core.redact import redact
from infra.core.tracking import portable_ref
from training import checkpointing, deepspeed_engine, finish
from training.config import TrainConfig
from training.figures import save_grid
from training.model_setup import build_models
from training.run_dir import RunDir
from training.run_start import run_lineage, start_tracking, tracking_uri
from training.schedule import build_schedule
from training.steps import NonFiniteLoss, StepSetup, token_cache_choice, train_step
from training.timing import Stopwatch, peak_flops, step_flops
from training.tracking import NullTracker, checkpoint_lineage
from training.validation import evaluate

log = logging.getLogger(__name__)

# what history.jsonl keeps of every step's metrics (the loss-curve plot and benchmarks read it)
HISTORY_KEYS = (
    "loss/total",
    "loss/ce",
    "loss/refiner",
    "acc/total",
    "lr",
    "throughput/tokens_per_s",
    "throughput/step_time_s",
)


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
        self.tracker: NullTracker = NullTracker()

    # ---- setup -----------------------------------------------------------------------------------------------------
    def _check_shards(self, shards: ShardSet, image_size: int) -> None:
        crop = self.cfg.data.crop_size or image_size
        if crop != image_size:
            raise UserError(
                f"data.crop_size {crop} does not fit the model: preset {self.cfg.model_preset!r} "
                f"trains on {image_size}px images"
            )
        seen = shards.hr_size or peek_hr_size(shards.urls[0])
        if seen is not None and seen != image_size:
            raise UserError(
                f"shards {shards.location!r} hold {seen}px HR crops but model preset "
                f"{self.cfg.model_preset!r} needs {image_size}px (rebuild the shards at {image_size}px "
                f"or pick another preset)"
            )

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
            self.start_step, position = checkpointing.load(
                self.engine, ckpt, self.generator, self.fingerprint, cfg.data.split, cfg.data.workers
            )
            self._load_history()
            self.resumed_from = str(
                self.run.url_of(ckpt.relative_to(self.run.local))
                if self.run.remote and ckpt.is_relative_to(self.run.local)
                else ckpt
            )
            if self.is_main:
                say(
                    f"[train] resumed from {redact(self.resumed_from)} at step {self.start_step} "
                    f"(epoch {position.epoch}, {position.samples_consumed} samples consumed on rank 0)"
                )
        if ckpt is None and self.is_main and (self.out / "history.jsonl").exists():
            (self.out / "history.jsonl").unlink()  # a fresh start (or a restart before any checkpoint) begins anew
        self.token_cache, why = token_cache_choice(cfg.data.token_cache, self.shards, self.vqvae, cfg.data.augment)
        if self.is_main:
            say(f"[train] {why}")
        self.stream = BatchStream(
            self.shards,
            size=self.mcfg.image_size,
            want_lr=cfg.stage == "isr",
            batch_size=cfg.data.batch_size,
            workers=cfg.data.workers,
            seed=cfg.seed,
            rank=self.rank,
            world=self.world,
            split=cfg.data.split,
            shuffle_buffer=cfg.data.shuffle_buffer,
            position=position,
            lr_mode=cfg.data.lr_upsample,
            tokens=self.token_cache,
            degrade=cfg.data.degrade,
            record_draws=(self.out / "degradations.jsonl", cfg.data.degrade_log_every) if self.is_main else None,
        )
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
        tags = run_lineage(cfg.stage, cfg.model_preset, cfg, self.shards, base, cfg.tracking)
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
        """The stage's MLflow run (training/run_start.py), then this stage's own artifacts."""
        t, cfg = self.cfg.tracking, self.cfg
        if not t.enabled:
            return
        self.tracking_uri = tracking_uri(t)
        params_cfg = to_dict(cfg)
        params_cfg["resolved"] = {
            "world_size": self.world,
            "iters_per_epoch": self.iters_per_epoch,
            "total_steps": self.total_steps,
            "warmup_steps": self.schedule.warmup_steps,
            "trainable_params": self.n_params,
            "image_size": self.mcfg.image_size,
            "global_batch": self.ds_config["train_batch_size"],
        }
        val = resolve_shards(cfg.data.val_shards) if cfg.data.val_shards else None
        self.tracker = start_tracking(
            t,
            stage=cfg.stage,
            preset=cfg.model_preset.removeprefix("c2i-"),
            seed=cfg.seed,
            config=params_cfg,
            tags=self.lineage(),
            run_url=self.run.url,
            datasets=[(self.shards, "training"), (val, "validation")],
            model_inputs=[cfg.model.vqvae_checkpoint, cfg.model.init_from],
        )
        self.tracker.log_artifact(self.out / "deepspeed_config.json", "config")
        self.tracker.log_artifact(self.out / "model_config.json", "config")
        if self.init_report is not None:
            self.tracker.log_artifact(self.out / "init_report.json", "init")
            self.tracker.log_metrics({f"init/{k}": len(v) for k, v in self.init_report.items()}, step=0)

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
                raise UserError(
                    f"shard class id {m} >= model num_classes {self.mcfg.num_classes}: set "
                    f"model.overrides.num_classes to at least {m + 1}"
                )

    def _labelled(self, batches):
        for b in batches:
            self._check_labels(b)
            yield b

    def _metrics(self, step: int, r, dt: float) -> dict:
        """One step's metrics under the platform's names (loss/..., acc/..., ce/..., throughput/..., optim/...)."""
        samples = r.samples * self.world
        tokens = r.tokens * self.world
        flops = step_flops(self.mcfg, self.n_params, samples)
        m = {
            "loss/total": r.loss,
            "loss/ce": r.ce,
            "loss/refiner": r.diff,
            "acc/total": r.acc,
            "lr": r.lr,
            "optim/loss_scale": r.loss_scale,
            "throughput/tokens_per_s": tokens / dt,
            "throughput/samples_per_s": samples / dt,
            "throughput/mfu": flops / dt / (peak_flops(self.device) * self.world),
            "throughput/step_time_s": dt,
            "data/skipped_microbatches": r.skipped,
            "data/bad_samples_total": self.stream.pos.bad_samples,
            "data/epoch": self.stream.pos.epoch,
        }
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
        (d / f"info_rank{self.rank}.json").write_text(
            json.dumps({"step": e.step, "values": e.values, "keys": e.batch.get("key", [])}, indent=2) + "\n"
        )
        self.run.publish_tree(d.name)
        return d

    def train(self) -> TrainResult:
        self.setup()
        cfg = self.cfg
        batches = self._labelled(iter(self.stream))
        run = StepSetup.of(cfg, self.device, self.rank)
        self.model.train()
        step = self.start_step
        losses, skipped_total = [], 0
        clock = Stopwatch().start()
        if self.is_main:
            say(
                f"[train] stage {cfg.stage} preset {cfg.model_preset}: {self.n_params / 1e6:.2f} M trainable "
                f"params, world {self.world}, ZeRO-{cfg.zero_stage} {cfg.precision}, steps {step}->"
                f"{self.run_steps} of {self.total_steps} (warm-up {self.schedule.warmup_steps})"
            )
        status = "FAILED"
        try:
            while step < self.run_steps:
                with Stopwatch() as took:
                    r = self._step(batches, run, step)
                step += 1
                skipped_total += r.skipped
                losses.append(r.loss)
                self._record(step, r, self._metrics(step, r, took.seconds))
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
                self._finish(step, losses, clock.elapsed, status)
        return TrainResult(
            steps=step,
            first_loss=losses[0] if losses else None,
            last_loss=losses[-1] if losses else None,
            losses=losses,
            run_id=self.tracker.run_id,
            export_dir=str(export) if export else None,
            init_report=self.init_report,
            bad_samples=self.stream.pos.bad_samples,
            skipped_steps=skipped_total,
        )

    def _step(self, batches, run: StepSetup, step: int):
        """One optimiser step (training/steps.py); a non-finite loss under ``nan_policy=stop`` saves its batch."""
        try:
            return train_step(self.engine, self.vqvae, batches, run, step, self.generator)
        except NonFiniteLoss as e:
            d = self._save_nonfinite(e)
            raise UserError(
                f"{e}; offending batch saved to {d} (set nan_policy=skip to skip such steps, or lower optim.lr)"
            ) from None

    def _record(self, step: int, r, m: dict) -> None:
        """A step's row in the history (and history.jsonl); every ``log_every`` steps its metrics and one line."""
        self.history.append({"step": step, **{k: m[k] for k in HISTORY_KEYS}})
        if not self.is_main:
            return
        with open(self.out / "history.jsonl", "a") as f:
            f.write(json.dumps(self.history[-1]) + "\n")
        if step % self.cfg.log_every == 0 or step == self.run_steps:
            self.tracker.log_metrics(m, step=step)
            say(
                f"[train] step {step}/{self.run_steps} loss {r.loss:.4f} ce {r.ce:.4f} refiner {r.diff:.4f} "
                f"acc {r.acc:.3f} lr {r.lr:.2e} gnorm {m.get('optim/grad_norm', 0):.3f} "
                f"{m['throughput/samples_per_s']:.1f} samples/s"
            )

    def _checkpoint(self, step: int) -> None:
        """A complete checkpoint (every rank), then the run history with it, so a resumed run sees both."""
        location = checkpointing.save(
            self.engine,
            self.run,
            step,
            self.stream.pos,
            self.generator,
            self.fingerprint,
            self.cfg.keep_checkpoints,
            self.launch,
            asynchronous=self.cfg.checkpoint_async,
        )
        if self.is_main:
            self.run.publish("history.jsonl")
        if self.on_checkpoint is not None:  # e.g. Ray Train's failure handling (training/launch.py), every rank
            self.on_checkpoint(step, location)

    # ---- validation --------------------------------------------------------------------------------------------------
    def validate(self, step: int) -> dict:
        """Teacher-forced val loss/acc + SR samples (PSNR/SSIM) for fixed inputs (training/validation.py); rank 0 (all
        ranks under ZeRO-3) computes, rank 0 writes the grid, the metrics and the history row."""
        if not self.is_main and self.cfg.zero_stage < 3:
            return {}
        self.model.eval()
        metrics, (rows, titles, labels) = evaluate(
            self.cfg, self.model, self.vqvae, self.shards, self.mcfg.image_size, self.device, self._check_labels
        )
        self.model.train()
        if self.is_main:
            grid = save_grid(rows, titles, self.out / "samples" / f"samples_step{step:08d}.png", row_labels=labels)
            self.tracker.log_artifact(grid, "samples")
            self.tracker.log_metrics(metrics, step=step)
            self.history.append({"step": step, **metrics})  # a row of its own: history.jsonl draws val curves too
            with open(self.out / "history.jsonl", "a") as f:
                f.write(json.dumps(self.history[-1]) + "\n")
            say(f"[val] step {step} " + " ".join(f"{k} {val:.4f}" for k, val in metrics.items()))
        return metrics

    # ---- end (training/finish.py) ------------------------------------------------------------------------------------
    def export(self, step: int) -> Path | None:
        return finish.export_final(self, step)

    def _rank_checksums(self) -> list[float]:
        return finish.rank_checksums(self)

    def _finish(self, step: int, losses: list[float], wall: float, status: str) -> None:
        finish.write_summary(self, step, losses, wall, status)


def train(
    cfg: TrainConfig, resume: str | None = None, shutdown: bool = False, on_checkpoint=None, launch: str | None = None
) -> TrainResult:
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
