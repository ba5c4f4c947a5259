"""Training throughput: tokens/s, samples/s, step-time breakdown (data, tokenise, forward, backward, optimizer) and
MFU for ZeRO 0/1/2, printed as ONE JSON object with the config it ran.

    python benchmarks/train_bench.py --preset tiny [--shards DIR] [--steps 8] [--workers 2] [--batch 8]

Without --shards it writes contract-format 64-px shards from bundled photos (skimage) to a temp dir.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _write_shards(d: Path, size: int, n_shards: int = 4) -> Path:
    import skimage.data as sd
    from PIL import Image

    imgs = [sd.astronaut(), sd.coffee(), sd.chelsea(), sd.rocket()]
    d.mkdir(parents=True, exist_ok=True)
    k = 0
    for s in range(n_shards):
        with tarfile.open(d / f"bench-{s:06d}.tar", "w") as t:
            for j in range(8):
                im = Image.fromarray(imgs[(s + j) % 4]).convert("RGB")
                w, h = im.size
                off = (j * 13) % max(1, min(w, h) - size * 4)
                hr = im.crop((off, off, off + size * 4, off + size * 4)).resize((size, size), Image.LANCZOS)
                lr = hr.resize((size // 4, size // 4), Image.BICUBIC)
                for name, data in ((f"s{k:05d}.hr.png", hr), (f"s{k:05d}.lr.png", lr)):
                    b = io.BytesIO()
                    data.save(b, format="PNG")
                    info = tarfile.TarInfo(name)
                    info.size = b.tell()
                    t.addfile(info, io.BytesIO(b.getvalue()))
                meta = json.dumps({"label": j % 2, "class_id": j % 4}).encode()
                info = tarfile.TarInfo(f"s{k:05d}.json")
                info.size = len(meta)
                t.addfile(info, io.BytesIO(meta))
                k += 1
    return d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--shards", default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--zero", default="0,1,2")
    args = ap.parse_args()

    from infra.core.config import load_config, to_dict
    from model import VARSRConfig
    from training.config import TrainConfig
    from training.deepspeed_engine import ensure_dist_env
    from training.steps import StepSetup, train_step
    from training.trainer import Trainer, peak_flops, step_flops

    ensure_dist_env()
    tmp = Path(tempfile.mkdtemp(prefix="train_bench_"))
    size = VARSRConfig.preset(args.preset).image_size
    shards = args.shards or str(_write_shards(tmp / "shards", size))
    results, cfg_used = {}, None
    for z in [int(x) for x in args.zero.split(",")]:
        cfg = load_config(
            TrainConfig,
            None,
            [
                "stage=isr",
                f"model.preset={args.preset}",
                f"output_dir={tmp / f'zero{z}'}",
                f"data.shards={shards}",
                f"data.batch_size={args.batch}",
                f"data.workers={args.workers}",
                f"zero_stage={z}",
                f"precision={args.precision}",
                f"max_steps={args.steps + args.warmup}",
                "tracking.enabled=false",
            ],
        )
        cfg_used = to_dict(cfg)
        tr = Trainer(cfg)
        tr.setup()
        batches = iter(tr.stream)
        tr.model.train()
        tot = dict(data=0.0, tokenise=0.0, forward=0.0, backward=0.0, optimizer=0.0)
        samples = tokens = 0
        wall = 0.0
        for i in range(args.steps + args.warmup):
            t0 = time.perf_counter()
            r = train_step(
                tr.engine, tr.vqvae, batches, StepSetup("isr", tr.device, cfg.precision), step=i, generator=tr.generator
            )
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                wall += dt
                samples += r.samples
                tokens += r.tokens
                for k, v in r.timings.items():
                    tot[k] += v
        flops = step_flops(tr.mcfg, tr.n_params, samples)
        results[f"zero{z}"] = {
            "tokens_per_s": tokens / wall,
            "samples_per_s": samples / wall,
            "step_time_s": wall / args.steps,
            "breakdown_s": {k: v / args.steps for k, v in tot.items()},
            "breakdown_frac": {k: v / wall for k, v in tot.items()},
            "data_frac": tot["data"] / wall,
            "mfu": flops / wall / peak_flops(tr.device),
            "trainable_params": tr.n_params,
            "seq_len": tr.mcfg.seq_len,
        }
        print(f"[bench] zero{z}: {samples / wall:.1f} samples/s, data {tot['data'] / wall:.1%}", file=sys.stderr)
    out = {
        "preset": args.preset,
        "device": str(tr.device),
        "peak_flops_assumed": peak_flops(tr.device),
        "steps_measured": args.steps,
        "warmup_steps": args.warmup,
        "loader_workers": args.workers,
        "results": results,
        "config": cfg_used,
        "data_under_10pct": all(v["data_frac"] < 0.10 for v in results.values()),
    }
    print(json.dumps(out, indent=1))
    from training.deepspeed_engine import shutdown

    shutdown()


if __name__ == "__main__":
    main()
