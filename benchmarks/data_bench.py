"""Throughput of the full per-sample materialisation (read -> decode -> crop 512 -> degrade -> PNG encode -> tar
write) through the real Ray shard job, on 1 and on 2 cores; prints ONE JSON object.

    python benchmarks/data_bench.py [--images 192] [--crop 512] [--preset varsr-mild] [--per-shard 48] [--op-reps 15]

Sources are real photos bundled with scikit-image / scikit-learn (short side >= crop), reused round-robin.
Wall time includes Ray scheduling; per-stage wall and CPU ms per sample are measured inside the workers. On a shared
machine (other jobs running) wall-clock rates and wall-clock scaling understate the pipeline: the CPU-time figures
(`samples_per_cpu_s`, `stage_cpu_ms_per_sample`) are then the reliable per-core throughput.

`operators_cpu_ms_per_call`: the degradation's operators timed in this process, each new backend against the
earlier one in interleaved rounds (torch-semantics resize vs cv2.resize on the first-order resize of a 512^2 image;
the tensor JPEG vs libjpeg at 512^2, 333^2, 128^2; the reader's resize-back 128 -> 512 vs PIL bicubic; one whole
`degrade()` of a 512^2 crop per backend combination), with `ratio_over_earlier` of the medians.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _op_timings(reps: int) -> dict:
    """Per-call CPU ms of the degradation operators, new against earlier backend, interleaved in this process
    (each round runs every variant once, so load changes hit all variants alike); median and min over rounds."""
    import cv2
    import numpy as np
    import skimage.data
    from PIL import Image

    from data_pipeline.config import DegradationConfig
    from data_pipeline.degrade import degrade, resize_back
    from data_pipeline.degrade.jpeg import diff_jpeg, lib_jpeg
    from data_pipeline.degrade.resize import opencv_resize, torch_resize

    cv2.setNumThreads(1)
    hr = np.ascontiguousarray(skimage.data.astronaut())  # 512 x 512
    x = hr.astype(np.float32) / np.float32(255.0)
    lr = np.ascontiguousarray(hr[::4, ::4])
    cases: dict[str, object] = {}
    for mode in ("area", "bilinear", "bicubic"):
        for s in (0.3, 0.65, 1.25):  # first-order resize of 512^2
            size = (int(512 * s), int(512 * s))
            cases[f"resize_{mode}_x{s}/torch"] = lambda m=mode, s=s: torch_resize(x, m, scale_factor=s)
            cases[f"resize_{mode}_x{s}/opencv"] = lambda m=mode, z=size: opencv_resize(x, m, z)
    for side in (512, 333, 128):
        xs = np.ascontiguousarray(x[:side, :side])
        cases[f"jpeg_{side}/diffjpeg"] = lambda a=xs: diff_jpeg(a, 77.7)
        cases[f"jpeg_{side}/libjpeg"] = lambda a=xs: lib_jpeg(a, 78)
    for mode in ("area", "bilinear", "bicubic"):
        cases[f"resize_back_128_to_512/torch_{mode}"] = lambda m=mode: resize_back(lr, (512, 512), m)
    cases["resize_back_128_to_512/pil_bicubic"] = lambda: np.asarray(
        Image.fromarray(lr).resize((512, 512), Image.Resampling.BICUBIC)
    )
    cfgs = {
        f"{r}+{j}": DegradationConfig(resize_backend=r, jpeg_backend=j)
        for r, j in (("torch", "diffjpeg"), ("opencv", "libjpeg"), ("torch", "libjpeg"), ("opencv", "diffjpeg"))
    }
    for name, cfg in cfgs.items():
        cases[f"degrade_512/{name}"] = lambda c=cfg: [degrade(hr, c, seed) for seed in range(8)]
    times: dict[str, list[float]] = {k: [] for k in cases}
    for f in cases.values():  # warm-up: imports, caches
        f()
    for _ in range(reps):
        for k, f in cases.items():
            t0 = time.process_time()
            f()
            times[k].append(1000 * (time.process_time() - t0) / (8 if k.startswith("degrade_") else 1))
    out: dict[str, dict] = {}
    for k, v in times.items():
        op, variant = k.split("/")
        out.setdefault(op, {})[variant] = {"median_ms": round(statistics.median(v), 3), "min_ms": round(min(v), 3)}
    earlier = ("opencv", "libjpeg", "pil_bicubic", "opencv+libjpeg")
    for d in out.values():
        med = {k: v["median_ms"] for k, v in d.items()}
        old = next((med[k] for k in earlier if k in med), None)
        ratios = {k: round(v / old, 2) for k, v in med.items() if k not in earlier and old}
        if ratios:
            d["ratio_over_earlier"] = ratios if len(ratios) > 1 else next(iter(ratios.values()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--crop", type=int, default=512)
    ap.add_argument("--preset", default="varsr-mild")
    ap.add_argument("--per-shard", type=int, default=48)
    ap.add_argument("--png-level", type=int, default=1)
    ap.add_argument("--cores", default="1,2")
    ap.add_argument("--op-reps", type=int, default=15, help="rounds of the per-operator timings (0: skip)")
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    import pandas as pd
    import ray

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from data_pipeline.config import load_build_config
    from data_pipeline.decode import probe
    from data_pipeline.jobs import shard
    from data_pipeline.sample_corpus import write_sample_corpus

    load_before = round(os.getloadavg()[0], 2)
    tmp = Path(tempfile.mkdtemp(prefix="data_bench_"))
    try:
        info = write_sample_corpus(tmp / "corpus", with_bad_files=False)
        sources = []
        for name, v in info.items():
            data = (tmp / "corpus" / name).read_bytes()
            p = probe(data)
            w, h = p.info["width"], p.info["height"]
            if min(w, h) >= args.crop and "duplicate" not in v["kind"]:
                sources.append(
                    {
                        "uri": str(tmp / "corpus" / name),
                        "sha256": hashlib.sha256(data).hexdigest(),
                        "width": w,
                        "height": h,
                    }
                )
        rows = [
            {**sources[i % len(sources)], "label": 0, "class_id": 0, "scores_json": "{}", "meta": "{}"}
            for i in range(args.images)
        ]
        # distinct row URIs are not needed; the shard plan permutes rows, every row is one full sample of work
        sel_path = tmp / "selection.parquet"
        pd.DataFrame(rows).to_parquet(sel_path)
        cores = [int(c) for c in args.cores.split(",")]
        ray.init(
            address="local",
            num_cpus=max(cores),
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=200 * 1024**2,
        )
        results = {}
        base = [
            f"shard.crop_size={args.crop}",
            f"shard.max_samples_per_shard={args.per_shard}",
            f"shard.hr_png_compression={args.png_level}",
        ]
        warm = load_build_config(args.preset, base + [f"shard.num_workers={max(cores)}"])
        pd.DataFrame(rows[: 2 * max(cores)]).to_parquet(tmp / "warm.parquet")
        shard(str(tmp / "warm.parquet"), str(tmp / "warm"), warm)  # start Ray workers, import modules
        for n in cores:
            cfg = load_build_config(args.preset, base + [f"shard.num_workers={n}"])
            out = tmp / f"out{n}"
            t0 = time.perf_counter()
            r = shard(str(sel_path), str(out), cfg)
            wall = time.perf_counter() - t0
            imgs = r["images_written"]
            results[n] = {
                "images": imgs,
                "wall_s": round(wall, 3),
                "samples_per_s": round(imgs / wall, 2),
                "samples_per_s_per_core": round(imgs / wall / n, 2),
                "stage_wall_ms_per_sample": {k: round(1000 * v / imgs, 2) for k, v in r["stage_seconds"].items()},
                "stage_cpu_ms_per_sample": {k: round(1000 * v / imgs, 2) for k, v in r["stage_cpu_seconds"].items()},
                "worker_ms_per_sample": round(1000 * sum(r["stage_seconds"].values()) / imgs, 2),
                "worker_cpu_ms_per_sample": round(1000 * r["cpu_seconds"] / imgs, 2),
                "samples_per_cpu_s": round(imgs / r["cpu_seconds"], 2),
                "load_avg_1min_after": round(os.getloadavg()[0], 2),
                "worker_busy_fraction": round(sum(b - a for _, a, b in r["task_spans"]) / (n * wall), 3),
                "shards": r["shards"],
                "bytes": sum(s["bytes"] for s in r["manifest"]["shards"]),
            }
        ray.shutdown()
        ops = _op_timings(args.op_reps) if args.op_reps > 0 else None
        out = {
            "benchmark": "data_pipeline materialise (decode -> crop -> degrade -> encode -> write) via Ray",
            "config": {
                "images": args.images,
                "crop": args.crop,
                "scale": 4,
                "preset": args.preset,
                "hr_png_level": args.png_level,
                "samples_per_shard": args.per_shard,
                "source_images": [Path(s["uri"]).name for s in sources],
            },
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "load_avg_1min_before": load_before,
                "note": "shared 2-core dev machine; other jobs may run concurrently",
            },
            "results": {f"{n}_core{'s' if n > 1 else ''}": v for n, v in results.items()},
        }
        if ops is not None:
            out["operators_cpu_ms_per_call"] = ops
        if 1 in results and 2 in results:
            eff = results[2]["samples_per_s"] / (2 * results[1]["samples_per_s"])
            out["scaling_efficiency_2_cores"] = round(eff, 3)
            per_core = results[1]["samples_per_s"]
            out["cores_for_4M_images_per_hour"] = int(-(-4_000_000 / 3600 // (per_core * min(eff, 1.0))))
            cpu_rate = results[1]["samples_per_cpu_s"]
            out["cpu_time_scaling_efficiency_2_cores"] = round(results[2]["samples_per_cpu_s"] / cpu_rate, 3)
            out["cores_for_4M_images_per_hour_from_cpu_time"] = int(-(-4_000_000 / 3600 // cpu_rate))
        print(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
