"""``varsr model info`` (config, geometry, parameter counts per module) and ``varsr import-checkpoint``."""

from __future__ import annotations

import json
from collections import OrderedDict

from infra.core.errors import UserError
from infra.core.log import summary


def param_counts(vqvae, varsr) -> "OrderedDict[str, int]":
    """Parameters per top-level transformer module (spec Appendix B), plus totals and the VQVAE."""
    counts: OrderedDict[str, int] = OrderedDict()
    for name, p in varsr.named_parameters():
        top = name.split(".")[0]
        counts[top] = counts.get(top, 0) + p.numel()
    counts = OrderedDict(sorted(counts.items(), key=lambda kv: -kv[1]))
    counts["per_block"] = sum(p.numel() for p in varsr.blocks[0].parameters()) if len(varsr.blocks) else 0
    counts["varsr_total"] = sum(p.numel() for p in varsr.parameters())
    counts["vqvae_total"] = sum(p.numel() for p in vqvae.parameters())
    return counts


def geometry(cfg) -> dict:
    return dict(
        variant=cfg.variant,
        image_size=cfg.image_size,
        patch_nums=list(cfg.patch_nums),
        K=cfg.num_scales,
        L=cfg.L,
        prefix_len=cfg.prefix_len,
        first_l=cfg.first_l,
        seq_len=cfg.seq_len,
        C=cfg.C,
        heads=cfg.heads,
        head_dim=cfg.head_dim,
        depth=cfg.depth,
        vocab=cfg.vqvae.vocab_size,
        Cvae=cfg.vqvae.z_channels,
        rope_grid=cfg.rope_grid_side,
        class_rows=cfg.class_rows,
        drop_path_max=cfg.dpr,
    )


def _info(args) -> int:
    from .build import build
    from .checkpoint import read_config
    from .config import VARSRConfig

    if args.checkpoint:
        cfg, _ = read_config(args.checkpoint)
    else:
        try:
            cfg = VARSRConfig.preset(args.preset)
        except KeyError as e:
            raise UserError(str(e.args[0])) from None
    vqvae, varsr = build(cfg, device="meta")  # shapes only: instant even for d30
    counts = param_counts(vqvae, varsr)
    out = dict(
        config=cfg.to_dict(),
        geometry=geometry(cfg),
        parameters={k: v for k, v in counts.items()},
        parameters_M={k: round(v / 1e6, 3) for k, v in counts.items()},
    )
    print(json.dumps(out, indent=2))
    return 0


def _import(args) -> int:
    from .config import VARSRConfig
    from .official import import_official

    cfg = None
    if args.preset:
        try:
            cfg = VARSRConfig.preset(args.preset)
        except KeyError as e:
            raise UserError(str(e.args[0])) from None
    vqvae, varsr = import_official(args.var, args.vae, config=cfg, out_dir=args.output)
    d = args.output
    n = sum(p.numel() for p in varsr.parameters())
    summary(f"imported {args.var} + {args.vae} -> {d} (config '{varsr.cfg.name}', {n / 1e6:.1f} M transformer params)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("model", help="model utilities (info)")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION")
    info = msub.add_parser("info", help="config, geometry and parameter counts per module")
    g = info.add_mutually_exclusive_group()
    g.add_argument("--preset", default="d24", help="preset name (default d24, the released VARSR)")
    g.add_argument("--checkpoint", help="native checkpoint folder (see model/checkpoint.py)")
    info.set_defaults(func=_info)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    imp = subparsers.add_parser(
        "import-checkpoint", help="convert official VARSR/VAR .pth files to a native checkpoint"
    )
    imp.add_argument("--var", required=True, help="VARSR.pth / VARSR_C2I.pth / var_d*.pth")
    imp.add_argument("--vae", required=True, help="VQVAE.pth / vae_ch160v4096z32.pth")
    imp.add_argument("-o", "--output", required=True, help="output folder")
    imp.add_argument("--preset", help="model preset (default: inferred from tensor shapes)")
    imp.set_defaults(func=_import)
