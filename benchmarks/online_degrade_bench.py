"""On-the-fly degradation in the training reader (data_pipeline/degrade/online.py): CPU cost per sample and the data
share of a tiny-preset training step; prints ONE JSON object.

    python benchmarks/online_degrade_bench.py [--preset varsr-mild] [--steps 16] [--batch 8] [--workers 2] [--shards 24]

* ``cpu_path.samples_per_cpu_s``: decode + degrade + resize-back of one sample in one thread (process CPU time), i.e.
  samples/s per core, for the online path and for the stored-LR path it replaces.
* ``step``: the tiny preset's training step (tokenise + forward + backward + AdamW, the model package's
  ``compute_loss``) fed by a :class:`BatchStream` with ``--workers`` loader processes: ``data_share`` = time the step
  loop waits for the next batch / wall time, for stored LR and for the online draw. On 2 cores the loader workers
  and the step share the cores, so the share also includes their contention.
The GPU path (degradation inside the step) is not implemented: the CPU path is the one measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _cpu_rate(shards, preset: str, n: int) -> dict:
    import cv2
    import torch

    from data_pipeline.degrade.online import OnlineDegradation
    from data_pipeline.shards import decode_sample, iter_tar, resolve_shards

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    raws = [r for u in resolve_shards(str(shards)).urls for r in iter_tar(u)]
    online = OnlineDegradation.from_preset(preset)
    out = {}
    for name, kw in (("stored_lr", {}), ("online", {"online": online, "seed": 1})):
        c0, t0 = time.process_time(), time.perf_counter()
        for i in range(n):
            decode_sample(raws[i % len(raws)], 64, True, "bicubic", **kw, **({"epoch": i} if kw else {}))
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        out[name] = {
            "samples": n,
            "samples_per_cpu_s": round(n / cpu, 1),
            "samples_per_wall_s": round(n / wall, 1),
            "cpu_ms_per_sample": round(1000 * cpu / n, 2),
        }
    return out


def _step_share(shards, preset: str, steps: int, batch: int, workers: int) -> dict:
    import torch

    from data_pipeline.shards import BatchStream, resolve_shards
    from model import VARSRConfig, build
    from model.losses import compute_loss

    torch.manual_seed(0)
    vqvae, varsr = build(VARSRConfig.preset("tiny"))
    varsr.train()
    opt = torch.optim.AdamW(varsr.parameters(), lr=1e-4)
    out = {}
    for name, degrade in (("stored_lr", ""), ("online", preset)):
        stream = BatchStream(
            resolve_shards(str(shards)),
            size=64,
            want_lr=True,
            batch_size=batch,
            workers=workers,
            seed=1,
            rank=0,
            world=1,
            shuffle_buffer=16,
            lr_mode="bicubic",
            degrade=degrade,
        )
        it = iter(stream)
        next(it)  # loader start-up (worker processes) is not a step's cost
        wait = step_s = 0.0
        t_all = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            b = next(it)
            t1 = time.perf_counter()
            res = compute_loss(vqvae, varsr, b["hr"], b["lr"], b["label"])
            res.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            wait += t1 - t0
            step_s += time.perf_counter() - t1
        wall = time.perf_counter() - t_all
        out[name] = {
            "steps": steps,
            "data_wait_s": round(wait, 3),
            "compute_s": round(step_s, 3),
            "data_share": round(wait / wall, 4),
            "samples_per_s": round(steps * batch / wall, 1),
        }
        del it
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="varsr-mild")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--shards", type=int, default=24, help="shards of 8 samples: one epoch outlasts the steps")
    args = ap.parse_args()
    from train_bench import _write_shards

    with tempfile.TemporaryDirectory() as d:
        shards = _write_shards(Path(d) / "shards", 64, n_shards=args.shards)  # 8 samples per shard
        cpu = _cpu_rate(shards, args.preset, args.samples)
        share = _step_share(shards, args.preset, args.steps, args.batch, args.workers)
    print(
        json.dumps(
            {
                "bench": "online_degrade",
                "preset": args.preset,
                "model_preset": "tiny",
                "image_px": 64,
                "batch": args.batch,
                "workers": args.workers,
                "cpus": os.cpu_count(),
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "python": platform.python_version(),
                "cpu_path": cpu,
                "step": share,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
