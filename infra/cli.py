"""The ``varsr`` command: the one place (with the demo) that composes the components.

Each component's ``cli.py`` registers the subcommands that only need that component (``varsr data``, ``varsr train``,
``varsr upscale|register|serve|eval``, ``varsr model|import-checkpoint``). What crosses components is wired here:
after ``varsr train c2i|isr`` with ``register.name`` set, the model is logged into the training run itself and
registered from there (inference's registry); ``varsr eval --shards`` reads pairs through the data pipeline's shard
reader; ``varsr data tokenize`` runs the model package's frozen tokenizer in the data pipeline's job. Nothing imports
this module; ``pyproject.toml`` points the ``varsr`` script at :func:`main`.
"""

from __future__ import annotations

import argparse
import os
import sys

import data_pipeline.cli as data_cli
import inference.cli as inference_cli
import model.cli as model_cli
import training.cli as training_cli
from data_pipeline.shards import manifest_ref
from infra.core import redact
from infra.core.errors import UserError
from infra.core.log import say, setup_logging
from infra.demo.cli import register_cli as register_demo_cli

QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "HF_HUB_OFFLINE": "1",
}


def register_trained_model(cfg) -> None:
    """After a finished stage-1/2 run: log the pyfunc model into that training run and register it (when the
    config's ``register.name`` is set), so the registered version's source run is the run that trained it."""
    if not cfg.register.name:
        return
    from inference.registry import register_training_run

    mv = register_training_run(
        cfg.output_dir,
        cfg.register.name,
        cfg.register.alias,
        tracking_uri=cfg.tracking.tracking_uri,
        sampling=cfg.register.sampling.values(),
    )
    say(f"[train] registered {cfg.register.name}@{cfg.register.alias} version {mv.version} from run {mv.run_id}")


def shard_pairs(shards: str):
    """``varsr eval --shards``: (key, load -> (hr, lr)) pairs read through the data pipeline's shard reader and
    decoded by inference's safe image decoder."""
    from data_pipeline.shards import eval_pairs
    from inference.images import open_image_bytes

    return [
        (key, lambda h=hr, lo=lr: (open_image_bytes(h), open_image_bytes(lo))) for key, hr, lr in eval_pairs(shards)
    ]


def degrade_preset(hr, preset: str, seed: int):
    """``varsr eval-prepare synthetic``: one LR from the data pipeline's degradation preset (configs/data/<preset>),
    with the parameters that replay it."""
    from data_pipeline.config import load_build_config
    from data_pipeline.degrade import degrade

    return degrade(hr, load_build_config(preset).degradation, seed)


def replay_degradation(hr, params: dict):
    """``varsr eval-prepare verify``: the LR that recorded degradation parameters make from an HR."""
    from data_pipeline.degrade import apply_degradation

    return apply_degradation(hr, params)


def open_tokenizer(checkpoint: str):
    """``varsr data tokenize``: the frozen tokenizer of a native model checkpoint, loaded by the model package."""
    from model.checkpoint import open_tokenizer as load

    return load(checkpoint)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="varsr",
        description="VARSR platform: curate data (Ray), train (DeepSpeed), track and serve (MLflow).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    register_demo_cli(sub)
    data_cli.register(sub, open_tokenizer=open_tokenizer)
    training_cli.register(sub, on_trained=register_trained_model)
    inference_cli.register(
        sub, shard_pairs=shard_pairs, degrader=degrade_preset, replayer=replay_degradation, shard_manifest=manifest_ref
    )
    model_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    redact.install()  # no credential of a URI in what this process logs, warns or prints as a traceback
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        say("varsr: interrupted")
        return 130
    except UserError as e:  # bad input or config: one clear line, no traceback (-v shows it)
        if args.verbose:
            raise
        say(f"varsr: error: {redact.redact(str(e))}")
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
