"""`varsr demo` subcommand (see infra/demo.py)."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the whole platform end to end on embedded defaults (tiny preset)",
                              description="Corpus -> Ray shards -> DeepSpeed stage 0/1/2 -> MLflow registry -> "
                                          "HTTP serving -> upscale, all under --workdir.")
    p.add_argument("step", nargs="?", default=None, choices=("corpus", "data", "vqvae", "stage1", "stage2", "serve", "upscale"),
                   help="run only this step (default: all, resuming finished ones)")
    p.add_argument("--workdir", default="varsr-demo", help="everything is written here (default ./varsr-demo)")
    p.add_argument("--fresh", action="store_true", default=None, help="delete the work folder first (no resume)")
    p.add_argument("--vqvae-steps", dest="vqvae_steps", type=int)
    p.add_argument("--stage1-steps", dest="stage1_steps", type=int)
    p.add_argument("--stage2-steps", dest="stage2_steps", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--port", type=int, help="serving port on 127.0.0.1 (default: a free one)")
    p.add_argument("--seed", type=int)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from infra.demo import Demo, config_from_args

    cfg = config_from_args(args)
    Demo(cfg).run(only=[args.step] if args.step else None)
    return 0
