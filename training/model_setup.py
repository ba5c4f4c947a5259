"""Build the models a run trains: VARSRConfig from the TrainConfig, tokenizer weights, stage-1 -> stage-2 init.

``init_from`` may be a native checkpoint dir (e.g. the stage-1 export) or an official VAR/VARSR ``.pth`` (with
``official_vae``); the transformer is initialised with the shape-filtered rule of docs/MODEL.md §5.2
(``load_stage_weights``)
and the report (loaded / resized / dropped / new tensors) is returned for logging. The tokenizer comes from
``vqvae_checkpoint`` if given, else from the init checkpoint; it must be the one the parent was trained with.
"""

from __future__ import annotations

import logging
from pathlib import Path

from infra.core.errors import UserError
from training.config import TrainConfig

log = logging.getLogger(__name__)


def model_config(cfg: TrainConfig):
    from model import VARSRConfig

    overrides = dict(cfg.model.overrides)
    overrides.setdefault("grad_checkpointing", cfg.activation_checkpointing)
    try:
        return VARSRConfig.preset(cfg.model_preset, **overrides)
    except KeyError as e:
        raise UserError(str(e).strip("'\"")) from None
    except Exception as e:  # noqa: BLE001 - invalid overrides -> one clear line
        raise UserError(f"model preset {cfg.model_preset!r} with overrides {overrides}: {e}") from None


def local_checkpoint(ref: str) -> str:
    """A checkpoint given as a URL (a native folder such as the stage-1 export at s3://.../final, or an official
    ``.pth`` file) is brought into a local cache once (keyed by the URL); local paths are returned unchanged."""
    import hashlib
    import os
    import tempfile

    from infra.core import storage

    if storage.is_local(ref):
        return storage.local_path(ref)
    root = os.environ.get("VARSR_SCRATCH") or tempfile.gettempdir()
    dest = Path(root) / f"varsr-ckpt-{hashlib.sha256(ref.encode()).hexdigest()[:12]}"
    if ref.endswith(".pth"):
        dest = dest.with_suffix(".pth")
        if not dest.is_file():
            storage.get_file(ref, dest)
    elif not dest.is_dir():
        if not storage.exists(storage.join(ref, "config.json")):
            raise UserError(f"{ref} is not a native checkpoint (no config.json there)")
        storage.get_tree(ref, dest.with_suffix(".part"))
        dest.with_suffix(".part").rename(dest)
    return str(dest)


def build_models(cfg: TrainConfig):
    """(vqvae, varsr, init_report or None, parent lineage dict)."""
    from model import build, import_official, load_stage_weights
    from model.checkpoint import load_tokenizer, read_parts

    mcfg = model_config(cfg)
    vqvae, varsr = build(mcfg)
    report, parent = None, {}
    src = cfg.model.init_from
    if src:
        origin, src = src, local_checkpoint(src)
        if Path(src).is_dir():
            vq_sd, var_sd, meta = read_parts(src)
            if not cfg.model.vqvae_checkpoint:
                load_tokenizer(vqvae, src, vq_sd)
            lineage = meta.get("lineage", {}) if isinstance(meta.get("lineage"), dict) else {}
            parent = {
                "checkpoint": origin if "://" in origin else str(Path(src).resolve()),
                "run_id": lineage.get("mlflow_run_id"),
            }
        elif Path(src).is_file():
            if not cfg.model.official_vae:
                raise UserError(f"init_from {src} is an official file: also set model.official_vae to its VQVAE .pth")
            ovq, ovar = import_official(src, local_checkpoint(cfg.model.official_vae))
            var_sd = ovar.state_dict()
            if not cfg.model.vqvae_checkpoint:
                vqvae.load_state_dict(ovq.state_dict())
                vqvae.freeze()
            parent = {"checkpoint": str(Path(src).resolve()), "run_id": None}
        else:
            raise UserError(f"model.init_from {src} does not exist")
        report = load_stage_weights(varsr, var_sd)
        if not report.get("loaded"):
            raise UserError(f"init_from {src}: no tensor fits this model (config mismatch?)")
        log.info(
            "init from %s: loaded %d, resized %d, dropped %d, new %d tensors",
            src,
            len(report["loaded"]),
            len(report.get("resized", [])),
            len(report.get("dropped", [])),
            len(report.get("new", [])),
        )
    if cfg.model.vqvae_checkpoint:
        load_tokenizer(vqvae, local_checkpoint(cfg.model.vqvae_checkpoint))
    return vqvae, varsr, report, parent
