"""Native checkpoints: ``model.safetensors`` (keys ``vqvae.<key>``, ``varsr.<key>``) + ``config.json``.

safetensors holds only tensors, so loading never unpickles anything. Loading is strict: every missing, unexpected
or mis-shaped key is named in one clear error.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from infra.core.errors import UserError

from .config import VARSRConfig

FORMAT, VERSION = "varsr-native", 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def key_report(expected: dict[str, tuple], got: dict[str, tuple]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mis-shaped 'key: got X, expected Y') between two {key: shape} maps."""
    missing = sorted(k for k in expected if k not in got)
    unexpected = sorted(k for k in got if k not in expected)
    bad = sorted(f"{k}: got {tuple(got[k])}, expected {tuple(expected[k])}"
                 for k in expected if k in got and tuple(got[k]) != tuple(expected[k]))
    return missing, unexpected, bad


def format_key_report(what: str, missing, unexpected, bad) -> str:
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if bad:
        parts.append(f"mis-shaped keys ({len(bad)}): {'; '.join(bad)}")
    return f"{what}: " + " | ".join(parts)


def strict_load(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict) after our own check, so the error names every bad key (UserError)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing, unexpected, bad = key_report(expected, {k: tuple(v.shape) for k, v in state.items()})
    if missing or unexpected or bad:
        raise UserError(format_key_report(what, missing, unexpected, bad))
    module.load_state_dict(state, strict=True)


def save_pretrained(directory, vqvae, varsr, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``directory`` (created); returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"vqvae.{k}": v.detach().to("cpu").contiguous() for k, v in vqvae.state_dict().items()}
    tensors.update({f"varsr.{k}": v.detach().to("cpu").contiguous() for k, v in varsr.state_dict().items()})
    meta = {"format": FORMAT, "version": VERSION, "config": varsr.cfg.to_dict(), **(extra or {})}
    tmp = d / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    tmp.replace(d / WEIGHTS)
    (d / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return d


def read_config(directory) -> tuple[VARSRConfig, dict]:
    """(config, the whole config.json) of a native checkpoint folder, with clear errors."""
    d = Path(directory)
    cj = d / CONFIG
    if not d.is_dir():
        raise UserError(f"checkpoint folder {d} does not exist")
    if not cj.is_file():
        raise UserError(f"{d} is not a native VARSR checkpoint: {CONFIG} is missing")
    try:
        meta = json.loads(cj.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cj} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{cj}: format is {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise UserError(f"{cj}: unsupported version {meta.get('version')!r} (this code reads version {VERSION})")
    try:
        cfg = VARSRConfig.from_dict(meta["config"])
    except Exception as e:  # noqa: BLE001 - config errors become one clear line
        raise UserError(f"{cj}: invalid model config: {e}") from None
    return cfg, meta


def from_pretrained(directory, device="cpu"):
    """(vqvae, varsr) from a native checkpoint folder; strict key/shape check against its config."""
    from .build import build

    cfg, _ = read_config(directory)
    wf = Path(directory) / WEIGHTS
    if not wf.is_file():
        raise UserError(f"{directory}: {WEIGHTS} is missing")
    try:
        tensors = load_file(str(wf))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{wf} is not a readable safetensors file ({e})") from None
    vq_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("vqvae.")}
    var_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("varsr.")}
    stray = sorted(k for k in tensors if not k.startswith(("vqvae.", "varsr.")))
    if stray:
        raise UserError(f"{wf}: unexpected keys outside vqvae./varsr.: {', '.join(stray)}")
    vqvae, varsr = build(cfg, device="cpu")
    hint = f" (is {wf} from another model config than '{cfg.name}' in its config.json?)"
    try:
        strict_load(vqvae, vq_sd, f"{wf} [vqvae] does not match its config{hint}")
        strict_load(varsr, var_sd, f"{wf} [varsr] does not match its config{hint}")
    except UserError:
        raise
    vqvae.freeze()
    varsr.to(device)
    return vqvae, varsr
