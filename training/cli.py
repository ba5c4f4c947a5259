"""``varsr train c2i|isr --config YAML [key=value ...] [--resume auto] [--nproc N] [--ray-address ADDR]``."""
from __future__ import annotations

import argparse

from infra.core.config import ConfigError
from infra.core.errors import UserError


def _load(args, stage: str | None):
    from infra.core.config import load_config

    from training.config import TrainConfig

    try:
        cfg = load_config(TrainConfig, args.config, [*args.overrides, f"stage={stage}"])
        return cfg.validate()
    except ConfigError as e:
        raise UserError(str(e)) from None


def _run_stage(args) -> int:
    from training import launch

    cfg = _load(args, args.stage)
    if args.ray_address:
        launch.run_ray(cfg, args.ray_address, args.resume)
        return 0
    if args.nproc and args.nproc > 1:
        return launch.run_torchrun(cfg, args.nproc, args.resume)
    launch.run_local(cfg, args.resume)
    return 0


def _run_vqvae(args) -> int:
    from infra.core.config import load_config

    from training.stage0_vqvae import VQVAETrainConfig, train_vqvae

    try:
        cfg = load_config(VQVAETrainConfig, args.config, args.overrides)
    except ConfigError as e:
        raise UserError(str(e)) from None
    train_vqvae(cfg)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train VARSR (stage 0 vqvae, stage 1 c2i, stage 2 isr)")
    sub = p.add_subparsers(dest="train_stage", metavar="STAGE", required=True)
    for stage, help_ in (("c2i", "stage 1: class-to-image pretraining"), ("isr", "stage 2: ISR finetuning")):
        s = sub.add_parser(stage, help=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        s.add_argument("--config", help="YAML (e.g. configs/train/stage2_isr_tiny.yaml)")
        s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-4 zero_stage=2")
        s.add_argument("--resume", default=None, help="'auto' = latest complete checkpoint in output_dir, or a path")
        s.add_argument("--nproc", type=int, default=1, help="local processes (re-execs via torchrun)")
        s.add_argument("--ray-address", default=None, help="Ray cluster address ('local' = start one here)")
        s.set_defaults(func=_run_stage, stage=stage)
    s = sub.add_parser("vqvae", help="stage 0: train a small multi-scale VQVAE tokenizer (tiny preset)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--config", help="YAML (e.g. configs/demo/vqvae.yaml)")
    s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. max_steps=200 lr=1e-3")
    s.set_defaults(func=_run_vqvae)
