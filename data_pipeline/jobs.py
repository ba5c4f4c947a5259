"""The Ray jobs: score -> select -> shard, and `build` which runs all three, resumably.

Output folder layout:
  config.yaml            resolved config            scores.parquet     one row per input (score step)
  selection.parquet      selected images + labels   rejected.parquet   every input not in a shard, with reason
  {prefix}-000000.tar    shards                     {prefix}-000000.stats.json   per-shard stats
  manifest.json          config, counts, shards (deterministic)   build_summary.json  timings (not deterministic)
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .config import PIPELINE_VERSION, BuildConfig, load_build_config, save_config
from .materialise import STAGES, write_shard
from .progress import Progress, format_table
from .scorers import iqa_status
from .selection import select as select_rows
from .shards import exists, is_local, local_path, read_json, remove_stale_temporaries, shard_name, stats_name
from .sources import list_sources

log = logging.getLogger("data_pipeline")
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
        if address.startswith("ray://"):
            kwargs["runtime_env"] = {"py_modules": [str(Path(__file__).resolve().parent)]}
    elif num_cpus:
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


def _atomic_parquet(df: pd.DataFrame | pa.Table, path: str, meta: dict | None = None) -> None:
    t = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
    if meta is not None:
        t = t.replace_schema_metadata({**(t.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    tmp = f"{os.path.dirname(path)}/.tmp-{os.path.basename(path)}"
    pq.write_table(t, tmp)
    os.replace(tmp, path)


def _parquet_meta(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    md = pq.read_schema(path).metadata or {}
    return json.loads(md[META_KEY]) if META_KEY in md else None


def _prepare_output(output: str) -> str:
    if not is_local(output):
        raise ValueError("outputs must be a local folder for now (inputs may be any fsspec URL); "
                         "sync the finished folder to object storage")
    p = local_path(output)
    os.makedirs(p, exist_ok=True)
    return p


# --------------------------------------------------------------------------------------------------------- score
def score(input, output: str, config=None, ray_address: str | None = None) -> dict:
    """Decode + score every input into `{output}/scores.parquet`. Skipped when an identical table exists."""
    from .scoring import ScoreWorker, scores_fingerprint
    import ray.data
    cfg = _cfg(config)
    out = _prepare_output(output)
    items = list_sources(input, cfg.source)
    if not items:
        raise ValueError(f"no input files found in {input!r} (extensions {cfg.source.extensions})")
    uris = [it.uri for it in items]
    fp = scores_fingerprint(uris, cfg)
    path = f"{out}/scores.parquet"
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
        use_gpu = cfg.score.use_gpu if cfg.score.use_gpu is not None else (
            gpus > 0 and any(st == "ok" for st in iqa_status(cfg.score.iqa, cfg.score.weights_dir).values()))
        bs = cfg.score.batch_size
        ds = ray.data.from_items([{"uri": it.uri, "meta": json.dumps(it.meta, sort_keys=True)} for it in items],
                                 override_num_blocks=max(1, min(len(items) // bs + 1, 4 * n_workers * 8)))
        ds = ds.map_batches(ScoreWorker, fn_constructor_kwargs={"cfg_json": cfg.to_json(),
                                                                "device": "cuda" if use_gpu else "cpu"},
                            batch_size=bs, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(min_size=min(n_workers, -(-len(items) // bs)),
                                                               max_size=n_workers),
                            num_cpus=1, num_gpus=1 if use_gpu else 0)
        prog = Progress(len(items), "score")
        tmp = f"{out}/.tmp-scores.parquet"
        writer, counts = None, Counter()
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if writer is None:
                schema = batch.schema.with_metadata({META_KEY: json.dumps({"fingerprint": fp}).encode()})
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_table(batch.cast(writer.schema))
            counts.update(batch.column("status").to_pylist())
            prog.update(batch.num_rows)
        writer.close()
        os.replace(tmp, path)
    secs = prog.close()
    return {"inputs": len(uris), "scores": path, "status": dict(counts), "seconds": secs, "reused": False}


# -------------------------------------------------------------------------------------------------------- select
def select(scores_path: str, output: str, config=None) -> dict:
    """Apply the selection rules to a scores table -> `selection.parquet` + `rejected.parquet` (select stage)."""
    cfg = _cfg(config)
    out = _prepare_output(output)
    df = pd.read_parquet(scores_path)
    sel, rej = select_rows(df, cfg)
    _atomic_parquet(sel, f"{out}/selection.parquet", {"config_hash": cfg.config_hash()})
    _atomic_parquet(rej, f"{out}/rejected.parquet")
    return {"inputs": len(df), "selected": len(sel), "negatives": int(sel.label.sum()),
            "classes": int(sel.class_id.nunique()), "rejected": int((rej.status == "rejected").sum()),
            "failed": int((rej.status == "failed").sum()), "selection": f"{out}/selection.parquet"}


# --------------------------------------------------------------------------------------------------------- shard
def samples_per_shard(cfg: BuildConfig) -> int:
    """Shard size from the count target and the byte target (estimated bytes per sample, so the plan is fixed
    before any pixel is encoded and shards can be written in parallel)."""
    c, s = cfg.shard.crop_size, cfg.degradation.scale
    est = cfg.shard.lr_variants * (c * c * 3 * 0.6 + (c // s) ** 2 * 3 * 0.8 + 3000)
    return max(1, min(cfg.shard.max_samples_per_shard // cfg.shard.lr_variants or 1,
                      int(cfg.shard.max_shard_bytes // est)))


def plan_shards(sel: pd.DataFrame, cfg: BuildConfig) -> list[list[dict]]:
    """Seeded permutation of the selection (URI order), cut into shards of `samples_per_shard` images."""
    sel = sel.sort_values("uri", kind="stable").reset_index(drop=True)
    order = np.random.default_rng(cfg.seed).permutation(len(sel))
    rows = sel.iloc[order].to_dict(orient="records")
    k = samples_per_shard(cfg)
    return [rows[i:i + k] for i in range(0, len(rows), k)]


def _shard_batch(batch: dict, cfg_json: str, out_dir: str) -> dict:
    cfg = BuildConfig.from_json(cfg_json)
    results = []
    for idx, rows in zip(batch["index"], batch["rows"]):
        r = write_shard(int(idx), json.loads(rows), cfg, out_dir)
        results.append(json.dumps(r))
    return {"index": np.asarray(batch["index"], np.int64), "result": np.array(results, dtype=object)}


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


def shard(selection_path: str, output: str, config=None, ray_address: str | None = None) -> dict:
    """Materialise the selection into shards; completed shards (final name present) are skipped (resume)."""
    import ray.data
    cfg = _cfg(config)
    out = _prepare_output(output)
    sel = pd.read_parquet(selection_path)
    sel_rej = os.path.join(os.path.dirname(os.path.abspath(selection_path)), "rejected.parquet")
    if os.path.exists(sel_rej) and not os.path.exists(f"{out}/rejected.parquet"):
        import shutil
        shutil.copyfile(sel_rej, f"{out}/rejected.parquet")   # the accounting travels with the shards
    plan = plan_shards(sel, cfg)
    prefix = cfg.shard.prefix
    removed = remove_stale_temporaries(out)
    if removed:
        log.info("shard: removed %d temporary files of an interrupted run", removed)
    todo, done = [], 0
    for i, rows in enumerate(plan):
        if exists(f"{out}/{shard_name(prefix, i)}") and exists(f"{out}/{stats_name(prefix, i)}"):
            st = read_json(f"{out}/{stats_name(prefix, i)}")
            if st.get("config_hash") != cfg.config_hash():
                raise RuntimeError(f"{out} holds {shard_name(prefix, i)} from another config "
                                   f"({st.get('config_hash')} != {cfg.config_hash()}); use a new output folder")
            done += 1
        else:
            todo.append(i)
    timings: dict[str, float] = {s: 0.0 for s in STAGES} | {f"cpu_{s}": 0.0 for s in STAGES}
    cpu_seconds = 0.0
    spans: list[tuple[int, float, float]] = []
    n_images = sum(len(plan[i]) for i in todo)
    t0 = time.perf_counter()
    if todo:
        log.info("shard: %d shards planned, %d already complete, %d to write", len(plan), done, len(todo))
        ensure_ray(ray_address or cfg.ray.address, cfg.ray.num_cpus)
        with _data_settings():
            n_workers = cfg.shard.num_workers or _cluster_cpus()
            items = [{"index": i, "rows": _jsonable(plan[i])} for i in todo]
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            ds = ds.map_batches(_shard_batch, fn_kwargs={"cfg_json": cfg.to_json(), "out_dir": out},
                                batch_size=1, batch_format="numpy", num_cpus=1,
                                compute=ray.data.TaskPoolStrategy(size=n_workers))
            prog = Progress(n_images, "shard")
            for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                for res in batch["result"]:
                    r = json.loads(res)
                    cpu_seconds += r["cpu_seconds"]
                    spans.append((r["pid"], *r["span"]))
                    for k, v in r["timings"].items():
                        timings[k] = timings.get(k, 0.0) + v
                    prog.update(r["stats"]["images"] + len(r["stats"]["failed"]))
            prog.close()
    secs = time.perf_counter() - t0
    manifest = write_manifest(out, cfg, len(plan))
    return {"shards": len(plan), "written": len(todo), "skipped": done, "images_written": n_images,
            "seconds": secs, "stage_seconds": {s: timings[s] for s in STAGES},
            "stage_cpu_seconds": {s: timings[f"cpu_{s}"] for s in STAGES}, "cpu_seconds": cpu_seconds,
            "task_spans": spans, "manifest": manifest}


# ------------------------------------------------------------------------------------------------------ manifest
def write_manifest(out: str, cfg: BuildConfig, n_shards: int) -> dict:
    """manifest.json (deterministic) + the final rejected table, from the per-shard stats and earlier tables."""
    from .shards import write_json_atomic
    prefix = cfg.shard.prefix
    stats = [read_json(f"{out}/{stats_name(prefix, i)}") for i in range(n_shards)]
    rej = pd.read_parquet(f"{out}/rejected.parquet") if os.path.exists(f"{out}/rejected.parquet") else None
    rej = rej[rej.stage != "shard"] if rej is not None else pd.DataFrame(
        columns=["uri", "stage", "status", "reason", "error"])
    shard_fail = [{"uri": f["uri"], "stage": "shard", "status": "failed", "reason": f["reason"], "error": f["error"]}
                  for s in stats for f in s["failed"]]
    if shard_fail:
        rej = pd.concat([rej, pd.DataFrame(shard_fail)], ignore_index=True)
    rej = rej.sort_values(["uri", "stage"], kind="stable").reset_index(drop=True)
    _atomic_parquet(rej, f"{out}/rejected.parquet")
    labels, classes = Counter(), Counter()
    for s in stats:
        labels.update({int(k): v for k, v in s["labels"].items()})
        classes.update({int(k): v for k, v in s["classes"].items()})
    kept = sum(s["images"] for s in stats)
    n_inputs = kept + len(rej)
    manifest = {
        "pipeline_version": PIPELINE_VERSION, "config_hash": cfg.config_hash(),
        "config": cfg.content_dict(),
        "counts": {
            "inputs": n_inputs, "kept": kept, "rejected": int((rej.status == "rejected").sum()),
            "failed": int((rej.status == "failed").sum()),
            "rejected_by_reason": dict(sorted(Counter(rej[rej.status == "rejected"].reason).items())),
            "failed_by_reason": dict(sorted(Counter(rej[rej.status == "failed"].reason).items())),
            "samples": sum(s["samples"] for s in stats),
            "labels": {str(k): v for k, v in sorted(labels.items())}, "classes": len(classes),
        },
        "hr_size": cfg.shard.crop_size, "lr_size": cfg.shard.crop_size // cfg.degradation.scale,
        "scale": cfg.degradation.scale, "lr_variants": cfg.shard.lr_variants,
        "shards": [{"name": s["shard"], "samples": s["samples"], "bytes": s["bytes"], "sha256": s["sha256"]}
                   for s in stats],
    }
    write_json_atomic(f"{out}/manifest.json", manifest)
    return manifest


# --------------------------------------------------------------------------------------------------------- build
def build(input, output: str, config=None, ray_address: str | None = None, overrides: list[str] | None = None,
          print_summary: bool = True) -> dict:
    """score -> select -> shard in one go; re-running after a crash finishes the missing shards only."""
    t0 = time.perf_counter()
    cfg = load_build_config(config, overrides or ())
    out = _prepare_output(output)
    save_config(cfg, f"{out}/config.yaml")
    sc = score(input, out, cfg, ray_address)
    se = select(f"{out}/scores.parquet", out, cfg)
    sh = shard(f"{out}/selection.parquet", out, cfg, ray_address)
    secs = time.perf_counter() - t0
    m = sh["manifest"]["counts"]
    summary = {
        "output": out, "inputs": m["inputs"], "kept": m["kept"], "rejected": m["rejected"], "failed": m["failed"],
        "rejected_by_reason": m["rejected_by_reason"], "failed_by_reason": m["failed_by_reason"],
        "samples": m["samples"], "negatives": int(m["labels"].get("1", 0)), "classes": m["classes"],
        "shards": len(sh["manifest"]["shards"]), "shards_written": sh["written"], "shards_skipped": sh["skipped"],
        "bytes": sum(s["bytes"] for s in sh["manifest"]["shards"]), "seconds": round(secs, 3),
        "images_per_s": round(m["inputs"] / secs, 2) if secs > 0 else None,
        "shard_images_per_s": round(sh["images_written"] / sh["seconds"], 2) if sh["seconds"] > 0 else None,
        "score_seconds": round(sc["seconds"], 3), "shard_stage_ms_per_image": {
            k: round(1000 * v / max(sh["images_written"], 1), 2) for k, v in sh["stage_seconds"].items()},
    }
    from .shards import write_json_atomic
    write_json_atomic(f"{out}/build_summary.json", summary)
    if print_summary:
        print(summary_table(summary))
    return summary


def summary_table(s: dict) -> str:
    rows = [("inputs", s["inputs"]), ("kept", s["kept"])]
    rows += [(f"rejected: {k}", v) for k, v in s["rejected_by_reason"].items()]
    rows += [(f"failed: {k}", v) for k, v in s["failed_by_reason"].items()]
    rows += [("samples (label 1)", f"{s['samples']} ({s['negatives']})"), ("classes", s["classes"]),
             ("shards (written/skipped)", f"{s['shards']} ({s['shards_written']}/{s['shards_skipped']})"),
             ("bytes", s["bytes"]), ("seconds", s["seconds"]), ("images/s", s["images_per_s"])]
    return format_table(rows, f"varsr data build -> {s['output']}")
