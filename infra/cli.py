"""The ``varsr`` command: one entry point whose subcommands belong to the components.

Each component owns a ``cli.py`` with ``register(subparsers)``; this module only collects them, so a component
that fails to import (say, a missing optional dependency) breaks only its own subcommands, with the reason shown.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# (module, what it adds) — order is the order in `varsr --help`.
COMPONENTS = [
    ("infra.demo_cli", "demo"),
    ("data_pipeline.cli", "data"),
    ("training.cli", "train"),
    ("inference.cli", "upscale, register, serve, eval"),
    ("model.cli", "model, import-checkpoint"),
]

QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "HF_HUB_OFFLINE": "1",
}


def build_parser() -> tuple[argparse.ArgumentParser, list[str]]:
    parser = argparse.ArgumentParser(
        prog="varsr",
        description="VARSR platform: curate data (Ray), train (DeepSpeed), track and serve (MLflow).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    broken: list[str] = []
    for mod_name, what in COMPONENTS:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name and mod_name.startswith(e.name):
                continue  # component not built yet in this checkout
            broken.append(f"{mod_name} ({what}): {e}")
            continue
        except Exception as e:  # noqa: BLE001 - report, keep the other subcommands usable
            broken.append(f"{mod_name} ({what}): {type(e).__name__}: {e}")
            continue
        mod.register(sub)
    return parser, broken


def main(argv: list[str] | None = None) -> int:
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    parser, broken = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if broken:
        for b in broken:
            print(f"varsr: warning: subcommands unavailable: {b}", file=sys.stderr)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("varsr: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - user-facing errors are one clear line; -v shows the traceback
        from infra.core.errors import UserError

        if isinstance(e, UserError) and not args.verbose:
            print(f"varsr: error: {e}", file=sys.stderr)
            return 2
        raise
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
