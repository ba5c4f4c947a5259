"""`varsr data ...`: score, select, shard, build, tokenize, inspect, verify (registered into the `varsr` command by
infra/cli.py, which also hands ``tokenize`` the function that loads a frozen tokenizer from a model checkpoint: the
data pipeline does not import the model package)."""

from __future__ import annotations

import argparse
import json

from infra.core.config import add_config_args, to_dict
from infra.core.errors import UserError


def _common(p: argparse.ArgumentParser, ray: bool = True) -> None:
    add_config_args(p, "YAML file or preset name in configs/data (default: built-in defaults)")
    if ray:
        p.add_argument("--ray-address", default=None, help="Ray cluster address (default: local ray.init())")


def _cfg(args):
    from .config import load_build_config

    return load_build_config(args.config, args.overrides)


def cmd_score(args) -> dict:
    from .jobs import score

    return score(args.input, args.output, _cfg(args), args.ray_address)


def cmd_select(args) -> dict:
    from .jobs import select

    return select(args.scores, args.output, _cfg(args))


def cmd_shard(args) -> dict:
    from .jobs import shard

    r = shard(args.selection, args.output, _cfg(args), args.ray_address)
    r.pop("manifest")
    return r


def cmd_build(args) -> dict:
    from .jobs import build

    return build(args.input, args.output, _cfg(args), args.ray_address)


def cmd_tokenize(args) -> dict:
    from .token_cache import TokenizeOptions, tokenize

    if args.open_tokenizer is None:
        raise UserError("varsr data tokenize needs the model package to load the tokenizer: run it through `varsr`")
    opts = TokenizeOptions(batch_size=args.batch_size, device=args.device, threads=args.threads).validate()
    tokenizer = args.open_tokenizer(args.vqvae)
    return tokenize(args.shards, tokenizer, opts, args.ray_address)


def cmd_inspect(args) -> dict:
    from .shards import read_manifest

    m, sha = read_manifest(args.output)
    return {
        "counts": to_dict(m.counts),
        "shards": len(m.shards),
        "samples": m.num_samples,
        "hr_size": m.hr_size,
        "lr_size": m.lr_size,
        "config_hash": m.config_hash,
        "manifest_sha256": sha,
        "token_cache": None
        if m.tokens is None
        else {
            "tokenizer_sha256": m.tokens.tokenizer_sha256,
            "patch_nums": m.tokens.patch_nums,
            "shards": len(m.tokens.shards),
            "device": m.tokens.device,
        },
    }


def cmd_verify(args) -> dict:
    """Check every shard listed in the manifest exists with the recorded size and sha256."""
    from infra.core import storage

    from .shards import read_manifest

    m, _ = read_manifest(args.output)
    bad = []
    for sh in m.shards + (m.tokens.shards if m.tokens is not None else []):
        url = storage.join(args.output, sh.name)
        if not storage.exists(url):
            bad.append({"shard": sh.name, "problem": "missing"})
        elif storage.size(url) != sh.bytes:
            bad.append({"shard": sh.name, "problem": f"size {storage.size(url)} != {sh.bytes}"})
        elif storage.sha256(url) != sh.sha256:
            bad.append({"shard": sh.name, "problem": "sha256 mismatch"})
    return {
        "shards": len(m.shards),
        "token_shards": len(m.tokens.shards) if m.tokens is not None else 0,
        "ok": not bad,
        "problems": bad,
    }


def register(subparsers, open_tokenizer=None) -> argparse.ArgumentParser:
    """Add the `data` command with its subcommands to an argparse subparsers object. ``open_tokenizer(checkpoint)``
    returns the frozen tokenizer ``tokenize`` runs (see ``data_pipeline/token_cache.py`` for what it must offer)."""
    data = subparsers.add_parser("data", help="curate an image corpus into WebDataset shards (Ray)")
    sub = data.add_subparsers(dest="data_cmd", required=True)
    p = sub.add_parser("score", help="decode + score every input into scores.parquet")
    p.add_argument("--input", "-i", required=True, nargs="+", help="folder, glob, fsspec URL or manifest")
    p.add_argument("--output", "-o", required=True)
    _common(p)
    p.set_defaults(data_func=cmd_score)
    p = sub.add_parser("select", help="thresholds, dedup, clusters, negatives -> selection.parquet")
    p.add_argument("--scores", required=True)
    p.add_argument("--output", "-o", required=True)
    _common(p, ray=False)
    p.set_defaults(data_func=cmd_select)
    p = sub.add_parser("shard", help="crop + degrade the selection into WebDataset shards (resumable)")
    p.add_argument("--selection", required=True)
    p.add_argument("--output", "-o", required=True)
    _common(p)
    p.set_defaults(data_func=cmd_shard)
    p = sub.add_parser("build", help="score -> select -> shard in one go (resumable)")
    p.add_argument("--input", "-i", required=True, nargs="+")
    p.add_argument("--output", "-o", required=True)
    _common(p)
    p.set_defaults(data_func=cmd_build)
    p = sub.add_parser(
        "tokenize",
        help="add the token cache to built shards: tokens + refiner residual per sample, "
        "as new shard versions (Ray; GPUs when the cluster has them; resumable)",
    )
    p.add_argument("--shards", required=True, help="built dataset folder or URL prefix (with manifest.json)")
    p.add_argument(
        "--vqvae",
        required=True,
        metavar="CKPT",
        help="native checkpoint folder (full or tokenizer-only; local or URL) holding the frozen tokenizer",
    )
    p.add_argument("--batch-size", type=int, default=8, help="HR crops per tokenizer call (default 8)")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: one GPU per task when the Ray cluster has GPUs, else CPUs",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (Ray CPUs) per CPU task (default 1)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: local ray.init())")
    p.set_defaults(data_func=cmd_tokenize, open_tokenizer=open_tokenizer)
    p = sub.add_parser("inspect", help="print a built folder's manifest counts")
    p.add_argument("output")
    p.set_defaults(data_func=cmd_inspect)
    p = sub.add_parser("verify", help="check shards against manifest sha256")
    p.add_argument("output")
    p.set_defaults(data_func=cmd_verify)
    data.set_defaults(func=run)
    return data


def run(args) -> int:
    if getattr(args, "input", None) and isinstance(args.input, list) and len(args.input) == 1:
        args.input = args.input[0]
    try:
        result = args.data_func(args)
    except UserError:
        raise
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # bad input or config: one line, no traceback
        raise UserError(str(e)) from e
    if args.data_cmd != "build":
        print(json.dumps(result, indent=1, default=str))
    if args.data_cmd == "verify" and not result["ok"]:
        return 1
    return 0
