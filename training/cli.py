"""``varsr train vqvae|c2i|isr --config YAML [--set key=value ...] [--resume auto] [--nproc N] [--ray-address A]``.

Registered into the ``varsr`` command by infra/cli.py, which may pass ``on_trained``: a callback run once a stage-1/2
training has finished (the CLI uses it to log and register the model from the training run; training itself never
imports the serving code).
"""

from __future__ import annotations

import argparse
from typing import Callable

from infra.core.config import add_config_args

OnTrained = Callable[["object"], None]  # receives the resolved TrainConfig


def _run_stage(args) -> int:
    from training import launch
    from training.config import load_train_config

    cfg = load_train_config(args.config, [*args.overrides, f"stage={args.stage}"])
    if args.ray_address:
        launch.run_ray(cfg, args.ray_address, args.resume)
        rc = 0
    elif args.nproc and args.nproc > 1:
        rc = launch.run_torchrun(cfg, args.nproc, args.resume)
    else:
        launch.run_local(cfg, args.resume)
        rc = 0
    if rc == 0 and args.on_trained is not None:
        args.on_trained(cfg)
    return rc


def _run_vqvae(args) -> int:
    from training.config import load_vqvae_config
    from training.stage0_vqvae import train_vqvae

    train_vqvae(load_vqvae_config(args.config, args.overrides), resume=args.resume)
    return 0


def register(subparsers, on_trained: OnTrained | None = None) -> None:
    p = subparsers.add_parser("train", help="train VARSR (stage 0 vqvae, stage 1 c2i, stage 2 isr)")
    sub = p.add_subparsers(dest="train_stage", metavar="STAGE", required=True)
    for stage, help_ in (("c2i", "stage 1: class-to-image pretraining"), ("isr", "stage 2: ISR finetuning")):
        s = sub.add_parser(stage, help=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_config_args(s, "training YAML (e.g. configs/train/stage2_isr_tiny.yaml)")
        s.add_argument("--resume", default=None, help="'auto' = latest complete checkpoint in output_dir, or a path")
        s.add_argument("--nproc", type=int, default=1, help="local processes (re-execs via torchrun)")
        s.add_argument("--ray-address", default=None, help="Ray cluster address ('local' = start one here)")
        s.set_defaults(func=_run_stage, stage=stage, on_trained=on_trained)
    s = sub.add_parser(
        "vqvae",
        help="stage 0: train a small multi-scale VQVAE tokenizer",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_args(s, "tokenizer YAML (e.g. configs/demo/vqvae.yaml)")
    s.add_argument("--resume", default=None, help="'auto' = latest complete checkpoint in output_dir, or a path")
    s.set_defaults(func=_run_vqvae)
