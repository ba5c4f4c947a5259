"""``varsr eval --suite``: every test set of a suite through every method, one table like the paper's Table 1
(docs/EVALUATION.md).

Protocol per pair (the details the research code's authors name as changing numbers): the LR is resized to the HR
size (PIL bicubic) before inference, and the model runs on it at scale 1 through the real pipeline (tiling and colour
fix as configured, colour fix against that resized LR), with the suite's seed; bicubic is that resized LR itself.
Scores: :mod:`inference.eval_metrics` on uint8 RGB (PSNR/SSIM on BT.601 Y and RGB, no border crop unless
``crop_border``).

Outputs in the output folder: ``table.csv`` / ``table.md`` (rows = methods, columns = ``<set>/<metric>`` means),
``per_image.csv``, ``sr/<method>/<set>/<name>.png``, ``figures/<set>/<name>.png`` (LR | each method | HR, with the
primary method's scores) and ``worst.png`` (the figures of the ``worst`` pairs by ``worst_by``), plus
``summary.json``; all logged to one MLflow run, nested under the evaluated model's training run when it has one.
With ``workers > 1`` and more pairs than ``ray_min_pairs``, the pairs are scored by Ray tasks (each loads the model
once); otherwise in this process (one CPU is enough for the bundled set).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from infra.core.config import load_config
from infra.core.errors import UserError

from .eval_metrics import ALL, Metric, higher_is_better, load_metrics, score_image
from .eval_sets import EvalPair, EvalSet, load_set

log = logging.getLogger(__name__)

SUITE_DIR = Path(__file__).resolve().parents[1] / "configs" / "eval"


@dataclass
class SuiteSetConfig:
    """One test set of a suite: a prepared folder (``varsr eval-prepare``); ``bundled`` with no path is prepared on
    the fly into the output folder."""

    name: str = "bundled"
    path: str | None = None


@dataclass
class SuiteConfig:
    """A suite (configs/eval/*.yaml)."""

    name: str = "bundled"
    sets: list[SuiteSetConfig] = field(default_factory=lambda: [SuiteSetConfig()])
    metrics: list[str] = field(
        default_factory=lambda: [
            "psnr_y",
            "ssim_y",
            "psnr_rgb",
            "ssim_rgb",
            "niqe",
            "brisque",
            "lpips",
            "dists",
            "fid",
            "musiq",
            "maniqa",
            "clipiqa",
        ]
    )
    required_metrics: list[str] = field(default_factory=list)  # absent weights for these stop the run
    weights_dir: str | None = None  # learned metrics' weights (default $VARSR_EVAL_WEIGHTS or ~/.cache/varsr/...)
    crop_border: int = 0  # the research code's Table 1 crops none
    seed: int = 0
    worst: int = 4
    worst_by: str = "psnr_y"
    workers: int = 1
    ray_min_pairs: int = 64
    figure_side: int = 128  # figure panels (centre crops of this side)


def load_suite(source: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SuiteConfig:
    """A suite YAML (a path, or a name in configs/eval/) with ``key=value`` overrides."""
    cfg = load_config(SuiteConfig, source, overrides, preset_dir=SUITE_DIR)
    if cfg.worst_by not in ALL:
        raise UserError(f"worst_by {cfg.worst_by!r} is not a metric; known: {', '.join(ALL)}")
    if not cfg.sets:
        raise UserError(f"suite {cfg.name} lists no test sets")
    return cfg


@dataclass
class Method:
    """A row of the table: ``bicubic``, or a model (``source``: a checkpoint folder or an MLflow model URI)."""

    label: str
    source: str | None = None
    tracking_uri: str | None = None
    upscale_kwargs: dict[str, Any] = field(default_factory=dict)
    config_file: str | None = None
    overrides: list[str] = field(default_factory=list)

    @property
    def is_model(self) -> bool:
        return self.source is not None


@dataclass
class SuiteResult:
    """The table, the per-image rows, notices and where things went."""

    table: dict[str, dict[str, float]]
    rows: list[dict[str, Any]]
    notices: list[str]
    out_dir: Path
    run_id: str | None = None
    metrics: list[str] = field(default_factory=list)


def lr_to_hr_size(lr: Image.Image, hr: Image.Image) -> Image.Image:
    """The protocol's first step: the LR resized (PIL bicubic) to the HR size before inference."""
    return lr.convert("RGB").resize(hr.size, Image.Resampling.BICUBIC)


def load_method_pipeline(m: Method):
    """The pipeline of a model method (on CPU unless the inference config says otherwise)."""
    from .config import load_inference_config
    from .pipeline import VARSRPipeline

    try:
        config = load_inference_config(m.config_file, m.overrides)
        return VARSRPipeline.from_pretrained(m.source or "", config=config, tracking_uri=m.tracking_uri)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - unknown registered model / alias, unreadable checkpoint
        raise UserError(f"cannot load {m.label} from {m.source}: {type(e).__name__}: {e}") from None


def super_resolve(pipe, lr: Image.Image, hr: Image.Image, seed: int, **kw: Any) -> Image.Image:
    """SR of one pair by the protocol: LR resized to the HR size, then the pipeline at scale 1 with ``seed``."""
    kw = {k: v for k, v in kw.items() if k not in ("scale", "seed")}
    return pipe.upscale(lr_to_hr_size(lr, hr), scale=1.0, seed=seed, **kw)


def _png(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, format="PNG")
    return b.getvalue()


def score_pairs(
    methods: list[Method],
    pairs: list[tuple[str, EvalPair]],
    metric_names: list[str],
    weights_dir: str | None,
    crop_border: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Rows ``{set, image, method, <metric>: value, _png: SR bytes}`` for every pair and method (one worker's share).

    Metrics whose weights are absent were already reported by the caller; here they are simply left out."""
    metrics, _ = load_metrics(metric_names, weights_dir, crop_border)
    per_image = [m for m in metrics if m.fn is not None]
    pipes = {m.label: load_method_pipeline(m) for m in methods if m.is_model}
    rows = []
    for set_name, pair in pairs:
        hr, lr = pair.load()
        hr = hr.convert("RGB")
        hr_a = np.asarray(hr)
        for m in methods:
            if m.is_model:
                sr = super_resolve(pipes[m.label], lr, hr, seed, **m.upscale_kwargs)
            else:
                sr = lr_to_hr_size(lr, hr)
            try:
                scores = score_image(np.asarray(sr.convert("RGB")), hr_a, per_image)
            except ValueError as e:  # e.g. an image smaller than NIQE's 96-px patch
                raise UserError(f"{set_name}/{pair.name} ({m.label}): {e}") from None
            row: dict[str, Any] = {"set": set_name, "image": pair.name, "method": m.label, **scores, "_png": _png(sr)}
            rows.append(row)
    return rows


def _score_with_ray(
    methods: list[Method], pairs: list[tuple[str, EvalPair]], cfg: SuiteConfig, metric_names: list[str]
) -> list[dict[str, Any]]:
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):  # a running cluster: its workers must see the sets' folders
            ray.init(log_to_driver=False)
        else:
            ray.init(num_cpus=cfg.workers, include_dashboard=False, log_to_driver=False)
    task = ray.remote(num_cpus=1)(score_pairs)
    chunks = [pairs[i :: cfg.workers] for i in range(cfg.workers)]
    refs = [task.remote(methods, c, metric_names, cfg.weights_dir, cfg.crop_border, cfg.seed) for c in chunks if c]
    return [r for part in ray.get(refs) for r in part]


def _figure(
    lr: Image.Image, hr: Image.Image, panels: Sequence[tuple[str, Image.Image]], caption: str, side: int
) -> Image.Image:
    """LR (nearest) | each method | HR, centre crops of ``side`` px, labelled, with a caption line."""
    w, h = hr.size
    s = min(side, w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    items = [("LR", lr.convert("RGB").resize(hr.size, Image.Resampling.NEAREST)), *panels, ("HR", hr)]
    out = Image.new("RGB", (len(items) * s, s + 28), "white")
    draw = ImageDraw.Draw(out)
    for i, (label, im) in enumerate(items):
        out.paste(im.convert("RGB").crop(box), (i * s, 0))
        draw.text((i * s + 2, s + 2), label[: max(4, s // 7)], fill="black")
    draw.text((2, s + 15), caption[: len(items) * s // 6], fill="black")
    return out


def _fmt(v: float) -> str:
    return "nan" if v != v else ("inf" if math.isinf(v) else f"{v:.4f}")


def write_table(
    table: dict[str, dict[str, float]], columns: list[str], out: Path, higher: dict[str, bool], title: str
) -> tuple[Path, Path]:
    """``table.csv`` and ``table.md`` (arrows say which way is better; the best value of a column in bold)."""
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", *columns])
        for method, vals in table.items():
            w.writerow([method, *(_fmt(vals.get(c, float("nan"))) for c in columns)])
    best = {}
    for c in columns:
        col = [v[c] for v in table.values() if c in v and v[c] == v[c]]
        if col:
            best[c] = max(col) if higher[c.split("/", 1)[1]] else min(col)
    head = [f"{c} {'↑' if higher[c.split('/', 1)[1]] else '↓'}" for c in columns]
    lines = [f"**{title}**", "", "| method | " + " | ".join(head) + " |", "|---|" + "---:|" * len(columns)]
    for method, vals in table.items():
        cells = []
        for c in columns:
            v = vals.get(c, float("nan"))
            cells.append(f"**{_fmt(v)}**" if c in best and v == best[c] and len(table) > 1 else _fmt(v))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    return out / "table.csv", out / "table.md"


def _resolve_sets(cfg: SuiteConfig, out: Path) -> list[EvalSet]:
    from .eval_sets import prepare_bundled

    sets = []
    for s in cfg.sets:
        if s.path:
            es = load_set(s.path)
            es.name = s.name or es.name  # the suite names its columns
            sets.append(es)
        elif s.name == "bundled":
            d = out / "sets" / "bundled"
            sets.append(load_set(d) if (d / "manifest.json").is_file() else prepare_bundled(d, overwrite=True))
        else:
            raise UserError(f"suite set {s.name!r} has no path (prepare it with `varsr eval-prepare`)")
    return sets


def run_suite(
    cfg: SuiteConfig,
    methods: list[Method],
    out_dir: str | Path,
    log_to_mlflow: bool = True,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    parent_run_id: str | None = None,
) -> SuiteResult:
    """Score every set of ``cfg`` with every method; write the table, figures and (optionally) an MLflow run."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not methods:
        raise UserError("nothing to evaluate: give a model (--model-uri / --checkpoint) and/or --baseline bicubic")
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise UserError(f"method names must differ, got {labels}")
    metrics, notices = load_metrics(cfg.metrics, cfg.weights_dir, cfg.crop_border, cfg.required_metrics)
    names = [m.info.name for m in metrics]
    higher = {m.info.name: m.info.higher_better for m in metrics}
    sets = _resolve_sets(cfg, out)
    pairs = [(es.name, p) for es in sets for p in es.pairs]
    t0 = time.perf_counter()
    if cfg.workers > 1 and len(pairs) >= cfg.ray_min_pairs:
        rows = _score_with_ray(methods, pairs, cfg, names)
    else:
        rows = score_pairs(methods, pairs, names, cfg.weights_dir, cfg.crop_border, cfg.seed)
    seconds = time.perf_counter() - t0
    order = {(s, p.name): i for i, (s, p) in enumerate(pairs)}
    rows.sort(key=lambda r: (order[(r["set"], r["image"])], labels.index(r["method"])))
    for r in rows:
        d = out / "sr" / r["method"] / r["set"]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{r['image']}.png").write_bytes(r.pop("_png"))
    table = _aggregate(rows, metrics, sets, labels, out)
    set_names = [es.name for es in sets]
    columns = [f"{s}/{n}" for s in set_names for n in names]
    write_table(
        table,
        columns,
        out,
        higher,
        f"suite {cfg.name}: "
        + ", ".join(f"{es.name} ({len(es.pairs)} pairs, {es.manifest['protocol'].get('kind')})" for es in sets),
    )
    _write_per_image(rows, names, out)
    _figures(rows, methods, sets, cfg, out)
    res = SuiteResult(table, rows, notices, out, metrics=names)
    from infra.core.tracking import portable_ref

    meta = {
        "suite": asdict(cfg),
        "methods": [
            {
                "label": m.label,
                **m.upscale_kwargs,
                "source": m.source
                if not m.source or "://" in m.source or m.source.startswith("models:/")
                else portable_ref(m.source, out),
            }
            for m in methods
        ],
        "sets": {
            es.name: {"manifest_sha256": es.sha256, "protocol": es.manifest["protocol"], "pairs": len(es.pairs)}
            for es in sets
        },
        "metrics": {m.info.name: asdict(m.info) for m in metrics},
        "notices": notices,
        "seconds": seconds,
        "table": table,
    }
    from infra.core.redact import redact_config

    (out / "summary.json").write_text(
        json.dumps(redact_config(json.loads(json.dumps(meta, default=str))), indent=2) + "\n"
    )
    if log_to_mlflow:
        res.run_id = _log_run(res, cfg, methods, sets, out, tracking_uri, experiment, parent_run_id)
    return res


def _aggregate(
    rows: list[dict[str, Any]], metrics: list[Metric], sets: list[EvalSet], labels: list[str], out: Path
) -> dict[str, dict[str, float]]:
    """Per method: the mean of each per-image metric per set, and each set metric over the set (FID)."""
    table: dict[str, dict[str, float]] = {m: {} for m in labels}
    for es in sets:
        hr_arrays = None
        for label in labels:
            mine = [r for r in rows if r["set"] == es.name and r["method"] == label]
            for m in metrics:
                col = f"{es.name}/{m.info.name}"
                if m.fn is not None:
                    vals = [r[m.info.name] for r in mine]
                    table[label][col] = float(np.mean(vals)) if vals else float("nan")
                else:
                    if hr_arrays is None:
                        hr_arrays = [np.asarray(p.load()[0].convert("RGB")) for p in es.pairs]
                    srs = [
                        np.asarray(Image.open(out / "sr" / label / es.name / f"{p.name}.png").convert("RGB"))
                        for p in es.pairs
                    ]
                    table[label][col] = m.score_set(srs, hr_arrays)
    return table


def _write_per_image(rows: list[dict[str, Any]], names: list[str], out: Path) -> None:
    with open(out / "per_image.csv", "w", newline="") as f:
        w = csv.writer(f)
        per = [n for n in names if n in (rows[0] if rows else {})]
        w.writerow(["set", "image", "method", *per])
        for r in rows:
            w.writerow([r["set"], r["image"], r["method"], *(_fmt(r[n]) for n in per)])


def _figures(
    rows: list[dict[str, Any]], methods: list[Method], sets: list[EvalSet], cfg: SuiteConfig, out: Path
) -> None:
    """A figure per pair and ``worst.png``: the ``cfg.worst`` pairs where the primary (first model, else first)
    method scores worst by ``cfg.worst_by``."""
    primary = next((m.label for m in methods if m.is_model), methods[0].label)
    by_key = {(r["set"], r["image"], r["method"]): r for r in rows}
    scored = []
    for es in sets:
        (out / "figures" / es.name).mkdir(parents=True, exist_ok=True)
        for p in es.pairs:
            hr, lr = p.load()
            hr = hr.convert("RGB")
            panels = [(m.label, Image.open(out / "sr" / m.label / es.name / f"{p.name}.png")) for m in methods]
            r = by_key[(es.name, p.name, primary)]
            caption = f"{es.name}/{p.name} {primary}: " + " ".join(
                f"{k}={r[k]:.3g}" for k in ("psnr_y", "ssim_y", "niqe", "brisque", "lpips") if k in r
            )
            fig = _figure(lr, hr, panels, caption, cfg.figure_side)
            fig.save(out / "figures" / es.name / f"{p.name}.png")
            if cfg.worst_by in r:
                scored.append((r[cfg.worst_by], fig))
    if not scored or cfg.worst <= 0:
        return
    hb = higher_is_better(cfg.worst_by)
    worst = sorted(scored, key=lambda t: t[0] if hb else -t[0])[: cfg.worst]
    W = max(f.width for _, f in worst)
    grid = Image.new("RGB", (W, sum(f.height for _, f in worst)), "white")
    y = 0
    for _, f in worst:
        grid.paste(f, (0, y))
        y += f.height
    grid.save(out / "worst.png")


def _parent_run(methods: list[Method], tracking_uri: str) -> str | None:
    """The training run of the first registered model among the methods (its version's run), if any."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from .evaluate import _model_version

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    for m in methods:
        if m.source and m.source.startswith("models:/"):
            try:
                mv = _model_version(client, m.source)
            except MlflowException as e:
                log.info("no parent run for %s: %s", m.source, e)
                continue
            if mv is not None and mv.run_id:
                return str(mv.run_id)
    return None


def _key(k: str) -> str:
    """An MLflow param / metric name: characters MLflow refuses (``@`` of ``name@alias``) become ``_``."""
    import re

    return re.sub(r"[^\w\-. :/]", "_", k)


def _log_run(
    res: SuiteResult,
    cfg: SuiteConfig,
    methods: list[Method],
    sets: list[EvalSet],
    out: Path,
    tracking_uri: str | None,
    experiment: str | None,
    parent_run_id: str | None,
) -> str:
    from mlflow.entities import Metric as MlMetric
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from infra.core.redact import redact
    from infra.core.tracking import dataset_input, portable_ref, resolve_tracking_uri, run_name, start_run

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = parent_run_id or _parent_run(methods, uri)
    model = next((m.source for m in methods if m.is_model), None)
    label = (
        redact(model).removeprefix("models:/")
        if model and model.startswith("models:/")
        else (Path(model).name if model else "bicubic")
    )
    tags = {
        "varsr.stage": "eval-suite",
        "varsr.suite": cfg.name,
        **({"varsr.model_uri": redact(model)} if model and model.startswith("models:/") else {}),
    }
    run = start_run(
        uri,
        run_name("eval-suite", cfg.name, label),
        experiment=experiment,
        parent_run_id=parent,
        tags=tags,
        source="varsr eval --suite",
    )
    run_id, status = run.info.run_id, "FAILED"
    try:
        params = {
            "suite": cfg.name,
            "seed": cfg.seed,
            "metrics": ",".join(res.metrics),
            "crop_border": cfg.crop_border,
            "methods": ",".join(m.label for m in methods),
            **{
                f"method.{m.label}": (
                    m.source
                    if "://" in (m.source or "") or (m.source or "").startswith("models:/")
                    else portable_ref(m.source, out)
                )
                if m.source
                else "bicubic (PIL)"
                for m in methods
            },
            **{f"set.{es.name}": f"{es.manifest['protocol'].get('kind')} {len(es.pairs)} pairs" for es in sets},
        }
        client.log_batch(run_id, params=[Param(_key(k), redact(str(v))[:500]) for k, v in params.items()])
        client.log_inputs(
            run_id,
            datasets=[
                dataset_input(
                    portable_ref(str(es.root), out),
                    es.sha256,
                    name=es.name,
                    context="evaluation",
                    profile={"manifest_sha256": es.sha256, "pairs": len(es.pairs)},
                )
                for es in sets
            ],
        )
        now = int(time.time() * 1000)
        ms = [
            MlMetric(_key(f"{method}/{col}"), float(v), now, 0)
            for method, vals in res.table.items()
            for col, v in vals.items()
            if v == v and not math.isinf(v)
        ]
        for i in range(0, len(ms), 500):
            client.log_batch(run_id, metrics=ms[i : i + 500])
        for name in ("table.csv", "table.md", "per_image.csv", "summary.json", "worst.png"):
            if (out / name).is_file():
                client.log_artifact(run_id, str(out / name))
        client.log_artifacts(run_id, str(out / "figures"), artifact_path="figures")
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    return run_id
