"""`varsr eval`: super-resolve paired LR/HR images, score SR (and an optional bicubic baseline), log to MLflow.

Pairs come from two folders, matched by file stem (``HR/0001.png`` <-> ``LR/0001.png``, extensions may differ), or
from any other source of ``(name, load -> (hr, lr))`` pairs (``varsr eval --shards`` reads them from built shards
through the data pipeline's shard reader). The scale of
each pair is HR size / LR size. Outputs in ``out_dir``: ``sr/<stem>.png``, ``metrics.csv`` (one row per image and
method),
``summary.json`` (means per method + the run config) and ``crops/<stem>.png`` (bicubic | SR | HR, a centre crop).

The MLflow run (``eval <model> <data> <time>``, in the pipeline's experiment, nested under a parent when one is given)
records what was evaluated on what: the model URI (and the registered model's logged model as a model input), the
sampling params, the data as a dataset input (a shard manifest by its sha256, else the pairs by a hash of their
pixels), ``<method>/<metric>`` means (``varsr/psnr_y``, ``bicubic/ssim_y``, ...) and the files above.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from .eval_metrics import load_metrics, score_image
from .images import ImageInputError, open_image_path

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
    return [
        (stem, lambda hp=hp, lp=lp: (open_image_path(hp), open_image_path(lp)))
        for stem, hp, lp in pair_folders(hr_dir, lr_dir)
    ]


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


@dataclass
class TrackingOptions:
    """Where and how ``varsr eval`` records its MLflow run."""

    tracking_uri: str | None = None  # None -> $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str | None = None  # None -> $MLFLOW_EXPERIMENT_NAME, else the parent's, else varsr
    run_name: str | None = None  # None -> "eval <model> <data> <local time>"
    parent_run_id: str | None = None  # None -> $VARSR_PARENT_RUN_ID


def evaluate_pairs(
    pipeline,
    pairs: list[Pair],
    out_dir: str | Path,
    baseline: str | None = None,
    upscale_kwargs: dict[str, Any] | None = None,
    log_to_mlflow: bool = True,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    max_crops: int = 4,
    progress: bool = True,
    source: dict[str, Any] | None = None,
    model_ref: str | None = None,
    run_name: str | None = None,
    parent_run_id: str | None = None,
) -> EvalResult:
    """Run the pipeline over every pair, score it (and the baseline), write files and (optionally) an MLflow run.

    ``source`` says where the pairs come from (``{"shards": spec}`` or ``{"hr_dir": ..., "lr_dir": ...}``) and
    ``model_ref`` what was evaluated (a ``models:/`` URI or a checkpoint folder); both are recorded in the run."""
    from tqdm import tqdm

    out = Path(out_dir)
    if baseline not in (None, "bicubic"):
        raise ValueError(f"unknown baseline {baseline!r}; only 'bicubic' is supported")
    (out / "sr").mkdir(parents=True, exist_ok=True)
    (out / "crops").mkdir(parents=True, exist_ok=True)
    metrics, notices = load_metrics(FR_METRICS)  # the suite's scorer (inference/eval_metrics.py)
    res = EvalResult(notices=list(notices), out_dir=out)
    kw = dict(upscale_kwargs or {})
    content = hashlib.sha256()  # what the pairs hold, whatever their files were called or encoded as
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
        content.update(stem.encode() + hr.convert("RGB").tobytes() + lr.convert("RGB").tobytes())
        sr = pipeline.upscale(lr, scale=scale, **kw)
        if sr.size != hr.size:  # rounding of a non-integral scale: match the reference exactly
            sr = sr.resize(hr.size, Image.Resampling.BICUBIC)
        sr.save(out / "sr" / f"{stem}.png")
        bic = lr.resize(hr.size, Image.Resampling.BICUBIC)
        methods = {"varsr": sr, **({"bicubic": bic} if baseline == "bicubic" else {})}
        for method, img in methods.items():
            row: dict[str, Any] = {
                "image": stem,
                "method": method,
                "scale": scale,
                **score_image(np.asarray(img.convert("RGB")), np.asarray(hr.convert("RGB")), metrics),
            }
            res.rows.append(row)
        if len([r for r in res.rows if r["method"] == "varsr"]) <= max_crops:
            _crop_triptych(bic, sr, hr).save(out / "crops" / f"{stem}.png")
    seconds = time.perf_counter() - t0
    for method in dict.fromkeys(r["method"] for r in res.rows):
        rows = [r for r in res.rows if r["method"] == method]
        keys = [k for k in rows[0] if k not in ("image", "method", "scale")]
        res.summary[method] = {"images": float(len(rows)), **{k: sum(r[k] for r in rows) / len(rows) for k in keys}}
    _write_files(
        res,
        out,
        {
            **(source or {}),
            "model": model_ref,
            "baseline": baseline,
            **kw,
            "seconds": seconds,
            "pipeline": pipeline.describe(),
        },
    )
    if log_to_mlflow:
        opts = TrackingOptions(tracking_uri, experiment, run_name, parent_run_id)
        res.run_id = _log_mlflow(
            res, out, kw, baseline, opts, source or {}, model_ref, content.hexdigest(), pipeline.describe()
        )
    return res


def _write_files(res: EvalResult, out: Path, meta: dict[str, Any]) -> None:
    if res.rows:
        keys = list(dict.fromkeys(k for r in res.rows for k in r))
        with open(out / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(res.rows)
    from infra.core.redact import redact_config

    (out / "summary.json").write_text(
        json.dumps(
            {
                "summary": res.summary,
                "notices": res.notices,
                "failed": res.failed,
                "config": redact_config(json.loads(json.dumps(meta, default=str))),
            },
            indent=2,
            default=str,
        )
        + "\n"
    )


def _data_input(source: dict[str, Any], content_sha: str, out: Path, n: int):
    """The dataset input of an evaluation: a shard dataset by its manifest (sha256 digest, URL / run-relative
    source), any other pairs by the hash of their pixels."""
    from infra.core import storage
    from infra.core.redact import redact
    from infra.core.tracking import dataset_input, portable_ref

    shards, manifest = source.get("shards"), source.get("manifest")  # manifest: the shard format's manifest_ref
    if shards and manifest:
        if storage.exists(manifest):
            sha = storage.sha256(manifest)
            local = storage.is_local(manifest)
            src = portable_ref(storage.local_path(manifest), out) if local else redact(manifest)
            return dataset_input(
                src,
                sha,
                name=os.path.basename(os.path.normpath(str(shards).rstrip("/"))),
                context="evaluation",
                profile={"manifest_sha256": sha, "pairs": n, "pixels_sha256": content_sha},
            )
    where = source.get("hr_dir") or shards or "pairs"
    src = redact(str(where)) if "://" in str(where) else portable_ref(str(where), out)
    return dataset_input(
        src,
        content_sha,
        name=os.path.basename(os.path.normpath(str(where))) or "pairs",
        context="evaluation",
        profile={
            "pixels_sha256": content_sha,
            "pairs": n,
            **({"lr_dir": portable_ref(source["lr_dir"], out)} if source.get("lr_dir") else {}),
        },
    )


def _model_label(model_ref: str | None) -> str | None:
    if not model_ref:
        return None
    return (
        model_ref.removeprefix("models:/")
        if model_ref.startswith("models:/")
        else os.path.basename(os.path.normpath(model_ref))
    )


def _log_mlflow(
    res: EvalResult,
    out: Path,
    kw: dict[str, Any],
    baseline: str | None,
    opts: TrackingOptions,
    source: dict[str, Any],
    model_ref: str | None,
    content_sha: str,
    pipeline: dict[str, Any],
) -> str:
    from mlflow.entities import LoggedModelInput, Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from infra.core.redact import redact
    from infra.core.tracking import portable_ref, resolve_tracking_uri, run_name, start_run

    uri = resolve_tracking_uri(opts.tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    where = source.get("shards") or source.get("hr_dir")
    data_label = os.path.basename(os.path.normpath(str(redact(where)))) if where else None
    model = (
        model_ref
        if (model_ref is None or "://" in model_ref or model_ref.startswith("models:/"))
        else portable_ref(model_ref, out)
    )
    if model:
        model = redact(model)  # a URL may carry credentials or a signature (docs/SECURITY.md, "Secrets in URIs")
    tags = {"varsr.stage": "eval", **({"varsr.model_uri": model} if model else {})}
    run = start_run(
        uri,
        opts.run_name or run_name("eval", _model_label(model_ref), data_label),
        experiment=opts.experiment,
        parent_run_id=opts.parent_run_id,
        tags=tags,
        source="varsr eval",
    )
    run_id, status = run.info.run_id, "FAILED"
    try:
        params = {
            **{k: v for k, v in {**kw, "baseline": baseline}.items() if v is not None},
            "model_uri": model,
            "pairs": len({r["image"] for r in res.rows}),
            "failed": len(res.failed),
            **{f"data.{k}": (v if "://" in str(v) else portable_ref(str(v), out)) for k, v in source.items()},
            **{f"pipeline.{k}": v for k, v in pipeline.items()},
        }
        client.log_batch(run_id, params=[Param(k, redact(str(v))[:500]) for k, v in params.items()])
        client.log_inputs(run_id, datasets=[_data_input(source, content_sha, out, len(res.rows))])
        if model_ref and model_ref.startswith("models:/"):
            try:
                mv = _model_version(client, model_ref)
                if mv is not None:
                    client.set_tag(run_id, "varsr.model_version", f"{mv.name}/{mv.version}")
                    model_id = getattr(mv, "model_id", None) or (
                        mv.source.removeprefix("models:/") if (mv.source or "").startswith("models:/m-") else None
                    )
                    if model_id:
                        client.log_inputs(run_id, models=[LoggedModelInput(model_id)])
            except MlflowException as e:
                log.info("model %s not linked as an input: %s", model_ref, e)
        for method, m in res.summary.items():
            for k, v in m.items():
                if v == v and abs(v) != float("inf"):
                    client.log_metric(run_id, f"{method}/{k}", float(v))
        for name in ("metrics.csv", "summary.json"):
            if (out / name).is_file():
                client.log_artifact(run_id, str(out / name))
        if (out / "crops").is_dir():
            client.log_artifacts(run_id, str(out / "crops"), artifact_path="crops")
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    return run_id


def _model_version(client, model_uri: str):
    """The registered version a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI points at (None otherwise)."""
    ref = model_uri.removeprefix("models:/").strip("/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    if "/" in ref:
        name, version = ref.split("/", 1)
        if version.isdigit():
            return client.get_model_version(name, version)
    return None
