"""The Ray jobs: score -> select -> shard, and ``build`` which runs all three, resumably.

The output is a local folder or an object-store prefix (``s3://bucket/shards``), laid out as the shard contract
says (``shards/format.py``): config.yaml, scores.parquet, selection.parquet, rejected.parquet, the shards with their
stats, manifest.json (deterministic; written last, the commit point) and build_summary.json (timings).

Shard tasks are plain Ray tasks: each writes its tar and stats straight to the output URL from whichever node runs
it and returns the stats to the driver, which writes the manifest from what the tasks returned (never from files on
its own disk). A task lost with its node is retried elsewhere; its writes are idempotent and atomic, so the result
equals an uninterrupted run. A re-run keeps every published shard whose size and sha256 match its stats.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from infra.core import storage
from infra.core.config import build as build_typed
from infra.core.config import to_dict
from infra.core.log import summary as show

from .config import PIPELINE_VERSION, BuildConfig, load_build_config, save_config
from .materialise import STAGES, write_shard
from .progress import Progress, format_table
from .scorers import iqa_status
from .selection import select as select_rows
from .shards import (
    REJECTED,
    SCORES,
    SELECTION,
    Counts,
    Manifest,
    ShardEntry,
    ShardStats,
    read_manifest,
    read_stats,
    remove_stale_temporaries,
    shard_name,
    stats_name,
)
from .shards import write_manifest as publish_manifest
from .sources import list_sources

log = logging.getLogger(__name__)
META_KEY = b"varsr"


# ----------------------------------------------------------------------------------------------------------- ray
def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Use an already initialised Ray, else connect to `address` or start a local one."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict = {"include_dashboard": False, "log_to_driver": False}
    if address:
        kwargs["address"] = address
        runtime_env: dict = {"env_vars": storage.forwarded_env()}  # workers reach the same object store
        if address.startswith("ray://"):
            root = Path(__file__).resolve().parent.parent  # the client's code: the pipeline and its bottom layer
            runtime_env["py_modules"] = [str(root / "data_pipeline"), str(root / "infra")]
        kwargs["runtime_env"] = runtime_env
    else:  # a local runtime for this job: bound to loopback, like every service the platform starts by default
        kwargs.update(address="local", _node_ip_address="127.0.0.1")  # never a cluster left running here
        if num_cpus:
            kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)


@contextlib.contextmanager
def _data_settings():
    """Ray Data settings for our jobs, restored afterwards (the DataContext is process-global): ordered output,
    our own progress display, and no per-operator resource reservation. With a single map operator the
    reservation holds back half the CPUs until the first task has finished (measured: the second of two
    workers started ~1 s late)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    keys = ("enable_progress_bars", "print_on_execution_start", "op_resource_reservation_enabled")
    saved = {k: getattr(ctx, k) for k in keys}
    saved_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.op_resource_reservation_enabled = False
    try:
        yield ctx
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)
        ctx.execution_options.preserve_order = saved_order


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _cfg(config) -> BuildConfig:
    if isinstance(config, BuildConfig):
        return config
    return load_build_config(config)


def _atomic_parquet(df: pd.DataFrame | pa.Table, url: str, meta: dict | None = None) -> None:
    t = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
    if meta is not None:
        t = t.replace_schema_metadata({**(t.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    buf = io.BytesIO()
    pq.write_table(t, buf)
    storage.write_bytes(url, buf.getvalue())


def _parquet_meta(url: str) -> dict | None:
    if not storage.exists(url):
        return None
    with storage.open_url(url) as f:
        md = pq.read_schema(f).metadata or {}
    return json.loads(md[META_KEY]) if META_KEY in md else None


def read_table(url: str) -> pd.DataFrame:
    """A Parquet table of the pipeline from a local path or URL (streamed through the storage layer)."""
    with storage.open_url(url) as f:
        return pq.read_table(f).to_pandas()


def _prepare_output(output: str) -> str:
    """The output folder / prefix, created (local) or checked (object storage: its bucket must exist)."""
    out = storage.absolute(output)
    storage.makedirs(out)
    return out


# --------------------------------------------------------------------------------------------------------- score
def score(input, output: str, config=None, ray_address: str | None = None) -> dict:
    """Decode + score every input into `{output}/scores.parquet`. Skipped when an identical table exists."""
    import ray.data

    from .scoring import ScoreWorker, scores_fingerprint

    cfg = _cfg(config)
    out = _prepare_output(output)
    items = list_sources(input, cfg.source)
    if not any(not it.status for it in items):  # nothing to read: say what was met instead of building nothing
        met = Counter(it.reason for it in items)
        raise ValueError(
            f"no input files found in {input!r} (extensions {cfg.source.extensions})"
            + (
                f"; met {len(items)} other entries: " + ", ".join(f"{n} {r}" for r, n in sorted(met.items()))
                if items
                else ""
            )
        )
    uris = [it.uri for it in items]
    # inputs rejected while listing carry their reason into the fingerprint: a FIFO replaced by a file is new input
    fp = scores_fingerprint([f"{it.uri}\t{it.status}:{it.reason}" if it.status else it.uri for it in items], cfg)
    path = storage.join(out, SCORES)
    if (_parquet_meta(path) or {}).get("fingerprint") == fp:
        log.info("score: %s is up to date (%d inputs), reusing it", path, len(uris))
        return {"inputs": len(uris), "scores": path, "reused": True, "seconds": 0.0}
    for name, st in iqa_status(cfg.score.iqa, cfg.score.weights_dir).items():
        if st != "ok":
            log.warning("IQA scorer '%s' %s", name, st)
    ensure_ray(ray_address or cfg.ray.address, cfg.ray.num_cpus)
    import ray

    with _data_settings():
        n_workers = cfg.score.num_workers or _cluster_cpus()
        gpus = ray.cluster_resources().get("GPU", 0)
        use_gpu = (
            cfg.score.use_gpu
            if cfg.score.use_gpu is not None
            else (gpus > 0 and any(st == "ok" for st in iqa_status(cfg.score.iqa, cfg.score.weights_dir).values()))
        )
        bs = cfg.score.batch_size
        ds = ray.data.from_items(
            [
                {
                    "uri": it.uri,
                    "meta": json.dumps(it.meta, sort_keys=True),
                    "status": it.status,
                    "reason": it.reason,
                    "error": it.error,
                }
                for it in items
            ],
            override_num_blocks=max(1, min(len(items) // bs + 1, 4 * n_workers * 8)),
        )
        ds = ds.map_batches(
            ScoreWorker,
            fn_constructor_kwargs={"cfg_json": cfg.to_json(), "device": "cuda" if use_gpu else "cpu"},
            batch_size=bs,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=min(n_workers, -(-len(items) // bs)), max_size=n_workers),
            num_cpus=1,
            num_gpus=1 if use_gpu else 0,
            # an actor lost with its node is restarted and its batches re-run elsewhere
            max_restarts=-1,
            max_task_retries=-1,
        )
        prog = Progress(len(items), "score")
        tmp_dir = storage.local_path(out) if storage.is_local(out) else None
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".parquet", dir=tmp_dir)
        os.close(fd)
        counts: Counter[str]
        writer, counts = None, Counter()
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if writer is None:
                schema = batch.schema.with_metadata({META_KEY: json.dumps({"fingerprint": fp}).encode()})
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_table(batch.cast(writer.schema))
            counts.update(batch.column("status").to_pylist())
            prog.update(batch.num_rows)
        writer.close()
        storage.put_file(tmp, path)
    secs = prog.close()
    return {"inputs": len(uris), "scores": path, "status": dict(counts), "seconds": secs, "reused": False}


# -------------------------------------------------------------------------------------------------------- select
def select(scores_path: str, output: str, config=None) -> dict:
    """Apply the selection rules to a scores table -> `selection.parquet` + `rejected.parquet` (select stage)."""
    cfg = _cfg(config)
    out = _prepare_output(output)
    df = read_table(storage.absolute(scores_path))
    sel, rej = select_rows(df, cfg)
    _atomic_parquet(sel, storage.join(out, SELECTION), {"config_hash": cfg.config_hash()})
    _atomic_parquet(rej, storage.join(out, REJECTED))
    return {
        "inputs": len(df),
        "selected": len(sel),
        "negatives": int(sel.label.sum()),
        "classes": int(sel.class_id.nunique()),
        "rejected": int((rej.status == "rejected").sum()),
        "failed": int((rej.status == "failed").sum()),
        "selection": storage.join(out, SELECTION),
    }


# --------------------------------------------------------------------------------------------------------- shard
def samples_per_shard(cfg: BuildConfig) -> int:
    """Shard size from the count target and the byte target (estimated bytes per sample, so the plan is fixed
    before any pixel is encoded and shards can be written in parallel)."""
    c, s = cfg.shard.crop_size, cfg.degradation.scale
    variants = max(1, cfg.shard.lr_variants)  # HR-only shards (lr_variants=0): one sample per HR, no LR bytes
    lr_bytes = (c // s) ** 2 * 3 * 0.8 if cfg.shard.lr_variants else 0.0
    est = variants * (c * c * 3 * 0.6 + lr_bytes + 3000)
    return max(1, min(cfg.shard.max_samples_per_shard // variants or 1, int(cfg.shard.max_shard_bytes // est)))


def plan_shards(sel: pd.DataFrame, cfg: BuildConfig) -> list[list[dict]]:
    """Seeded permutation of the selection (URI order), cut into shards of `samples_per_shard` images."""
    sel = sel.sort_values("uri", kind="stable").reset_index(drop=True)
    order = np.random.default_rng(cfg.seed).permutation(len(sel))
    rows = sel.iloc[order].to_dict(orient="records")
    k = samples_per_shard(cfg)
    return [rows[i : i + k] for i in range(0, len(rows), k)]


def _jsonable(rows: list[dict]) -> str:
    def conv(v):
        if isinstance(v, (np.integer,)):
            return int(v)
        if isinstance(v, (np.floating,)):
            return None if math.isnan(v) else float(v)
        if isinstance(v, bytes):
            return None
        return v

    return json.dumps([{k: conv(v) for k, v in r.items() if k != "embedding"} for r in rows])


def _shard_task(index: int, rows_json: str, cfg_json: str, out_dir: str) -> dict:
    """One Ray task: materialise and publish one shard; its stats come back as the task's result."""
    return write_shard(index, json.loads(rows_json), BuildConfig.from_json(cfg_json), out_dir)


def _complete(out: str, prefix: str, index: int, cfg: BuildConfig) -> ShardStats | None:
    """The stats of shard ``index`` when it is published and intact (size and sha256 equal its stats), else None."""
    tar_url, st_url = storage.join(out, shard_name(prefix, index)), storage.join(out, stats_name(prefix, index))
    if not (storage.exists(tar_url) and storage.exists(st_url)):
        return None
    st = read_stats(st_url)
    if st.config_hash != cfg.config_hash():
        raise RuntimeError(
            f"{out} holds {shard_name(prefix, index)} from another config "
            f"({st.config_hash} != {cfg.config_hash()}); use a new output folder"
        )
    if storage.size(tar_url) != st.bytes or storage.sha256(tar_url) != st.sha256:
        log.warning("shard: %s does not match its stats (size/sha256); writing it again", tar_url)
        return None
    return st


def _run_shard_tasks(plan: list[list[dict]], todo: list[int], cfg: BuildConfig, out: str, on_done) -> None:
    """Submit one Ray task per shard to write, at most one per cluster CPU in flight, until all have returned."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=5)(_shard_task)  # retried when the node running it dies
    cfg_json = cfg.to_json()
    cfg_ref = ray.put(cfg_json)
    width = cfg.shard.num_workers or _cluster_cpus()
    pending: dict = {}
    queue = list(todo)
    while queue or pending:
        while queue and len(pending) < width:
            i = queue.pop(0)
            pending[task.remote(i, _jsonable(plan[i]), cfg_ref, out)] = i
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            pending.pop(ref)
            on_done(ray.get(ref))


def shard(selection_path: str, output: str, config=None, ray_address: str | None = None) -> dict:
    """Materialise the selection into shards; intact published shards are kept (resume), the rest are written."""
    cfg = _cfg(config)
    out = _prepare_output(output)
    sel = read_table(storage.absolute(selection_path))
    sel_rej = storage.join(storage.parent(storage.absolute(selection_path)), REJECTED)
    out_rej = storage.join(out, REJECTED)
    if storage.exists(sel_rej) and not storage.exists(out_rej):
        storage.write_bytes(out_rej, storage.read_bytes(sel_rej))  # the accounting travels with the shards
    plan = plan_shards(sel, cfg)
    prefix = cfg.shard.prefix
    removed = remove_stale_temporaries(out)
    if removed:
        log.info("shard: removed %d temporary files of an interrupted run", removed)
    stats: dict[int, ShardStats] = {}
    todo = []
    for i in range(len(plan)):
        st = _complete(out, prefix, i, cfg)
        if st is None:
            todo.append(i)
        else:
            stats[i] = st
    done = len(stats)
    timings: dict[str, float] = {s: 0.0 for s in STAGES} | {f"cpu_{s}": 0.0 for s in STAGES}
    acc = {"cpu": 0.0}
    spans: list[tuple[int, float, float]] = []
    n_images = sum(len(plan[i]) for i in todo)
    t0 = time.perf_counter()
    if todo:
        log.info("shard: %d shards planned, %d already complete, %d to write", len(plan), done, len(todo))
        ensure_ray(ray_address or cfg.ray.address, cfg.ray.num_cpus)
        prog = Progress(n_images, "shard")

        def on_done(r: dict) -> None:
            st = build_typed(ShardStats, r["stats"])
            stats[st.index] = st
            acc["cpu"] += r["cpu_seconds"]
            spans.append((r["pid"], *r["span"]))
            for k, v in r["timings"].items():
                timings[k] = timings.get(k, 0.0) + v
            prog.update(st.images + len(st.failed))

        _run_shard_tasks(plan, todo, cfg, out, on_done)
        prog.close()
    secs = time.perf_counter() - t0
    manifest = write_manifest(out, cfg, [stats[i] for i in range(len(plan))])
    return {
        "shards": len(plan),
        "written": len(todo),
        "skipped": done,
        "images_written": n_images,
        "seconds": secs,
        "stage_seconds": {s: timings[s] for s in STAGES},
        "stage_cpu_seconds": {s: timings[f"cpu_{s}"] for s in STAGES},
        "cpu_seconds": acc["cpu"],
        "task_spans": spans,
        "manifest": to_dict(manifest),
    }


# ------------------------------------------------------------------------------------------------------ manifest
def write_manifest(out: str, cfg: BuildConfig, stats: list[ShardStats]) -> Manifest:
    """The final rejected table, then manifest.json (deterministic; the commit point) from the shards' stats."""
    rej_url = storage.join(out, REJECTED)
    rej = read_table(rej_url) if storage.exists(rej_url) else None
    rej = (
        rej[rej.stage != "shard"]
        if rej is not None
        else pd.DataFrame(columns=["uri", "stage", "status", "reason", "error"])
    )
    shard_fail = [
        {"uri": f.uri, "stage": "shard", "status": "failed", "reason": f.reason, "error": f.error}
        for s in stats
        for f in s.failed
    ]
    if shard_fail:
        rej = pd.concat([rej, pd.DataFrame(shard_fail)], ignore_index=True)
    rej = rej.sort_values(["uri", "stage"], kind="stable").reset_index(drop=True)
    _atomic_parquet(rej, rej_url)
    labels: Counter[int]
    classes: Counter[int]
    labels, classes = Counter(), Counter()
    for s in stats:
        labels.update({int(k): v for k, v in s.labels.items()})
        classes.update({int(k): v for k, v in s.classes.items()})
    kept = sum(s.images for s in stats)
    counts = Counts(
        inputs=kept + len(rej),
        kept=kept,
        rejected=int((rej.status == "rejected").sum()),
        failed=int((rej.status == "failed").sum()),
        rejected_by_reason=dict(sorted(Counter(rej[rej.status == "rejected"].reason).items())),
        failed_by_reason=dict(sorted(Counter(rej[rej.status == "failed"].reason).items())),
        samples=sum(s.samples for s in stats),
        labels={str(k): v for k, v in sorted(labels.items())},
        classes=len(classes),
    )
    manifest = Manifest(
        pipeline_version=PIPELINE_VERSION,
        config_hash=cfg.config_hash(),
        config=cfg.content_dict(),
        counts=counts,
        hr_size=cfg.shard.crop_size,
        lr_size=cfg.shard.crop_size // cfg.degradation.scale,
        scale=cfg.degradation.scale,
        lr_variants=cfg.shard.lr_variants,
        shards=[ShardEntry(name=s.shard, samples=s.samples, bytes=s.bytes, sha256=s.sha256) for s in stats],
    )
    if storage.exists(storage.join(out, "manifest.json")):  # a re-run over intact shards keeps their token cache
        previous, _ = read_manifest(out)
        if previous.tokens is not None and previous.shards == manifest.shards:
            manifest.tokens = previous.tokens
    publish_manifest(out, manifest)
    return manifest


# --------------------------------------------------------------------------------------------------------- build
def build(
    input,
    output: str,
    config=None,
    ray_address: str | None = None,
    overrides: list[str] | None = None,
    print_summary: bool = True,
) -> dict:
    """score -> select -> shard in one go; re-running after a crash finishes the missing shards only."""
    t0 = time.perf_counter()
    cfg = load_build_config(config, overrides or ())
    out = _prepare_output(output)
    save_config(cfg, storage.join(out, "config.yaml"))
    sc = score(input, out, cfg, ray_address)
    select(storage.join(out, SCORES), out, cfg)
    sh = shard(storage.join(out, SELECTION), out, cfg, ray_address)
    secs = time.perf_counter() - t0
    m = sh["manifest"]["counts"]
    summary = {
        "output": out,
        "inputs": m["inputs"],
        "kept": m["kept"],
        "rejected": m["rejected"],
        "failed": m["failed"],
        "rejected_by_reason": m["rejected_by_reason"],
        "failed_by_reason": m["failed_by_reason"],
        "samples": m["samples"],
        "negatives": int(m["labels"].get("1", 0)),
        "classes": m["classes"],
        "shards": len(sh["manifest"]["shards"]),
        "shards_written": sh["written"],
        "shards_skipped": sh["skipped"],
        "bytes": sum(s["bytes"] for s in sh["manifest"]["shards"]),
        "seconds": round(secs, 3),
        "images_per_s": round(m["inputs"] / secs, 2) if secs > 0 else None,
        "shard_images_per_s": round(sh["images_written"] / sh["seconds"], 2) if sh["seconds"] > 0 else None,
        "score_seconds": round(sc["seconds"], 3),
        "shard_stage_ms_per_image": {
            k: round(1000 * v / max(sh["images_written"], 1), 2) for k, v in sh["stage_seconds"].items()
        },
    }
    storage.write_text(storage.join(out, "build_summary.json"), json.dumps(summary, indent=1, sort_keys=True))
    if print_summary:
        show(summary_table(summary))
    return summary


def summary_table(s: dict) -> str:
    rows = [("inputs", s["inputs"]), ("kept", s["kept"])]
    rows += [(f"rejected: {k}", v) for k, v in s["rejected_by_reason"].items()]
    rows += [(f"failed: {k}", v) for k, v in s["failed_by_reason"].items()]
    rows += [
        ("samples (label 1)", f"{s['samples']} ({s['negatives']})"),
        ("classes", s["classes"]),
        ("shards (written/skipped)", f"{s['shards']} ({s['shards_written']}/{s['shards_skipped']})"),
        ("bytes", s["bytes"]),
        ("seconds", s["seconds"]),
        ("images/s", s["images_per_s"]),
    ]
    return format_table(rows, f"varsr data build -> {s['output']}")
