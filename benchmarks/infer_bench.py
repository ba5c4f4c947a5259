"""Inference benchmark: pipeline latency/throughput at batch 1 and 8, and the served endpoint under concurrent clients.

Prints ONE JSON object: the config it ran, per-image latency p50/p90 and images/s per batch size, and requests/s with
p50/p90 latency through `mlflow models serve` (loopback only, bounded number of clients and requests).
Random weights of the chosen preset (speed does not depend on the weights).

    .venv/bin/python benchmarks/infer_bench.py                       # tiny preset on CPU
    .venv/bin/python benchmarks/infer_bench.py --preset d24 --device cuda --dtype bfloat16 --no-server
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

for _k, _v in {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_k, _v)


def pct(xs: list[float], q: float) -> float:
    """q-th percentile (linear interpolation) of xs."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lr_images(n: int, side: int):
    from PIL import Image
    from skimage import data

    src = Image.fromarray(data.astronaut())
    return [src.rotate(17 * i).resize((side, side), Image.BICUBIC) for i in range(n)]


def bench_pipeline(pipe, batch_sizes: list[int], iters: int, lr_side: int) -> dict:
    out = {}
    for b in batch_sizes:
        imgs = lr_images(b, lr_side)
        pipe.upscale(imgs, seed=0)  # warm-up
        sync(pipe.device)
        per_image, total_t = [], 0.0
        for i in range(iters):
            t0 = time.perf_counter()
            pipe.upscale(imgs, seed=i)
            sync(pipe.device)
            dt = time.perf_counter() - t0
            total_t += dt
            per_image.append(dt / b)
        out[f"batch_{b}"] = {"latency_per_image_s_p50": round(pct(per_image, 50), 5),
                             "latency_per_image_s_p90": round(pct(per_image, 90), 5),
                             "images_per_s": round(b * iters / total_t, 3), "iters": iters}
    return out


def bench_server(vqvae, varsr, work: Path, clients: int, n_requests: int, lr_side: int) -> dict:
    import requests

    from inference.registry import register_model
    from inference.serve import background_server
    from infra.core.net import free_port
    from model import save_pretrained

    ckpt = save_pretrained(work / "ckpt", vqvae, varsr)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    register_model(ckpt, "varsr-bench", tracking_uri=uri, validate_example=False)

    t_start = time.perf_counter()
    with background_server("models:/varsr-bench@champion", free_port(), tracking_uri=uri, cwd=ROOT,
                           log_path=work / "server.log", tmp_dir=work / "server-tmp") as url:
        startup = time.perf_counter() - t_start
        buf = io.BytesIO()
        lr_images(1, lr_side)[0].save(buf, format="PNG")
        b64 = base64.b64encode(buf.getvalue()).decode()
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b64]]}, "params": {"seed": 0}})
        headers = {"Content-Type": "application/json"}

        def one(_):
            t0 = time.perf_counter()
            r = requests.post(f"{url}/invocations", data=body, headers=headers, timeout=300)
            return time.perf_counter() - t0, r.status_code

        one(0)  # warm-up
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as ex:
            results = list(ex.map(one, range(n_requests)))
        wall = time.perf_counter() - t0
        lat = [r[0] for r in results]
        ok = sum(1 for r in results if r[1] == 200)
        return {"clients": clients, "requests": n_requests, "ok": ok, "requests_per_s": round(n_requests / wall, 3),
                "latency_s_p50": round(pct(lat, 50), 4), "latency_s_p90": round(pct(lat, 90), 4),
                "server_startup_s": round(startup, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--scale", type=int, default=4, help="LR side = model resolution / scale")
    ap.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients (bounded to 16)")
    ap.add_argument("--requests", type=int, default=16, help="requests through the endpoint (bounded to 256)")
    ap.add_argument("--no-server", action="store_true", help="skip the served-endpoint part")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = ap.parse_args(argv)

    import torch

    from inference.pipeline import VARSRPipeline
    from model import VARSRConfig, build

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mcfg = VARSRConfig.preset(args.preset)
    vqvae, varsr = build(mcfg)
    pipe = VARSRPipeline(vqvae, varsr, device=args.device, dtype=args.dtype)
    lr_side = pipe.image_size // args.scale
    result = {
        "benchmark": "varsr-inference",
        "config": {"preset": args.preset, **pipe.describe(), "lr_side": lr_side, "scale": args.scale,
                   "batch_sizes": [int(b) for b in args.batch_sizes.split(",")], "iters": args.iters,
                   "cfg": pipe.config.sampling.cfg, "top_k": pipe.config.sampling.top_k,
                   "color_fix": pipe.config.sampling.color_fix, "torch": torch.__version__,
                   "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                   "gpu": torch.cuda.get_device_name(pipe.device) if pipe.device.type == "cuda" else None,
                   "params_m": round(sum(p.numel() for p in varsr.parameters()) / 1e6, 2)},
    }
    result["pipeline"] = bench_pipeline(pipe, result["config"]["batch_sizes"], args.iters, lr_side)
    if not args.no_server:
        work = Path(tempfile.mkdtemp(prefix="varsr-bench-"))
        try:
            result["endpoint"] = bench_server(vqvae.cpu(), varsr.cpu(), work, max(1, min(args.clients, 16)),
                                              max(1, min(args.requests, 256)), lr_side)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
