"""`varsr demo` and `varsr demo pretrain` subcommands (the demo: ``demo.py``; the base-model recipe:
``pretrain.py``)."""

from __future__ import annotations

import argparse

from inference.config import COLOR_FIXES

DEMO_STEPS = ("corpus", "data", "vqvae", "stage1", "stage2", "serve", "upscale")
PRETRAIN_STEPS = ("corpus", "data", "vqvae", "tokens", "stage1", "stage2", "decoder", "export")


def register_cli(subparsers) -> None:
    """Add ``varsr demo`` (and ``varsr demo pretrain``) to the ``varsr`` command (infra/cli.py)."""
    p = subparsers.add_parser(
        "demo",
        help="run the whole platform end to end on embedded defaults (small preset)",
        description="Corpus -> Ray shards -> DeepSpeed stage 2 finetuning of the shipped base "
        "model (or stages 0/1/2 from scratch) -> MLflow registry -> HTTP serving -> "
        "upscale of a held-out photo beside bicubic, all under --workdir. "
        "`varsr demo pretrain` re-makes the shipped base model.",
    )
    p.add_argument(
        "step",
        nargs="?",
        default=None,
        choices=(*DEMO_STEPS, "pretrain"),
        help="run only this step (default: all, resuming finished ones); 'pretrain' runs the base-model "
        "recipe (see `varsr demo pretrain --help`)",
    )
    p.add_argument(
        "--workdir",
        default=None,
        help="everything is written here (default ./varsr-demo, ./varsr-pretrain for pretrain)",
    )
    p.add_argument("--fresh", action="store_true", default=None, help="delete the work folder first (no resume)")
    p.add_argument(
        "--from-scratch",
        dest="from_scratch",
        action="store_true",
        default=None,
        help="train tokenizer, stage 1 and stage 2 from nothing instead of finetuning the shipped base",
    )
    p.add_argument("--base", help="base model folder to finetune (default model/pretrained/small4-base)")
    p.add_argument("--vqvae-steps", dest="vqvae_steps", type=int, help="stage 0 steps (--from-scratch)")
    p.add_argument("--stage1-steps", dest="stage1_steps", type=int, help="stage 1 steps (--from-scratch)")
    p.add_argument("--stage2-steps", dest="stage2_steps", type=int, help="stage 2 (finetuning) steps")
    p.add_argument("--stage2-lr", dest="stage2_lr", type=float)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--cfg", type=float, help="guidance of the served / upscaled result")
    p.add_argument(
        "--color-fix",
        dest="color_fix",
        choices=COLOR_FIXES,
        help="colour fix of the served / upscaled result against the bicubic LR (default wavelet)",
    )
    p.add_argument(
        "--photo-short-side",
        dest="photo_short_side",
        type=int,
        help="short side of the demo photos before cropping (default: the base corpus's smallest, 256; "
        "160 --from-scratch)",
    )
    p.add_argument("--port", type=int, help="serving port on 127.0.0.1 (default: a free one)")
    p.add_argument("--seed", type=int)
    # pretrain only
    p.add_argument("--config", help="pretrain: recipe YAML (default configs/demo/pretrain.yaml)")
    p.add_argument("--ship", help="pretrain: copy the exported base here (e.g. model/pretrained/small4-base)")
    p.add_argument("--only", choices=PRETRAIN_STEPS, help="pretrain: run only this step")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pretrain: override a recipe key, e.g. stage2.steps=200 (repeatable)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.step == "pretrain":
        from infra.demo.pretrain import Pretrain, load_pretrain_config

        pcfg = load_pretrain_config(args.config, args.overrides)
        Pretrain(
            pcfg,
            args.workdir or "varsr-pretrain",
            ship=args.ship,
            fresh=bool(args.fresh),
            config_path=args.config,
            overrides=args.overrides,
        ).run(only=[args.only] if args.only else None)
        return 0
    from infra.demo.demo import Demo, config_from_args

    if args.workdir is None:
        args.workdir = "varsr-demo"
    cfg = config_from_args(args)
    Demo(cfg).run(only=[args.step] if args.step else None)
    return 0
