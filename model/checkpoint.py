"""The native checkpoint format, owned here alone: a folder with ``model.safetensors`` + ``config.json``.

``model.safetensors`` holds tensors under ``vqvae.<key>`` and ``varsr.<key>`` (the official key names,
docs/MODEL.md §6); ``config.json`` holds ``format``/``version``, the full ``VARSRConfig`` and free metadata (lineage,
init report). Two variants share the layout: the full model (tokenizer + transformer, ``save_pretrained``) and the
tokenizer only (``contents: tokenizer``, ``save_tokenizer``, written by stage 0). Training initialises from the parts
(``read_parts``), inference and serving load the whole (``from_pretrained``), and every other module asks this one
whether a folder is a checkpoint (``is_native_checkpoint`` / ``find_checkpoint_dir``) instead of naming its files.
safetensors holds only tensors, so loading never unpickles anything; loading is strict, and every missing,
unexpected or mis-shaped key is named in one clear error. The frozen tokenizer's identity is the sha256 of its
weights (``tokenizer_sha256``): the token cache in the shards records it, and training checks it before using one.
Every tensor read from ``model.safetensors`` must be floating point and finite (``check_tensors``): a NaN weight
would otherwise give an all-black image and an integer one garbage, both without a word.

An optional third file, ``sampling.json``, holds the model's own sampling defaults (``cfg``, ``top_k``, ``top_p``,
``color_fix``, ``scale``; any subset), as ``generation_config.json`` does for a language model: they are set at export
or registration and used by every entry point unless a call overrides them; a folder without it keeps the global
defaults of the inference config (docs/MODEL.md §6, "Platform"). This module reads, writes and validates it
(``read_sampling_defaults`` / ``write_sampling_defaults`` / ``validate_sampling_defaults``); which defaults win over
which is the inference pipeline's business (inference/pipeline.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from infra.core.errors import UserError

from .config import VARSRConfig

FORMAT, VERSION = "varsr-native", 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"
SAMPLING = "sampling.json"  # optional: the model's own sampling defaults
# the sampling defaults a checkpoint may carry, with their type; the names of inference/config.py's SamplingConfig
# (this layer does not import inference: tests/inference/test_infer_sampling_defaults.py keeps the two in step)
SAMPLING_FIELDS: dict[str, type] = {"scale": float, "cfg": float, "top_k": int, "top_p": float, "color_fix": str}
SAMPLING_COLOR_FIXES = ("adain", "wavelet", "none")  # inference/colorfix.py
_SAMPLING_RANGES = {
    "scale": (lambda v: v > 0, "> 0"),
    "cfg": (lambda v: v >= 0, ">= 0"),
    "top_k": (lambda v: v >= 0, ">= 0 (0 = off)"),
    "top_p": (lambda v: 0 <= v <= 1, "in [0, 1] (0 = off)"),
}


def check_tensors(tensors: dict[str, torch.Tensor], source) -> None:
    """Every tensor floating point and finite, else one UserError naming the first bad one: all weights and
    buffers of VARSR and its VQVAE are floating point, and a NaN or inf weight only shows up as a black or garbled
    image much later."""
    for k, v in tensors.items():
        if not v.is_floating_point():
            raise UserError(
                f"{source}: tensor {k} has dtype {str(v.dtype).replace('torch.', '')}; "
                f"model weights must be floating point"
            )
        if v.numel() and not bool(torch.isfinite(v).all()):
            n = int((~torch.isfinite(v)).sum())
            raise UserError(f"{source}: tensor {k} is not finite ({n} of {v.numel()} values are NaN or inf)")


def key_report(expected: dict[str, tuple], got: dict[str, tuple]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mis-shaped 'key: got X, expected Y') between two {key: shape} maps."""
    missing = sorted(k for k in expected if k not in got)
    unexpected = sorted(k for k in got if k not in expected)
    bad = sorted(
        f"{k}: got {tuple(got[k])}, expected {tuple(expected[k])}"
        for k in expected
        if k in got and tuple(got[k]) != tuple(expected[k])
    )
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


def _prefixed(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def _write(directory, tensors: dict[str, torch.Tensor], meta: dict, sampling: dict | None = None) -> Path:
    """Weights first (temporary name, then rename), then ``sampling.json`` when given (a stale one is removed),
    config.json last: a folder with a config.json is complete."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if sampling is not None:
        sampling = validate_sampling_defaults(sampling, d / SAMPLING)
    tmp = d / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    tmp.replace(d / WEIGHTS)
    if sampling:
        write_sampling_defaults(d, sampling)
    else:
        (d / SAMPLING).unlink(missing_ok=True)
    tmp_cfg = d / (CONFIG + ".tmp")
    tmp_cfg.write_text(json.dumps({"format": FORMAT, "version": VERSION, **meta}, indent=2) + "\n")
    tmp_cfg.replace(d / CONFIG)
    return d


def save_pretrained(directory, vqvae, varsr, extra: dict | None = None, sampling: dict | None = None) -> Path:
    """Write the full model (tokenizer + transformer) into ``directory`` (created); returns the directory.
    ``sampling``: the model's own sampling defaults (``sampling.json``); None writes none."""
    tensors = {**_prefixed("vqvae", vqvae), **_prefixed("varsr", varsr)}
    return _write(directory, tensors, {"config": varsr.cfg.to_dict(), **(extra or {})}, sampling)


def save_tokenizer(directory, vqvae, config: VARSRConfig, extra: dict | None = None) -> Path:
    """Write a tokenizer-only checkpoint (``vqvae.*`` tensors; ``contents: tokenizer``) for stages 1 and 2."""
    return _write(
        directory, _prefixed("vqvae", vqvae), {"config": config.to_dict(), "contents": "tokenizer", **(extra or {})}
    )


# the tokenizer tensors that only shape what is drawn from the codes, not the codes themselves
DECODER_PREFIXES = ("decoder.", "post_quant_conv.")


def with_decoder(full_dir, tokenizer_dir, out_dir, extra: dict | None = None) -> Path:
    """A full checkpoint whose decoder comes from another tokenizer checkpoint (a decoder finetune, stage 0b of
    docs/EXPERIMENTS.md), written to ``out_dir``.

    Every other tokenizer tensor (encoder, quant_conv, codebook, phi convs, usage buffer) must be bit-identical in
    both: the transformer of ``full_dir`` was trained on those codes, and a tokenizer that encodes differently would
    silently give it inputs it never saw. ``extra`` is merged into config.json's ``lineage``."""
    full_vq, full_var, meta = read_parts(full_dir)
    tok_vq, _, _ = read_parts(tokenizer_dir)
    if not full_var:
        raise UserError(f"{full_dir} is a tokenizer-only checkpoint: with_decoder needs a full model")
    if set(full_vq) != set(tok_vq):
        raise UserError(f"{tokenizer_dir} has other tokenizer keys than {full_dir}: not the same VQVAE config")
    changed = sorted(
        k
        for k in full_vq
        if not k.startswith(DECODER_PREFIXES)
        and not (full_vq[k].shape == tok_vq[k].shape and torch.equal(full_vq[k], tok_vq[k]))
    )
    if changed:
        raise UserError(
            f"{tokenizer_dir} does not encode like {full_dir} (changed: {', '.join(changed[:4])}"
            f"{' ...' if len(changed) > 4 else ''}): only decoder.* and post_quant_conv.* may differ"
        )
    tensors = {
        **{f"vqvae.{k}": (tok_vq[k] if k.startswith(DECODER_PREFIXES) else v) for k, v in full_vq.items()},
        **{f"varsr.{k}": v for k, v in full_var.items()},
    }
    meta = {k: v for k, v in meta.items() if k not in ("format", "version")}
    meta["lineage"] = {**meta.get("lineage", {}), **(extra or {})}
    return _write(out_dir, tensors, meta, read_sampling_defaults(full_dir))  # same model, same defaults


def is_native_checkpoint(directory) -> bool:
    d = Path(directory)
    return (d / WEIGHTS).is_file() and (d / CONFIG).is_file()


def copy_checkpoint(src, dst) -> Path:
    """The checkpoint of folder ``src`` (weights + config.json, not its ``sampling.json``) copied into ``dst``
    (created): weights first, config.json last, the file that makes a folder a checkpoint."""
    import shutil

    s, d = require_native_checkpoint(src), Path(dst)
    d.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, CONFIG):
        shutil.copy2(s / name, d / name)
    return d


def require_native_checkpoint(directory) -> Path:
    """``directory`` as a Path, or a UserError saying it is not a native checkpoint."""
    d = Path(directory)
    if not is_native_checkpoint(d):
        raise UserError(f"{d} is not a native VARSR checkpoint (needs {WEIGHTS} + {CONFIG})")
    return d


def find_checkpoint_dir(root) -> Path:
    """The native checkpoint folder at or under ``root`` (e.g. inside a downloaded MLflow model)."""
    root = Path(root)
    for cand in [root, *sorted(p.parent for p in root.rglob(WEIGHTS))]:
        if is_native_checkpoint(cand):
            return cand
    raise UserError(f"no native VARSR checkpoint ({WEIGHTS} + {CONFIG}) under {root}")


def read_parts(directory) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(tokenizer state, transformer state, the whole config.json) of a native checkpoint; the transformer state is
    empty for a tokenizer-only checkpoint."""
    _, meta = read_config(directory)
    tensors = _load_tensors(Path(directory))
    return (_strip(tensors, "vqvae."), _strip(tensors, "varsr."), meta)


def load_tokenizer(vqvae: torch.nn.Module, directory, state: dict[str, torch.Tensor] | None = None) -> None:
    """Load the tokenizer weights of a native checkpoint (full or tokenizer-only) into ``vqvae`` and freeze it;
    ``state``: its already read tokenizer tensors (from ``read_parts``)."""
    vq_sd = state if state is not None else read_parts(directory)[0]
    if not vq_sd:
        raise UserError(f"{directory} holds no VQVAE weights")
    ours = getattr(vqvae, "vq_config", None)
    if ours is not None:
        # settings the tensors' shapes do not reveal but the computation depends on: a tokenizer trained with
        # 32 GroupNorm groups loads without complaint into a 1-group model and then decodes something else
        theirs = read_config(directory)[0].vqvae
        diff = [
            f"{k} {getattr(theirs, k)} (model: {getattr(ours, k)})"
            for k in ("norm_groups", "quant_resi")
            if getattr(theirs, k) != getattr(ours, k)
        ]
        if diff:
            raise UserError(
                f"tokenizer {directory} was trained with {', '.join(diff)}: build the model with its "
                f"config (model.overrides or the checkpoint's config.json)"
            )
    strict_load(vqvae, vq_sd, f"tokenizer {directory} does not fit this model's VQVAE config")
    vqvae.freeze()


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _load_tensors(d: Path) -> dict[str, torch.Tensor]:
    wf = d / WEIGHTS
    if not wf.is_file():
        raise UserError(f"{d}: {WEIGHTS} is missing")
    try:
        tensors = load_file(str(wf))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{wf} is not a readable safetensors file ({e})") from None
    stray = sorted(k for k in tensors if not k.startswith(("vqvae.", "varsr.")))
    if stray:
        raise UserError(f"{wf}: unexpected keys outside vqvae./varsr.: {', '.join(stray)}")
    check_tensors(tensors, wf)
    return tensors


def _read_config_json(d: Path):
    cj = d / CONFIG
    if not d.is_dir():
        raise UserError(f"checkpoint folder {d} does not exist")
    if not cj.is_file():
        raise UserError(f"{d} is not a native VARSR checkpoint: {CONFIG} is missing")
    try:
        return json.loads(cj.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cj} is not valid JSON ({e})") from None


def read_metadata(directory) -> dict:
    """The metadata a checkpoint folder's config.json carries (``lineage``, stage 0's ``colour_check``, ...), read
    without checking the model config: for callers that follow lineage, not load weights (:func:`read_config`
    checks it all)."""
    meta = _read_config_json(Path(directory))
    return meta if isinstance(meta, dict) else {}


def read_config(directory) -> tuple[VARSRConfig, dict]:
    """(config, the whole config.json) of a native checkpoint folder, with clear errors."""
    d = Path(directory)
    cj = d / CONFIG
    meta = _read_config_json(d)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(
            f"{cj}: format is {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r}"
        )
    if meta.get("version") != VERSION:
        raise UserError(f"{cj}: unsupported version {meta.get('version')!r} (this code reads version {VERSION})")
    try:
        cfg = VARSRConfig.from_dict(meta["config"])
    except Exception as e:  # noqa: BLE001 - config errors become one clear line
        raise UserError(f"{cj}: invalid model config: {e}") from None
    return cfg, meta


# ---- sampling.json: the model's own sampling defaults ----------------------------------------------------------------
def validate_sampling_defaults(values, source) -> dict:
    """``values`` as a clean dict of sampling defaults, or one UserError naming ``source`` and the bad key: only the
    keys of ``SAMPLING_FIELDS``, each of its type (an int is a float too; a bool is neither), numbers finite, cfg >= 0,
    top_k >= 0 (0 = off), top_p in [0, 1] (0 = off), scale > 0, color_fix one of ``SAMPLING_COLOR_FIXES``. The
    pipeline checks the model-dependent bounds (top_k <= vocabulary, the scale limits) when it loads them."""
    if not isinstance(values, dict):
        raise UserError(f"{source}: sampling defaults must be a JSON object of key: value, got {type(values).__name__}")
    out: dict = {}
    for k, v in values.items():
        kind = SAMPLING_FIELDS.get(k)
        if kind is None:
            raise UserError(f"{source}: unknown sampling default {k!r} (known: {', '.join(SAMPLING_FIELDS)})")
        ok_type = (
            isinstance(v, str)
            if kind is str
            else isinstance(v, int) and not isinstance(v, bool)
            if kind is int
            else isinstance(v, (int, float)) and not isinstance(v, bool)
        )
        if not ok_type:
            raise UserError(
                f"{source}: sampling default {k} must be {'a string' if kind is str else kind.__name__}, got {v!r}"
            )
        if kind is not str and not math.isfinite(v):
            raise UserError(f"{source}: sampling default {k} must be a finite number, got {v!r}")
        if k == "color_fix" and v not in SAMPLING_COLOR_FIXES:
            raise UserError(
                f"{source}: sampling default color_fix must be one of {', '.join(SAMPLING_COLOR_FIXES)}, got {v!r}"
            )
        if k in _SAMPLING_RANGES and not _SAMPLING_RANGES[k][0](v):
            raise UserError(f"{source}: sampling default {k} must be {_SAMPLING_RANGES[k][1]}, got {v!r}")
        out[k] = kind(v)
    return out


def read_sampling_defaults(directory) -> dict:
    """The sampling defaults a native checkpoint folder carries (``sampling.json``, validated); {} without the
    file: such a model keeps the global defaults."""
    f = Path(directory) / SAMPLING
    if not f.is_file():
        return {}
    try:
        values = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{f} is not valid JSON ({e})") from None
    return validate_sampling_defaults(values, f)


def write_sampling_defaults(directory, values: dict) -> Path:
    """Write (replace) the sampling defaults of a checkpoint folder, validated first; returns the file. Written
    under a temporary name and renamed, so a reader sees the old file or the new one."""
    d = Path(directory)
    clean = validate_sampling_defaults(values, d / SAMPLING)
    tmp = d / (SAMPLING + ".tmp")
    tmp.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
    tmp.replace(d / SAMPLING)
    return d / SAMPLING


def from_pretrained(directory, device="cpu"):
    """(vqvae, varsr) from a native checkpoint folder; strict key/shape check against its config."""
    from .build import build

    cfg, meta = read_config(directory)
    if meta.get("contents") == "tokenizer":
        raise UserError(f"{directory} is a tokenizer-only checkpoint (stage 0): it has no transformer to run")
    wf = Path(directory) / WEIGHTS
    tensors = _load_tensors(Path(directory))
    vq_sd, var_sd = _strip(tensors, "vqvae."), _strip(tensors, "varsr.")
    vqvae, varsr = build(cfg, device="cpu")
    hint = f" (is {wf} from another model config than '{cfg.name}' in its config.json?)"
    strict_load(vqvae, vq_sd, f"{wf} [vqvae] does not match its config{hint}")
    strict_load(varsr, var_sd, f"{wf} [varsr] does not match its config{hint}")
    vqvae.freeze()
    varsr.to(device)
    return vqvae, varsr


# ---- the frozen tokenizer as the token cache uses it ----------------------------------------------------------------
def tokenizer_sha256(vqvae: torch.nn.Module) -> str:
    """sha256 of a tokenizer's weights: every entry of its state dict (parameters and buffers) in sorted key order,
    each as its key, dtype, shape and raw bytes. Equal weights give the same hash wherever they were loaded from (a
    full checkpoint, a tokenizer-only one, the same seed's random init); the token cache records it and training
    uses a cache only when its own frozen tokenizer has the same hash."""
    h = hashlib.sha256()
    for k, v in sorted(vqvae.state_dict().items()):
        t = v.detach().to("cpu").contiguous()
        h.update(f"{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FrozenTokenizer:
    """The frozen VQVAE of a checkpoint as the token cache runs it: HR crops in, the training objective's targets out.

    Picklable (a Ray task receives it whole, so workers need no access to the checkpoint's location). Calling it
    runs :func:`model.losses.tokenize_hr`, the code :func:`model.losses.compute_loss` runs on the fly.
    """

    def __init__(self, vqvae: torch.nn.Module, config: VARSRConfig, source: str = ""):
        self.vqvae, self.config, self.source = vqvae.freeze(), config, source
        self.sha256 = tokenizer_sha256(vqvae)
        self.patch_nums = tuple(int(p) for p in config.patch_nums)
        self.image_size = config.image_size
        self.vocab_size = config.vqvae.vocab_size

    def to(self, device) -> "FrozenTokenizer":
        self.vqvae.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.vqvae.parameters()).device

    def __call__(self, hr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hr (B, 3, S, S) in [0, 1] -> (indices (B, L) int64, residual (B, pn_last², Cvae) float32), on hr's
        device."""
        from .losses import tokenize_hr

        idx_list, R = tokenize_hr(self.vqvae, hr.to(self.device))
        return torch.cat(idx_list, dim=1), R


def open_tokenizer(checkpoint: str) -> FrozenTokenizer:
    """The frozen tokenizer of a native checkpoint folder (full or tokenizer-only), a local path or a URL (then its
    two files are fetched through the storage layer). Only the ``vqvae.*`` tensors are read."""
    from infra.core import storage

    from .vqvae import VQVAE

    src = str(checkpoint)
    with tempfile.TemporaryDirectory(prefix="varsr-tokenizer-") as tmp:
        if storage.is_local(src):
            d = Path(storage.local_path(src))
        else:
            d = Path(tmp)
            for name in (CONFIG, WEIGHTS):
                url = storage.join(src, name)
                if not storage.exists(url):
                    raise UserError(f"{src} is not a native VARSR checkpoint: {name} is missing")
                storage.get_file(url, d / name)
        cfg, meta = read_config(d)
        require_native_checkpoint(d)
        try:
            with safe_open(str(d / WEIGHTS), framework="pt") as f:
                state = {k[len("vqvae.") :]: f.get_tensor(k) for k in f.keys() if k.startswith("vqvae.")}
        except Exception as e:  # noqa: BLE001 - an unreadable file is one clear line
            raise UserError(f"{d / WEIGHTS} is not a readable safetensors file ({e})") from None
        check_tensors({f"vqvae.{k}": v for k, v in state.items()}, f"{src.rstrip('/')}/{WEIGHTS}")
    if not state:
        raise UserError(f"{src} holds no VQVAE weights")
    vqvae = VQVAE(cfg)
    strict_load(vqvae, state, f"tokenizer {src} does not fit its own config")
    return FrozenTokenizer(vqvae, cfg, src)
