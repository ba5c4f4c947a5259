"""`varsr eval`: super-resolve paired LR/HR images, score SR (and an optional bicubic baseline), log to MLflow.

Pairs come from two folders, matched by file stem (``HR/0001.png`` <-> ``LR/0001.png``, extensions may differ), or
from any other source of ``(name, load -> (hr, lr))`` pairs (``varsr eval --shards`` reads them from built shards
through the data pipeline's shard reader). The scale of
each pair is HR size / LR size. Outputs in ``out_dir``: ``sr/<stem>.png``, ``metrics.csv`` (one row per image and
method),
``summary.json`` (means per method + the run config) and ``crops/<stem>.png`` (bicubic | SR | HR, a centre crop).
"""
from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from .images import ImageInputError, open_image_path
from infra.core.metrics import full_reference, optional_metrics

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
FR_METRICS = ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb")


@dataclass
class EvalResult:
    """Per-image rows, per-method means, notices about skipped metrics, and where the files went."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, dict[str, float]] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    out_dir: Path | None = None
    run_id: str | None = None


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def pair_folders(hr_dir: Path, lr_dir: Path) -> list[tuple[str, Path, Path]]:
    """(stem, hr, lr) for every HR file that has an LR file with the same stem."""
    lr = {p.stem: p for p in list_images(lr_dir)}
    pairs = [(p.stem, p, lr[p.stem]) for p in list_images(hr_dir) if p.stem in lr]
    if not pairs:
        raise FileNotFoundError(f"no HR/LR pairs with matching names in {hr_dir} and {lr_dir}")
    return pairs


Pair = tuple[str, Callable[[], tuple[Image.Image, Image.Image]]]  # (name, load -> (hr, lr))


def folder_pairs(hr_dir: Path, lr_dir: Path) -> list[Pair]:
    """Lazy (name, loader) pairs from two folders."""
    return [(stem, lambda hp=hp, lp=lp: (open_image_path(hp), open_image_path(lp)))
            for stem, hp, lp in pair_folders(hr_dir, lr_dir)]


def _crop_triptych(bic: Image.Image, sr: Image.Image, hr: Image.Image, side: int = 128) -> Image.Image:
    """Centre crops side by side: bicubic | SR | HR."""
    w, h = hr.size
    s = min(side, w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    out = Image.new("RGB", (3 * s, s))
    for i, im in enumerate((bic, sr, hr)):
        out.paste(im.crop(box), (i * s, 0))
    return out


def format_table(summary: dict[str, dict[str, float]]) -> str:
    """Plain-text table: one row per method, one column per metric."""
    cols = sorted({k for m in summary.values() for k in m if k != "images"}, key=lambda k: (k not in FR_METRICS, k))
    head = f"{'method':<10} {'images':>6} " + " ".join(f"{c:>10}" for c in cols)
    lines = [head, "-" * len(head)]
    for method, m in summary.items():
        vals = " ".join(f"{m.get(c, float('nan')):>10.4f}" for c in cols)
        lines.append(f"{method:<10} {int(m.get('images', 0)):>6} {vals}")
    return "\n".join(lines)


def evaluate(pipeline, hr_dir: str | Path, lr_dir: str | Path, out_dir: str | Path, **kw: Any) -> EvalResult:
    """Evaluate on a pair of HR/LR folders (see :func:`evaluate_pairs` for the options)."""
    pairs = folder_pairs(Path(hr_dir), Path(lr_dir))
    return evaluate_pairs(pipeline, pairs, out_dir, source={"hr_dir": str(hr_dir), "lr_dir": str(lr_dir)}, **kw)


def evaluate_pairs(pipeline, pairs: list[Pair], out_dir: str | Path, baseline: str | None = None,
                   upscale_kwargs: dict[str, Any] | None = None, log_to_mlflow: bool = True,
                   tracking_uri: str | None = None, experiment: str = "varsr-eval", max_crops: int = 4,
                   progress: bool = True, source: dict[str, Any] | None = None) -> EvalResult:
    """Run the pipeline over every pair, score it (and the baseline), write files and (optionally) an MLflow run."""
    from tqdm import tqdm

    out = Path(out_dir)
    if baseline not in (None, "bicubic"):
        raise ValueError(f"unknown baseline {baseline!r}; only 'bicubic' is supported")
    (out / "sr").mkdir(parents=True, exist_ok=True)
    (out / "crops").mkdir(parents=True, exist_ok=True)
    extra, notices = optional_metrics()
    res = EvalResult(notices=list(notices), out_dir=out)
    kw = dict(upscale_kwargs or {})
    t0 = time.perf_counter()
    for stem, load in tqdm(pairs, desc="eval", unit="img", disable=not progress):
        try:
            hr, lr = load()
        except ImageInputError as e:
            res.failed.append(f"{stem}: {e}")
            continue
        scale = hr.width / lr.width
        if abs(hr.height / lr.height - scale) > 1e-6 * max(1.0, scale):
            res.failed.append(f"{stem}: HR {hr.size} is not a uniform multiple of LR {lr.size}")
            continue
        sr = pipeline.upscale(lr, scale=scale, **kw)
        if sr.size != hr.size:  # rounding of a non-integral scale: match the reference exactly
            sr = sr.resize(hr.size, Image.BICUBIC)
        sr.save(out / "sr" / f"{stem}.png")
        bic = lr.resize(hr.size, Image.BICUBIC)
        methods = {"varsr": sr, **({"bicubic": bic} if baseline == "bicubic" else {})}
        for method, img in methods.items():
            row: dict[str, Any] = {"image": stem, "method": method, "scale": scale, **full_reference(img, hr)}
            for name, fn in extra.items():
                row[name] = fn(img, hr)
            res.rows.append(row)
        if len([r for r in res.rows if r["method"] == "varsr"]) <= max_crops:
            _crop_triptych(bic, sr, hr).save(out / "crops" / f"{stem}.png")
    seconds = time.perf_counter() - t0
    for method in dict.fromkeys(r["method"] for r in res.rows):
        rows = [r for r in res.rows if r["method"] == method]
        keys = [k for k in rows[0] if k not in ("image", "method", "scale")]
        res.summary[method] = {"images": float(len(rows)), **{k: sum(r[k] for r in rows) / len(rows) for k in keys}}
    _write_files(res, out, {**(source or {}), "baseline": baseline, **kw,
                            "seconds": seconds, "pipeline": pipeline.describe()})
    if log_to_mlflow:
        res.run_id = _log_mlflow(res, out, kw, baseline, tracking_uri, experiment)
    return res


def _write_files(res: EvalResult, out: Path, meta: dict[str, Any]) -> None:
    if res.rows:
        keys = list(dict.fromkeys(k for r in res.rows for k in r))
        with open(out / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(res.rows)
    (out / "summary.json").write_text(json.dumps(
        {"summary": res.summary, "notices": res.notices, "failed": res.failed, "config": meta},
        indent=2, default=str) + "\n")


def _log_mlflow(res: EvalResult, out: Path, kw: dict[str, Any], baseline: str | None, tracking_uri: str | None,
                experiment: str) -> str:
    import mlflow

    from infra.core.tracking import ensure_experiment, resolve_tracking_uri, tracking_uri_scope

    uri = resolve_tracking_uri(tracking_uri)
    with tracking_uri_scope(uri):
        exp_id = ensure_experiment(uri, experiment)
        with mlflow.start_run(experiment_id=exp_id, run_name="eval") as run:
            mlflow.log_params({k: v for k, v in {**kw, "baseline": baseline}.items() if v is not None})
            for method, m in res.summary.items():
                mlflow.log_metrics({f"{method}_{k}": v for k, v in m.items() if v == v and abs(v) != float("inf")})
            for name in ("metrics.csv", "summary.json"):
                if (out / name).is_file():
                    mlflow.log_artifact(str(out / name))
            if (out / "crops").is_dir():
                mlflow.log_artifacts(str(out / "crops"), artifact_path="crops")
            return run.info.run_id
