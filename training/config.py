"""Typed training configuration (docs/MODEL.md §5.3-5.4 defaults), loadable from YAML with ``key=value`` overrides.

One :class:`TrainConfig` toggles everything a run needs — stage, model preset, data, optimiser/schedule, precision,
ZeRO stage, activation checkpointing, checkpointing, validation, tracking, launcher — in the torchtitan style:
``load_train_config("configs/train/stage2_isr_tiny.yaml", ["optim.lr=1e-4", "zero_stage=2"])``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from infra.core.config import ConfigError, load_config
from infra.core.errors import UserError


@dataclass
class ModelSection:
    """Which VARSR to build and where its weights start from."""

    preset: str = "tiny"  # model.config.PRESETS name; stage c2i uses the ``c2i-`` variant automatically
    overrides: dict[str, Any] = field(default_factory=dict)  # VARSRConfig fields, e.g. {drop_path_rate: 0.0}
    init_from: str | None = None  # native checkpoint dir (e.g. stage-1 export) or official VAR/VARSR .pth
    official_vae: str | None = None  # with an official init_from: the official VQVAE .pth
    vqvae_checkpoint: str | None = None  # native dir from `varsr train vqvae` (tokenizer weights only)


@dataclass
class DataSection:
    """Shards (the shard contract, data_pipeline/shards/format.py) and the per-rank loader."""

    shards: str = ""  # shard dir (with manifest.json), a brace/glob URL, or a comma list of tars
    val_shards: str | None = None  # held-out shards for validation (default: the training shards)
    batch_size: int = 4  # per-rank micro-batch
    workers: int = 0  # DataLoader workers per rank
    crop_size: int | None = None  # expected shard HR size; None -> model image size (checked against the manifest)
    shuffle_buffer: int = 64
    samples_per_epoch: int | None = None  # None -> manifest sample count
    split: Literal["node", "global_batch"] = "node"  # global_batch: every rank reads the stream, keeps its slice
    # how the stored LR is resized back to the model size: pil_bicubic (as at inference) or random (a torch mode per
    # sample, as the reference training does; on in the varsr-mild training configs) or one fixed torch mode
    lr_upsample: Literal["pil_bicubic", "random", "bicubic", "bilinear", "area"] = "pil_bicubic"
    # the shards' token cache (`varsr data tokenize`): true = use it when it was made by this run's frozen tokenizer
    # (same weights sha256 and scales), else say so and tokenise HR on the fly; false (YAML `off` too) = always
    # tokenise on the fly
    token_cache: bool = True
    # random RGB channel order, left-right flip and quarter turns, one draw per crop applied alike to its HR and LR
    # (training/augment.py): a base trained on a few dozen photos otherwise draws their palette and textures on an
    # unseen LR (docs/EXPERIMENTS.md). Augmented HR crops have no cached tokens: on = tokenise on the fly.
    augment: bool = False
    augment_colour_p: float = 1.0  # share of augmented crops whose channel order is shuffled (flips/turns: all)
    # a degradation preset (configs/data/<name>.yaml, e.g. varsr-mild): the loader workers draw every HR's LR afresh
    # each epoch, seeded by (seed, epoch, sample key) (data_pipeline/degrade/online.py); "" = the LR stored in the
    # shards (HR-only shards, built with shard.lr_variants=0, need a preset)
    degrade: str = ""
    # rank 0 records the drawn parameters of every N-th batch (MLflow artifact degradations/; replayable); 0 = never
    degrade_log_every: int = 50


@dataclass
class OptimSection:
    """AdamW + warm-up + ``lin0`` schedule (docs/MODEL.md §5.4)."""

    lr: float = 5e-5  # peak lr (no batch-size scaling)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05
    warmup_epochs: float = 0.1
    warmup_start: float = 0.005  # wp0
    schedule: Literal["lin0", "constant", "cosine"] = "lin0"
    plateau: float = 0.3  # lin0: multiplier 1 for this fraction of post-warm-up progress
    end_factor: float = 0.01  # wpe
    grad_clip: float = 2.0
    grad_accum: int = 1


@dataclass
class ValidationSection:
    """Periodic teacher-forced loss/accuracy on held-out shards + SR samples for fixed LR inputs."""

    every: int = 0  # steps; 0 = only at the end
    batches: int = 2
    num_images: int = 4  # fixed LR inputs (the first N held-out samples)
    cfg: float = 6.0
    top_k: int = 1
    top_p: float = 0.75
    seed: int = 0


@dataclass
class TrackingSection:
    """How a run is tracked in MLflow (rank 0 logs)."""

    enabled: bool = True
    tracking_uri: str | None = None  # None -> $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str | None = None  # None -> $MLFLOW_EXPERIMENT_NAME, else the parent run's, else varsr
    # None -> "<stage> <preset> seed<N> <local time>": stage2-isr tiny seed0 2026-11-30T12:37
    run_name: str | None = None
    parent_run_id: str | None = None  # nest the run under this one (e.g. a demo / multi-stage launch); None ->
    #                                    $VARSR_PARENT_RUN_ID. Where the weights come from is lineage (varsr.parent.*)
    system_metrics: bool = True  # CPU / memory / disk / network (GPU with NVML) as system/... metrics
    log_checkpoint: bool = True  # upload the export's weights into its logged model (False: config + lineage only)


@dataclass
class RaySection:
    """Ray Train TorchTrainer settings (used with ``--ray-address``).

    ``num_workers`` is a number of workers, or a ``[min, max]`` range for elastic training (docs/ELASTIC.md): Ray
    Train v2 starts as many workers as the cluster has room for (up to max), goes on with fewer when a node is lost
    (at least min) and grows again when nodes come back; each resize restarts the workers from the last complete
    checkpoint, which resumes on the new number of ranks (training/reshard.py)."""

    num_workers: int | list[int] = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    max_failures: int = 3  # Ray Train restarts the workers from the last complete checkpoint up to this many times
    resize_check_s: float = 60.0  # with a range: how often a healthy run checks whether it can grow (Ray's default)

    @property
    def elastic(self) -> bool:
        """A ``[min, max]`` range was given (a one-element or equal range is still elastic: Ray's policy decides)."""
        return isinstance(self.num_workers, (list, tuple))

    @property
    def workers_range(self) -> tuple[int, int]:
        """(min, max) workers; (n, n) for a plain number."""
        n = self.num_workers
        return (int(n[0]), int(n[-1])) if isinstance(n, (list, tuple)) else (int(n), int(n))

    def errors(self) -> list[str]:
        """One message per setting Ray Train could not honour (checked before any worker starts)."""
        n, errs = self.num_workers, []
        if isinstance(n, (list, tuple)):
            ints = all(isinstance(x, int) and not isinstance(x, bool) for x in n)
            if len(n) != 2 or not ints:
                errs.append(f"ray.num_workers must be a number or a [min, max] range of two integers, got {list(n)}")
            elif n[0] < 1:
                errs.append(f"ray.num_workers range {list(n)}: min must be >= 1 (a run needs one worker)")
            elif n[0] > n[1]:
                errs.append(f"ray.num_workers range {list(n)}: min {n[0]} is above max {n[1]}")
        elif n < 1:
            errs.append(f"ray.num_workers must be >= 1, got {n}")
        return errs  # ray.resize_check_s: RANGES


@dataclass
class SamplingDefaultsSection:
    """Sampling defaults the registered version carries (its checkpoint's ``sampling.json``, model/checkpoint.py);
    None = the exported checkpoint's own, else the global defaults of configs/inference/default.yaml."""

    scale: float | None = None
    cfg: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    color_fix: str | None = None  # adain | wavelet | none (inference/colorfix.py), checked in validate()

    def values(self) -> dict[str, Any]:
        """The defaults that are set, as ``sampling.json`` holds them."""
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class RegisterSection:
    """After a finished run, the ``varsr`` CLI logs the model into this run and registers it when ``name`` is set."""

    name: str | None = None  # registered model name, e.g. varsr; None = do not register
    alias: str = "champion"
    # e.g. register.sampling.cfg=0.75 register.sampling.color_fix=wavelet
    sampling: SamplingDefaultsSection = field(default_factory=SamplingDefaultsSection)


@dataclass
class TrainConfig:
    stage: Literal["c2i", "isr"] = "isr"
    output_dir: str = "runs/train"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = 0
    activation_checkpointing: bool = False
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs for the length of the run (schedule length = total_steps)
    total_steps: int | None = None  # schedule horizon; None -> max_steps or epochs·iters_per_epoch
    checkpoint_every: int = 0  # steps; a final checkpoint is always written
    # object-store output: upload each checkpoint in the background (the step loop waits for the local save only);
    # COMPLETE is written once every rank's upload is done, at the next checkpoint or at the end (docs/ELASTIC.md)
    checkpoint_async: bool = False
    keep_checkpoints: int = 2
    seed: int = 0
    nan_policy: Literal["stop", "skip"] = "stop"
    log_every: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # a DeepSpeed JSON file (path or URL, e.g. configs/deepspeed/zero3_bf16.json) or an inline mapping, merged with
    # what the trainer derives (batch sizes from data.batch_size/optim.grad_accum/world size; zero_stage, precision
    # and optim.grad_clip must agree with it): training/deepspeed_engine.py
    deepspeed: str | dict[str, Any] | None = None
    validation: ValidationSection = field(default_factory=ValidationSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    ray: RaySection = field(default_factory=RaySection)
    register: RegisterSection = field(default_factory=RegisterSection)

    def validate(self) -> "TrainConfig":
        errs = number_errors(self, RANGES)
        if self.zero_stage not in (0, 1, 2, 3):
            errs.append(f"zero_stage must be 0..3, got {self.zero_stage}")
        if self.data.batch_size < 1:
            errs.append("data.batch_size must be >= 1")
        if self.optim.grad_accum < 1:
            errs.append("optim.grad_accum must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            errs.append("max_steps must be >= 1")
        if not 0 <= self.optim.plateau < 1:
            errs.append("optim.plateau must be in [0, 1)")
        if not 0 <= self.data.augment_colour_p <= 1:
            errs.append(f"data.augment_colour_p must be in [0, 1], got {self.data.augment_colour_p}")
        errs += self.ray.errors()
        if self.ray.elastic and self.zero_stage == 3:  # a resize would be refused at the resume (training/reshard.py)
            errs.append(
                "ray.num_workers range needs zero_stage 0-2: a ZeRO-3 checkpoint resumes only on the number of "
                "ranks that wrote it; use a fixed ray.num_workers or zero_stage 2"
            )
        elif self.ray.elastic and self.zero_stage == 0 and self.precision != "fp32":
            errs.append(
                f"ray.num_workers range with zero_stage 0 needs precision fp32 ({self.precision} at ZeRO 0 "
                f"resumes only on the number of ranks that wrote it); use zero_stage 1-2 or a fixed number"
            )
        if self.register.sampling.values():
            from model.checkpoint import validate_sampling_defaults

            try:
                validate_sampling_defaults(self.register.sampling.values(), "register.sampling")
            except UserError as e:  # one line naming the key
                errs.append(str(e))
        if errs:
            raise ConfigError("invalid TrainConfig: " + "; ".join(errs))
        return self

    @property
    def model_preset(self) -> str:
        """The preset actually built: stage c2i uses the ``c2i-`` variant of a plain preset name."""
        p = self.model.preset
        if self.stage == "c2i" and not p.startswith("c2i-"):
            return f"c2i-{p}"
        if self.stage == "isr" and p.startswith("c2i-"):
            return p[len("c2i-") :]
        return p


# numbers that must be finite and within a range (NaN fails every comparison, so each rule also refuses it); a value
# out of range would otherwise end in a torch traceback mid-run (AdamW refuses lr < 0) or train on garbage (lr NaN)
RANGES: dict[str, tuple[Any, str]] = {
    "optim.lr": (lambda v: v > 0, "> 0"),
    "optim.betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "optim.eps": (lambda v: v > 0, "> 0"),
    "optim.weight_decay": (lambda v: v >= 0, ">= 0"),
    "optim.warmup_epochs": (lambda v: v >= 0, ">= 0"),
    "optim.warmup_start": (lambda v: 0 <= v <= 1, "in [0, 1] (a fraction of the peak lr)"),
    "optim.end_factor": (lambda v: 0 <= v <= 1, "in [0, 1] (a fraction of the peak lr)"),
    "optim.grad_clip": (lambda v: v >= 0, ">= 0 (0 = off)"),
    "epochs": (lambda v: v > 0, "> 0"),
    "validation.cfg": (lambda v: v >= 0, ">= 0"),
    "validation.top_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "validation.top_k": (lambda v: v >= 0, ">= 0"),
    "ray.resize_check_s": (lambda v: v >= 0, ">= 0"),
}


def number_errors(cfg: Any, ranges: dict[str, tuple[Any, str]]) -> list[str]:
    """One message per dotted key of ``ranges`` whose value in ``cfg`` is not a finite number within its range,
    naming the key (a None value is "not set" and passes)."""
    import math

    errs = []
    for key, (ok, rule) in ranges.items():
        v: Any = cfg
        for part in key.split("."):
            v = getattr(v, part)
        if v is None:
            continue
        nums = list(v) if isinstance(v, (tuple, list)) else [v]
        finite = all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in nums)
        if not finite or not ok(v):
            errs.append(f"{key} must be a finite number {rule}, got {v!r}")
    return errs


def load_train_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> TrainConfig:
    """defaults <- YAML <- overrides, validated."""
    return load_config(TrainConfig, path, list(overrides)).validate()


@dataclass
class VQVAETrainConfig:
    """Stage 0 (the tokenizer, training/stage0_vqvae.py): what `varsr train vqvae` reads (YAML + key=value overrides).
    Checked by :meth:`validate` before any work, like :class:`TrainConfig`."""

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

    def validate(self) -> "VQVAETrainConfig":
        """Every setting that would fail mid-run or train on garbage, refused at once in one line (UserError)."""
        errs = number_errors(self, VQVAE_RANGES)
        if self.max_steps < 1:
            errs.append("max_steps must be >= 1")
        if self.lowpass_weight < 0 or self.lowpass_factor < 1:
            errs.append(
                f"lowpass_weight must be >= 0 and lowpass_factor >= 1, got {self.lowpass_weight}, {self.lowpass_factor}"
            )
        if self.lr_schedule not in ("constant", "cosine") or not 0 <= self.min_lr_ratio <= 1:
            errs.append(
                f"lr_schedule must be constant or cosine and min_lr_ratio in [0, 1], got "
                f"{self.lr_schedule!r}, {self.min_lr_ratio}"
            )
        if not 0 <= self.augment_colour_p <= 1:
            errs.append(f"augment_colour_p must be in [0, 1], got {self.augment_colour_p}")
        if self.train_parts not in ("all", "decoder"):
            errs.append(f"train_parts must be all or decoder, got {self.train_parts!r}")
        if self.train_parts == "decoder" and not self.init_from:
            errs.append("train_parts=decoder finetunes an existing tokenizer: set init_from to its checkpoint folder")
        if not 0.0 <= self.residual_mix <= 1.0 or (self.residual_mix and self.train_parts != "decoder"):
            errs.append(
                f"residual_mix is a share in [0, 1] and only applies to train_parts=decoder, got "
                f"{self.residual_mix} with train_parts={self.train_parts}"
            )
        if self.hf_weight < 0 or self.gan_weight < 0 or self.hf_sigma <= 0:
            errs.append(
                f"hf_weight and gan_weight must be >= 0 and hf_sigma > 0, got {self.hf_weight}, "
                f"{self.gan_weight}, {self.hf_sigma}"
            )
        if errs:
            raise ConfigError("invalid VQVAE config: " + "; ".join(errs))
        return self


# stage 0's optimiser numbers that must be finite and in range (:func:`number_errors`)
VQVAE_RANGES: dict[str, tuple[Any, str]] = {
    "lr": (lambda v: v > 0, "> 0"),
    "disc_lr": (lambda v: v > 0, "> 0"),
    "betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "grad_clip": (lambda v: v > 0, "> 0"),
}


def load_vqvae_config(source: str | Path | None = None, overrides: Iterable[str] = ()) -> VQVAETrainConfig:
    """defaults <- YAML <- ``key=value`` overrides (checked by ``validate()`` when training starts)."""
    return load_config(VQVAETrainConfig, source, list(overrides))
