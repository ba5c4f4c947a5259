"""Importer for the official VARSR / VAR checkpoint files (docs/MODEL.md §6) and the stage-2 weight loader
(docs/MODEL.md §5.2).

Files: ``VARSR.pth`` / ``VARSR_C2I.pth`` / ``VARSR_base.pth`` (transformer at ``['trainer']['var_wo_ddp']``),
``VQVAE.pth`` (``['trainer']['vae_local']``), and the plain state dicts ``var_d*.pth`` / ``vae_ch160v4096z32.pth``.
They are read with ``torch.load(weights_only=True)``: only tensors and plain containers are unpickled, so a file that
tries to run code is refused; a file that is no checkpoint at all, or a corrupt one, is named as such
(``safe_torch_load``), and NaN / non-floating weights are refused by name (``model.checkpoint.check_tensors``). Our
parameter names equal the official keys; the regenerable buffers (``lvl_1L``,
``attn_bias_for_masking``, ``zero_k_bias``) are checked against the config and dropped.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
from pathlib import Path

import torch

from infra.core.errors import UserError

from .checkpoint import check_tensors, format_key_report, key_report, save_pretrained
from .config import C2I_12_SCALE_PATCH_NUMS, RELEASED_PATCH_NUMS, VARSRConfig

log = logging.getLogger(__name__)
BUFFER_KEYS = ("lvl_1L", "attn_bias_for_masking")
EMA_KEY = "quantize.ema_vocab_hit_SV"
# benign non-tensor types that trainer-format files may hold in ``args`` (explicit allow-list; nothing that runs code)
SAFE_GLOBALS = [argparse.Namespace]


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
PICKLE_PROTOCOLS = range(2, 6)  # the legacy format: a bare pickle, b"\x80" + protocol


def safe_torch_load(path) -> object:
    """torch.load with weights_only=True (+ a small allow-list), with one accurate line for each way a file can fail:
    empty; not a PyTorch checkpoint at all (neither torch.save's zip archive nor a pickle, e.g. a text file);
    corrupt (truncated zip, a pickle the safe loader cannot parse); or a pickle that names a Python callable other
    than tensors and plain containers, which is refused because loading it could run code."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint file {p} does not exist")
    with p.open("rb") as f:
        head = f.read(4)
    if not head:
        raise UserError(f"{p} is empty: not a PyTorch checkpoint")
    if head != ZIP_MAGIC and not (head[0] == 0x80 and len(head) > 1 and head[1] in PICKLE_PROTOCOLS):
        raise UserError(
            f"{p} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle; it starts with {head!r})"
        )
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            raise UserError(
                f"refusing to load {p}: it pickles {found.group(1)}, a Python object other than tensors "
                f"and plain containers (loading it could run arbitrary code)"
            ) from None
        why = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        raise UserError(
            f"{p} is corrupt or not written by torch.save: the safe loader cannot parse it "
            f"({(why.group(1) if why else text).strip().splitlines()[0][:200]})"
        ) from None
    except Exception as e:  # noqa: BLE001 - a truncated zip, a broken pickle memo (KeyError), EOF ...: one line
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:200]  # torch's first sentence says it
        raise UserError(
            f"{p} is corrupt: not a readable PyTorch checkpoint ({type(e).__name__}{': ' + first if first else ''})"
        ) from None


def extract_state_dict(obj, path, inner: str) -> dict[str, torch.Tensor]:
    """The state dict of a trainer-nested file (``obj['trainer'][inner]``) or of a plain state-dict file."""
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a dict (state dict or trainer checkpoint), got {type(obj).__name__}")
    if "trainer" in obj:
        tr = obj["trainer"]
        if not isinstance(tr, dict) or inner not in tr:
            keys = sorted(tr) if isinstance(tr, dict) else type(tr).__name__
            raise UserError(f"{path}: trainer checkpoint has no ['trainer']['{inner}'] (found {keys})")
        obj = tr[inner]
    sd = {k: v for k, v in obj.items()}
    not_tensors = sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor))
    if not_tensors or not sd:
        raise UserError(
            f"{path}: not a state dict (entries that are not tensors: {not_tensors[:5] or 'file is empty'})"
        )
    return sd


def _is_buffer(key: str) -> bool:
    return key in BUFFER_KEYS or key.endswith(".attn.zero_k_bias")


def _indices(sd, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


def infer_config(var_sd: dict, vae_sd: dict, name: str = "imported") -> VARSRConfig:
    """Architecture from tensor shapes: depth, width, heads, vocab, Cvae, scales (10 or 12 released), classes,
    variant."""
    try:
        emb = vae_sd["quantize.embedding.weight"]
        ch = vae_sd["encoder.conv_in.weight"].shape[0]
        levels = _indices(vae_sd, r"encoder\.down\.(\d+)\.")
        nrb = len(_indices(vae_sd, r"encoder\.down\.0\.block\.(\d+)\."))
        mult = [vae_sd[f"encoder.down.{i}.block.{nrb - 1}.conv2.weight"].shape[0] // ch for i in levels]
        vq = dict(
            vocab_size=emb.shape[0],
            z_channels=emb.shape[1],
            ch=ch,
            ch_mult=mult,
            num_res_blocks=nrb,
            share_quant_resi=len(_indices(vae_sd, r"quantize\.quant_resi\.qresi_ls\.(\d+)\.")),
            quant_conv_ks=vae_sd["quant_conv.weight"].shape[-1],
        )
        C, Cvae = var_sd["word_embed.weight"].shape
        depth = len(_indices(var_sd, r"blocks\.(\d+)\."))
        heads = var_sd["blocks.0.attn.scale_mul_1H11"].shape[1]
        mlp_ratio = var_sd["blocks.0.ffn.fc1.weight"].shape[0] / C
        K = var_sd["lvl_embed.weight"].shape[0]
        rows = var_sd["class_emb.weight"].shape[0]
        isr = any(k.startswith("con_embedding.") for k in var_sd)
        d = dict(
            name=name,
            variant="isr" if isr else "c2i",
            vqvae=vq,
            depth=depth,
            embed_dim=C,
            num_heads=heads,
            mlp_ratio=mlp_ratio,
            num_classes=rows if isr else rows - 1,
        )
        if "diffloss.net.input_proj.weight" in var_sd:
            d["refiner_width"] = var_sd["diffloss.net.input_proj.weight"].shape[0]
            d["refiner_depth"] = len(_indices(var_sd, r"diffloss\.net\.res_blocks\.(\d+)\."))
        if isr:
            n_blocks = len(_indices(var_sd, r"con_embedding\.blocks\.(\d+)\."))
            d["lr_encoder_channels"] = [var_sd["con_embedding.conv_in.weight"].shape[0]] + [
                var_sd[f"con_embedding.blocks.{2 * i + 1}.weight"].shape[0] for i in range(n_blocks // 2 - 1)
            ]
            d["lr_encoder_hidden"] = var_sd["con_embedding.conv_out.weight"].shape[1]  # 1536 in research files
        else:
            d.update(cfg=4.0, top_k=20)
    except KeyError as e:
        raise UserError(
            f"cannot infer the model config from the checkpoint: key {e} is missing (pass a config/--preset explicitly)"
        ) from None
    if Cvae != vq["z_channels"]:
        raise UserError(f"transformer expects Cvae={Cvae} but the VQVAE has z_channels={vq['z_channels']}")
    d["patch_nums"] = _patch_nums(var_sd, K, isr)
    return _known_preset(d) or VARSRConfig.from_dict(d)


def _patch_nums(var_sd: dict, K: int, isr: bool) -> list[int]:
    """The scale schedule: read exactly from the ``lvl_1L`` buffer when the file has it (docs/MODEL.md §2.3: level
    k >= 1 fills pn_k² positions; level 0 fills pn_0², plus the LR prefix of pn_last² positions in the ISR variant),
    else the released schedule with ``K`` scales (10 for VARSR, 12 for VAR's c2i)."""
    lvl = var_sd.get("lvl_1L")
    if lvl is not None and lvl.numel():
        counts = torch.bincount(lvl.reshape(-1).long()).tolist()
        if len(counts) == K:
            pns = [round(c**0.5) for c in counts]
            if isr:
                counts[0] -= pns[-1] ** 2
                pns[0] = round(max(counts[0], 0) ** 0.5)
            if all(p > 0 and p * p == c for p, c in zip(pns, counts)):
                return pns
    by_k = {len(RELEASED_PATCH_NUMS): RELEASED_PATCH_NUMS, len(C2I_12_SCALE_PATCH_NUMS): C2I_12_SCALE_PATCH_NUMS}
    if K not in by_k:
        raise UserError(
            f"lvl_embed has {K} rows: not one of the released scale schedules (10 or 12 scales) and the "
            f"file has no lvl_1L buffer to read the schedule from; pass a config/--preset with the right "
            f"patch_nums"
        )
    return list(by_k[K])


# what the tensor shapes fix: a preset that agrees on all of them is the file's preset (its other settings, such as
# the VQVAE's GroupNorm groups, cannot be read from shapes and come from the preset)
_SHAPE_FIELDS = (
    "variant",
    "patch_nums",
    "depth",
    "embed_dim",
    "num_heads",
    "mlp_ratio",
    "num_classes",
    "refiner_width",
    "refiner_depth",
    "lr_encoder_channels",
    "lr_encoder_hidden",
)
_VQ_SHAPE_FIELDS = ("vocab_size", "z_channels", "ch", "ch_mult", "num_res_blocks", "share_quant_resi", "quant_conv_ks")


def _known_preset(inferred: dict) -> VARSRConfig | None:
    """The preset of ``model/config.py`` whose every shape-fixed setting equals the inferred one, named as the preset;
    None when no preset (or more than one) agrees."""
    from .config import PRESETS

    def same(a, b) -> bool:
        return list(a) == list(b) if isinstance(a, (list, tuple)) else a == b

    hits = []
    for name in PRESETS:
        cfg = VARSRConfig.preset(name)
        full = cfg.to_dict()
        if all(same(full.get(k), inferred[k]) for k in _SHAPE_FIELDS if k in inferred) and all(
            same(full["vqvae"].get(k), inferred["vqvae"][k]) for k in _VQ_SHAPE_FIELDS
        ):
            hits.append(cfg)
    return hits[0] if len(hits) == 1 else None


def _check_buffers(varsr, var_sd: dict, path) -> list[str]:
    """Compare the official buffers with the regenerated level ids / mask; returns mis-shape messages."""
    bad = []
    lvl = varsr.level_ids("cpu")
    if "lvl_1L" in var_sd:
        got = var_sd["lvl_1L"].reshape(-1)
        if got.shape != lvl.shape:
            bad.append(f"lvl_1L: got {tuple(var_sd['lvl_1L'].shape)}, expected {(1, lvl.numel())}")
        elif not torch.equal(got.long(), lvl):
            raise UserError(f"{path}: lvl_1L does not match the level layout of this config (wrong patch_nums?)")
    if "attn_bias_for_masking" in var_sd:
        ab = var_sd["attn_bias_for_masking"]
        S = lvl.numel()
        if tuple(ab.shape[-2:]) != (S, S):
            bad.append(f"attn_bias_for_masking: got {tuple(ab.shape)}, expected {(1, 1, S, S)}")
        elif not torch.equal(ab.reshape(S, S) == 0, varsr.attn_mask("cpu")):
            raise UserError(f"{path}: attn_bias_for_masking is not this config's block-causal level mask")
    return bad


def import_official(var_path, vae_path, config: VARSRConfig | None = None, out_dir=None):
    """Official files → (vqvae, varsr), strict key/shape check; also writes a native checkpoint when ``out_dir``.

    A VAR transformer file (``var_d*.pth``: absolute ``pos_1LC``, no refiner) is a different architecture: it is
    loaded as a stage-2 initialisation (``load_stage_weights``, docs/MODEL.md §5.2) and the report goes to config.json.
    """
    from .build import build

    var_obj, vae_obj = safe_torch_load(var_path), safe_torch_load(vae_path)
    var_sd = extract_state_dict(var_obj, var_path, "var_wo_ddp")
    vae_sd = extract_state_dict(vae_obj, vae_path, "vae_local")
    is_var = "pos_1LC" in var_sd
    if config is None:
        if is_var:
            raise UserError(
                f"{var_path} is a VAR (not VARSR) transformer: pass a config/--preset for the VARSR model "
                f"it should initialise"
            )
        config = infer_config(var_sd, vae_sd, name=f"imported-{Path(var_path).stem}")
    vqvae, varsr = build(config)
    check_tensors(vae_sd, vae_path)  # NaN / integer weights: refused before anything is written
    check_tensors({k: v for k, v in var_sd.items() if not _is_buffer(k)}, var_path)

    # VQVAE: strict, except a usage-statistics buffer for another number of scales keeps ours (docs/MODEL.md §1.3)
    own = vqvae.state_dict()
    if EMA_KEY in vae_sd and EMA_KEY in own and vae_sd[EMA_KEY].shape != own[EMA_KEY].shape:
        vae_sd = {**vae_sd, EMA_KEY: own[EMA_KEY]}
    m, u, b = key_report({k: tuple(v.shape) for k, v in own.items()}, {k: tuple(v.shape) for k, v in vae_sd.items()})
    if m or u or b:
        raise UserError(format_key_report(f"{vae_path} does not fit the VQVAE of config '{config.name}'", m, u, b))
    vqvae.load_state_dict(vae_sd, strict=True)

    extra = {"imported_from": {"var": str(var_path), "vae": str(vae_path)}}
    if is_var:
        report = load_stage_weights(varsr, var_sd)
        extra["stage_init_report"] = report
        log.info(
            "VAR file loaded as stage-2 init: %d loaded, %d dropped, %d new",
            len(report["loaded"]),
            len(report["dropped"]),
            len(report["new"]),
        )
    else:
        bad_buf = _check_buffers(varsr, var_sd, var_path)
        weights = {k: v for k, v in var_sd.items() if not _is_buffer(k)}
        m, u, b = key_report(
            {k: tuple(v.shape) for k, v in varsr.state_dict().items()}, {k: tuple(v.shape) for k, v in weights.items()}
        )
        if m or u or b or bad_buf:
            raise UserError(
                format_key_report(
                    f"{var_path} does not fit the VARSR model of config '{config.name}'", m, u, b + bad_buf
                )
            )
        varsr.load_state_dict(weights, strict=True)
    vqvae.freeze()
    if out_dir is not None:
        save_pretrained(out_dir, vqvae, varsr, extra=extra)
    return vqvae, varsr


@torch.no_grad()
def load_stage_weights(varsr, source_state_dict: dict) -> dict[str, list[str]]:
    """Stage-2 init from a stage-1 / VAR state dict (docs/MODEL.md §5.2), non-strict.

    (a) ``class_emb.weight`` with more rows than needed is truncated to the first rows; (b) every key missing from
    the model or of another shape is dropped (also the regenerable buffers); (c) the rest is copied. Returns the
    lists loaded / resized / dropped / new (model keys left at their init).
    """
    target = varsr.state_dict()
    loaded, resized, dropped, keep = [], [], [], {}
    for k, v in source_state_dict.items():
        if not isinstance(v, torch.Tensor) or _is_buffer(k) or k not in target:
            dropped.append(k)
            continue
        t = target[k]
        if k == "class_emb.weight" and v.ndim == 2 and v.shape[0] > t.shape[0] and v.shape[1:] == t.shape[1:]:
            v = v[: t.shape[0]]
            resized.append(k)
        if tuple(v.shape) != tuple(t.shape):
            dropped.append(k)
            continue
        keep[k] = v
        loaded.append(k)
    varsr.load_state_dict(keep, strict=False)
    new = [k for k in target if k not in keep]
    return dict(loaded=loaded, resized=resized, dropped=dropped, new=new)
