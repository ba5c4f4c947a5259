"""Evaluation test sets, made once by ``varsr eval-prepare``, read by ``varsr eval --suite`` (docs/EVALUATION.md).

A set is a folder ``HR/``, ``LR/`` and ``manifest.json``: the protocol, the seed, and per pair its files and their
sha256 (checked when the set is read), where it was cut from and, for synthetic pairs, the degradation parameters
that made its LR (replayable, as the shards record them). Three kinds, the research code's test sets:

* ``paired``: centre crops of a given HR/LR folder pair (RealSR / DRealSR style: LR 128 -> HR 512 at x4), matched by
  file stem; the HR must be ``scale`` x its LR.
* ``synthetic``: ``n`` seeded HR crops from any HR folder (DIV2K-val: 3000 crops of 512 px), each LR made by a named
  degradation preset (``varsr-mild``, ``realesrgan-x4plus``). The preset lives in the data pipeline: the CLI passes
  its degrader in (inference does not import data_pipeline, tests/infra/test_layering.py).
* ``bundled``: the small real set the tests and the demo use, from photos that ship in registry packages and that no
  training recipe uses (scikit-image's stereo motorcycle pair and its coins photo; configs/demo/*.yaml and
  data_pipeline/sample_corpus.py use none of them for training), LR = bicubic x4.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from infra.core.errors import UserError

from .evaluate import list_images
from .images import ImageInputError, open_image_path

log = logging.getLogger(__name__)

FORMAT = "varsr-eval-set/1"
MANIFEST = "manifest.json"
# (hr uint8 HxWx3, preset name, seed) -> (lr uint8, params); params replayed by Replayer(hr, params) -> lr
Degrader = Callable[[np.ndarray, str, int], tuple[np.ndarray, dict]]
Replayer = Callable[[np.ndarray, dict], np.ndarray]
# scikit-image photos no recipe trains on: (file, HR crop boxes (x0, y0) of side `side`, as fractions of the free room)
BUNDLED = (
    ("motorcycle_left.png", ((0.0, 0.5), (1.0, 0.5))),
    ("motorcycle_right.png", ((0.0, 0.0), (1.0, 1.0))),
    ("coins.png", ((0.5, 0.5),)),
)


@dataclass
class EvalPair:
    """One pair of a prepared set."""

    name: str
    hr: Path
    lr: Path
    meta: dict[str, Any] = field(default_factory=dict)

    def load(self) -> tuple[Image.Image, Image.Image]:
        return open_image_path(self.hr), open_image_path(self.lr)


@dataclass
class EvalSet:
    """A prepared set: its folder, manifest and pairs."""

    name: str
    root: Path
    manifest: dict[str, Any]
    pairs: list[EvalPair]

    @property
    def sha256(self) -> str:
        """sha256 of the manifest file: what the set is (its files' hashes are in it)."""
        return hashlib.sha256((self.root / MANIFEST).read_bytes()).hexdigest()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save(img: Image.Image | np.ndarray, path: Path) -> str:
    im = Image.fromarray(img) if isinstance(img, np.ndarray) else img
    path.parent.mkdir(parents=True, exist_ok=True)
    im.convert("RGB").save(path, format="PNG")
    return _sha(path)


def _write_manifest(
    out: Path, name: str, protocol: dict[str, Any], seed: int | None, pairs: list[dict[str, Any]]
) -> EvalSet:
    if not pairs:
        raise UserError(f"no pairs were made for {out}")
    manifest = {"format": FORMAT, "name": name, "protocol": protocol, "seed": seed, "count": len(pairs), "pairs": pairs}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return load_set(out)


def _prepare_out(out: Path, overwrite: bool) -> None:
    if (out / MANIFEST).exists() and not overwrite:
        raise UserError(f"{out} already holds a test set (manifest.json); pass --overwrite to replace it")
    for sub in ("HR", "LR"):
        d = out / sub
        if d.is_dir():
            for p in d.iterdir():
                p.unlink()
        d.mkdir(parents=True, exist_ok=True)


def _open(path: Path) -> Image.Image:
    try:
        return open_image_path(path)
    except ImageInputError as e:
        raise UserError(f"{path}: {e}") from None


def _size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, EXIF orientation applied as the decoder applies it."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            return (h, w) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)
    except (OSError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: not a readable image ({type(e).__name__})") from None


def prepare_paired(
    hr_dir: Path,
    lr_dir: Path,
    out: Path,
    scale: int = 4,
    lr_size: int = 128,
    name: str | None = None,
    overwrite: bool = False,
) -> EvalSet:
    """Centre crops of an HR/LR folder pair: an ``lr_size`` LR crop about the LR's centre and the HR crop over the
    same area (``scale`` x larger). Every HR needs an LR of the same stem, exactly ``scale`` x smaller."""
    for d in (hr_dir, lr_dir):
        if not d.is_dir():
            raise UserError(f"{d} is not a folder")
    lrs = {p.stem: p for p in list_images(lr_dir)}
    hrs = list_images(hr_dir)
    if not hrs:
        raise UserError(f"no images in {hr_dir}")
    missing = [p.name for p in hrs if p.stem not in lrs]
    if missing:
        raise UserError(f"no LR in {lr_dir} for HR {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    for hp in hrs:  # every pair checked (headers only) before anything is written
        (hw, hh), (lw, lh) = _size(hp), _size(lrs[hp.stem])
        if (hw, hh) != (lw * scale, lh * scale):
            raise UserError(f"{hp.name}: HR {hw}x{hh} is not {scale} x its LR {lw}x{lh}")
        if min(lw, lh) < lr_size:
            raise UserError(f"{hp.name}: LR {lw}x{lh} is smaller than the {lr_size}-px crop")
    _prepare_out(out, overwrite)
    rows = []
    for hp in hrs:
        hr, lr = _open(hp), _open(lrs[hp.stem])
        x0, y0 = (lr.width - lr_size) // 2, (lr.height - lr_size) // 2
        lr_c = lr.crop((x0, y0, x0 + lr_size, y0 + lr_size))
        s = lr_size * scale
        hr_c = hr.crop((x0 * scale, y0 * scale, x0 * scale + s, y0 * scale + s))
        stem = hp.stem
        rows.append(
            {
                "name": stem,
                "hr": f"HR/{stem}.png",
                "lr": f"LR/{stem}.png",
                "hr_sha256": _save(hr_c, out / "HR" / f"{stem}.png"),
                "lr_sha256": _save(lr_c, out / "LR" / f"{stem}.png"),
                "source": {"hr": hp.name, "lr": lrs[stem].name, "lr_box": [x0, y0, x0 + lr_size, y0 + lr_size]},
            }
        )
    protocol = {"kind": "paired", "crop": "centre", "scale": scale, "lr_size": lr_size, "hr_size": lr_size * scale}
    return _write_manifest(out, name or out.name, protocol, None, rows)


def prepare_synthetic(
    hr_dir: Path,
    out: Path,
    n: int,
    preset: str,
    degrader: Degrader,
    seed: int = 0,
    hr_size: int = 512,
    scale: int = 4,
    name: str | None = None,
    overwrite: bool = False,
) -> EvalSet:
    """``n`` HR crops of ``hr_size`` px (pair ``i`` from file ``i * files // n``, in name order; a position drawn from
    ``seed``), each degraded by
    ``preset`` with seed ``seed * 1_000_003 + i``; the degradation parameters are recorded per pair."""
    if not hr_dir.is_dir():
        raise UserError(f"{hr_dir} is not a folder")
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    files = list_images(hr_dir)
    if not files:
        raise UserError(f"no images in {hr_dir}")
    _prepare_out(out, overwrite)
    rng = np.random.default_rng(seed)
    rows, cache_name, cache_img = [], None, None
    for i in range(n):
        src = files[i * len(files) // n]  # files in order, each read once
        if src != cache_name:
            cache_name, cache_img = src, np.asarray(_open(src).convert("RGB"))
        img = cache_img
        assert img is not None
        h, w = img.shape[:2]
        if min(h, w) < hr_size:
            raise UserError(f"{src.name}: {w}x{h} is smaller than the {hr_size}-px crop")
        y0, x0 = int(rng.integers(0, h - hr_size + 1)), int(rng.integers(0, w - hr_size + 1))
        hr = np.ascontiguousarray(img[y0 : y0 + hr_size, x0 : x0 + hr_size])
        pair_seed = seed * 1_000_003 + i
        lr, params = degrader(hr, preset, pair_seed)
        if lr.shape[:2] != (hr_size // scale, hr_size // scale):
            raise UserError(
                f"preset {preset} made a {lr.shape[1]}x{lr.shape[0]} LR from a {hr_size}-px HR; expected x{scale}"
            )
        stem = f"{i:05d}"
        rows.append(
            {
                "name": stem,
                "hr": f"HR/{stem}.png",
                "lr": f"LR/{stem}.png",
                "hr_sha256": _save(hr, out / "HR" / f"{stem}.png"),
                "lr_sha256": _save(lr, out / "LR" / f"{stem}.png"),
                "source": {"hr": src.name, "box": [x0, y0, x0 + hr_size, y0 + hr_size]},
                "seed": pair_seed,
                "degradation": json.loads(json.dumps(params, default=_json_default)),
            }
        )
    protocol = {
        "kind": "synthetic",
        "preset": preset,
        "scale": scale,
        "hr_size": hr_size,
        "lr_size": hr_size // scale,
        "crop": "random (seeded)",
    }
    return _write_manifest(out, name or out.name, protocol, seed, rows)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON: {type(o).__name__}")


def bundled_photos() -> list[Path]:
    """The package photos of the bundled set (scikit-image's data folder, installed with the pinned scikit-image)."""
    import skimage

    d = Path(skimage.__file__).parent / "data"
    return [d / f for f, _ in BUNDLED]


def prepare_bundled(
    out: Path, hr_size: int = 256, scale: int = 4, name: str = "bundled", overwrite: bool = False
) -> EvalSet:
    """The small real set: ``hr_size`` crops of the bundled photos (two per motorcycle view, one of the coins),
    LR = PIL bicubic / ``scale`` (the demo's held-out protocol)."""
    _prepare_out(out, overwrite)
    rows = []
    for path, (fname, boxes) in zip(bundled_photos(), BUNDLED):
        img = _open(path).convert("RGB")
        if min(img.size) < hr_size:
            raise UserError(f"{fname}: {img.width}x{img.height} is smaller than the {hr_size}-px crop")
        for k, (fx, fy) in enumerate(boxes):
            x0, y0 = round(fx * (img.width - hr_size)), round(fy * (img.height - hr_size))
            hr = img.crop((x0, y0, x0 + hr_size, y0 + hr_size))
            lr = hr.resize((hr_size // scale, hr_size // scale), Image.Resampling.BICUBIC)
            stem = f"{Path(fname).stem}_{k}"
            rows.append(
                {
                    "name": stem,
                    "hr": f"HR/{stem}.png",
                    "lr": f"LR/{stem}.png",
                    "hr_sha256": _save(hr, out / "HR" / f"{stem}.png"),
                    "lr_sha256": _save(lr, out / "LR" / f"{stem}.png"),
                    "source": {
                        "package": "scikit-image",
                        "file": f"skimage/data/{fname}",
                        "box": [x0, y0, x0 + hr_size, y0 + hr_size],
                    },
                }
            )
    protocol = {"kind": "bundled", "lr": "PIL bicubic", "scale": scale, "hr_size": hr_size, "lr_size": hr_size // scale}
    return _write_manifest(out, name, protocol, None, rows)


def load_set(root: str | Path, verify: bool = True) -> EvalSet:
    """Read a prepared set; with ``verify`` every file's sha256 is checked against the manifest."""
    root = Path(root)
    mf = root / MANIFEST
    if not mf.is_file():
        raise UserError(f"{root} is not a prepared test set (no {MANIFEST}; make one with `varsr eval-prepare`)")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{mf}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{mf}: format {manifest.get('format')!r} is not {FORMAT}")
    pairs = []
    for row in manifest["pairs"]:
        hp, lp = root / row["hr"], root / row["lr"]
        for p, key in ((hp, "hr_sha256"), (lp, "lr_sha256")):
            if not p.is_file():
                raise UserError(f"{root.name}: {row[key[:2]]} is listed in the manifest but missing")
            if verify and _sha(p) != row[key]:
                raise UserError(f"{root.name}: {row[key[:2]]} differs from the manifest (sha256)")
        pairs.append(EvalPair(row["name"], hp, lp, {k: v for k, v in row.items() if k not in ("hr", "lr")}))
    return EvalSet(manifest.get("name") or root.name, root, manifest, pairs)


def replay_check(es: EvalSet, replayer: Replayer) -> int:
    """Re-make every synthetic LR from its HR and recorded parameters; returns how many match their file exactly."""
    same = 0
    for p in es.pairs:
        hr, lr = (np.asarray(im.convert("RGB")) for im in p.load())
        if np.array_equal(replayer(hr, p.meta["degradation"]), lr):
            same += 1
    return same
