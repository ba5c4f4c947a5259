"""Inference benchmark: pipeline latency/throughput at batch 1 and 8, and the served endpoint under concurrent clients.

Prints ONE JSON object: the config it ran; per-image latency p50/p90 and images/s per pipeline batch size; and, through
`varsr serve` (`mlflow models serve`, loopback only), requests/s, p50/p90 latency and the server's CPU time per
request at 1, 4 and 8 concurrent clients, plus the single-request latency, for servers of one registered model running
side by side:
- ``one_per_call``: today's path, one request per pipeline call (``serving.max_batch_images=1``; the model lock
  serialises generation while the model keeps sampling state on its modules), MLflow's default request threads;
- ``batched``: the config's ``serving`` section (request batching; on a CPU one crop per generate() call);
- ``batched_generate_N``: the same, with generate() batched N crops at a time across requests (what the auto setting
  does on a GPU; fixed shape, so short batches are padded);
- ``batched_N_processes``: the batched server with N uvicorn worker processes (``varsr serve --workers N``) of one
  torch thread each: on a CPU, request handling (JSON, base64, PNG) runs in parallel instead of under one GIL.
Every round runs each client count against each server, rotating which goes first, so all see the same machine load;
ratios are each server against ``one_per_call``. Random weights of the chosen preset (speed does not depend on them).
Each client sends its requests back to back (closed loop), cycling through 16 different images, all with one seed.

    .venv/bin/python benchmarks/infer_bench.py                       # tiny preset on CPU
    .venv/bin/python benchmarks/infer_bench.py --preset d24 --device cuda --dtype bfloat16 --no-server
"""

from __future__ import annotations

import argparse
import base64
import contextlib
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
        out[f"batch_{b}"] = {
            "latency_per_image_s_p50": round(pct(per_image, 50), 5),
            "latency_per_image_s_p90": round(pct(per_image, 90), 5),
            "images_per_s": round(b * iters / total_t, 3),
            "iters": iters,
        }
    return out


def request_body(img, seed: int) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b64]]}, "params": {"seed": seed}})


def load_clients(url: str, bodies: list[str], clients: int, per_client: int) -> tuple[list[float], float, int]:
    """``clients`` threads, each sending ``per_client`` requests back to back (client i cycles through the bodies
    from its own offset, so concurrent requests carry different images). Returns latencies, wall time, 200s."""
    import requests

    headers = {"Content-Type": "application/json"}

    def client(i: int):
        out = []
        with requests.Session() as s:
            for k in range(per_client):
                body = bodies[(i + k * clients) % len(bodies)]
                t0 = time.perf_counter()
                r = s.post(f"{url}/invocations", data=body, headers=headers, timeout=300)
                out.append((time.perf_counter() - t0, r.status_code))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as ex:
        results = [x for xs in ex.map(client, range(clients)) for x in xs]
    wall = time.perf_counter() - t0
    return [r[0] for r in results], wall, sum(1 for r in results if r[1] == 200)


def summarize(lat: list[float], wall: float, ok: int, clients: int, cpu_s: float) -> dict:
    return {
        "clients": clients,
        "requests": len(lat),
        "ok": ok,
        "requests_per_s": round(len(lat) / wall, 3),
        "latency_s_p50": round(pct(lat, 50), 4),
        "latency_s_p90": round(pct(lat, 90), 4),
        "server_cpu_ms_per_request": round(1000 * cpu_s / max(1, len(lat)), 2),
    }


def server_pids(port: int) -> list[int]:
    """The uvicorn process serving ``port`` (from its command line) and its worker processes, if any."""
    main = None
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(b"uvicorn" in c for c in cmd[:2]) and str(port).encode() in cmd:
                main = int(d.name)
                break
    if main is None:
        return []
    pids = [main]
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                st = (d / "stat").read_text()
            except OSError:
                continue
            if int(st[st.rindex(")") + 2 :].split()[1]) == main:  # ppid
                pids.append(int(d.name))
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of ``pids`` (all their threads) so far; 0 for a pid /proc cannot read."""
    total = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def bench_server(
    vqvae,
    varsr,
    work: Path,
    clients: list[int],
    per_client: int,
    rounds: int,
    lr_side: int,
    seed: int,
    register_set: list[str],
    variants: dict[str, list[str]],
    workers: dict[str, int] | None = None,
) -> dict:
    """One registered model, one `varsr serve` per variant (``--set`` overrides; ``workers``: uvicorn processes per
    variant, default 1), all up at once; every round runs each client count against each variant, rotating which
    goes first, so all see the same machine load. The first variant is the reference of the ratios."""
    from inference.config import load_inference_config
    from inference.registry import register_model
    from inference.serve import background_server
    from infra.core.net import free_port
    from model import save_pretrained

    ckpt = save_pretrained(work / "ckpt", vqvae, varsr)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    register_model(
        ckpt,
        "varsr-bench",
        tracking_uri=uri,
        validate_example=False,
        config=load_inference_config(overrides=register_set),
    )
    bodies = [request_body(img, seed) for img in lr_images(16, lr_side)]
    names = list(variants)
    lat = {(n, c): [] for n in names for c in clients}
    wall = {(n, c): 0.0 for n in names for c in clients}
    cpu = {(n, c): 0.0 for n in names for c in clients}
    ok = {(n, c): 0 for n in names for c in clients}
    startup, pids = {}, {}
    with contextlib.ExitStack() as stack:
        urls = {}
        for n in names:
            t0 = time.perf_counter()
            port = free_port()
            urls[n] = stack.enter_context(
                background_server(
                    "models:/varsr-bench@champion",
                    port,
                    tracking_uri=uri,
                    cwd=ROOT,
                    overrides=variants[n],
                    log_path=work / f"server-{n}.log",
                    tmp_dir=work / f"server-tmp-{n}",
                    workers=(workers or {}).get(n, 1),
                )
            )
            startup[n] = round(time.perf_counter() - t0, 2)
            pids[n] = server_pids(port)
        for n in names:  # warm-up: first requests pay lazy initialisation
            load_clients(urls[n], bodies, max(clients), 1)
        for r in range(rounds):
            for c in clients:
                for n in names[r % len(names) :] + names[: r % len(names)]:
                    c0 = cpu_seconds(pids[n])
                    la, w, k = load_clients(urls[n], bodies, c, per_client)
                    cpu[(n, c)] += cpu_seconds(pids[n]) - c0
                    lat[(n, c)] += la
                    wall[(n, c)] += w
                    ok[(n, c)] += k
    out: dict = {}
    for n in names:
        out[n] = {f"clients_{c}": summarize(lat[(n, c)], wall[(n, c)], ok[(n, c)], c, cpu[(n, c)]) for c in clients}
        out[n]["single_request_latency_s_p50"] = round(pct(lat[(n, min(clients))], 50), 4)
        out[n]["server_startup_s"] = startup[n]
    base, top = names[0], f"clients_{max(clients)}"
    out["ratios"], out["targets"] = {}, {}
    for n in names[1:]:
        ratios = {}
        for c in clients:
            b, m = out[base][f"clients_{c}"], out[n][f"clients_{c}"]
            ratios[f"requests_per_s_clients_{c}"] = round(m["requests_per_s"] / b["requests_per_s"], 3)
            ratios[f"latency_p90_clients_{c}"] = round(m["latency_s_p90"] / b["latency_s_p90"], 3)
        ratios[f"p90_{top}_over_its_single_request"] = round(
            out[n][top]["latency_s_p90"] / out[n]["single_request_latency_s_p50"], 3
        )
        ratios[f"p90_{top}_over_{base}_single_request"] = round(
            out[n][top]["latency_s_p90"] / out[base]["single_request_latency_s_p50"], 3
        )
        out["ratios"][f"{n}/{base}"] = ratios
        out["targets"][n] = {
            f"requests_per_s_{top}_at_least_2x_{base}": ratios[f"requests_per_s_{top}"] >= 2.0,
            f"p90_{top}_within_2x_single_request": ratios[f"p90_{top}_over_its_single_request"] <= 2.0,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--scale", type=int, default=4, help="LR side = model resolution / scale")
    ap.add_argument("--clients", default="1,4,8", help="concurrent HTTP client counts (each bounded to 16)")
    ap.add_argument("--requests-per-client", type=int, default=4, help="requests per client per round (<= 32)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all client counts (<= 10)")
    ap.add_argument("--seed", type=int, default=0, help="request seed (-1: random; requests batch by params)")
    ap.add_argument(
        "--server-threads",
        type=int,
        default=None,
        help="torch threads of the served model (runtime.cpu_threads; default: torch's)",
    )
    ap.add_argument(
        "--tile-batch",
        type=int,
        default=8,
        help="tiling.batch_size of the served model: the generate() shape of a batch",
    )
    ap.add_argument(
        "--batched-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="serving.* overrides of the batched server (default: the config's serving section)",
    )
    ap.add_argument(
        "--generate-batch-variant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also serve a variant whose generate() calls batch --tile-batch crops across requests "
        "(what the auto setting does on a GPU)",
    )
    ap.add_argument(
        "--workers-variant",
        type=int,
        default=2,
        help="also serve the batched variant with N uvicorn processes of one torch thread (<= 1: no)",
    )
    ap.add_argument(
        "--no-baseline",
        action="store_true",
        help="serve only the batched variant (no one-request-per-call server to compare with)",
    )
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
        "config": {
            "preset": args.preset,
            **pipe.describe(),
            "lr_side": lr_side,
            "scale": args.scale,
            "batch_sizes": [int(b) for b in args.batch_sizes.split(",")],
            "iters": args.iters,
            "cfg": pipe.config.sampling.cfg,
            "top_k": pipe.config.sampling.top_k,
            "color_fix": pipe.config.sampling.color_fix,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(pipe.device) if pipe.device.type == "cuda" else None,
            "params_m": round(sum(p.numel() for p in varsr.parameters()) / 1e6, 2),
        },
    }
    result["pipeline"] = bench_pipeline(pipe, result["config"]["batch_sizes"], args.iters, lr_side)
    if not args.no_server:
        clients = sorted({max(1, min(int(c), 16)) for c in args.clients.split(",")})
        register_set = [f"tiling.batch_size={args.tile_batch}"]
        if args.server_threads:
            register_set.append(f"runtime.cpu_threads={args.server_threads}")
        # today's behaviour: one request per pipeline call (the model lock serialises them), MLflow's thread pool
        variants = (
            {} if args.no_baseline else {"one_per_call": ["serving.max_batch_images=1", "serving.request_threads=0"]}
        )
        variants["batched"] = list(args.batched_set)
        if args.generate_batch_variant:  # the same batching with generate() batched across requests
            variants[f"batched_generate_{args.tile_batch}"] = list(args.batched_set) + [
                f"serving.generate_batch={args.tile_batch}"
            ]
        workers = {}
        if args.workers_variant > 1:  # N server processes, one torch thread each, request batching as configured
            name = f"batched_{args.workers_variant}_processes"
            variants[name] = list(args.batched_set) + ["runtime.cpu_threads=1"]
            workers[name] = args.workers_variant
        per_client, rounds = max(1, min(args.requests_per_client, 32)), max(1, min(args.rounds, 10))
        from inference.config import load_inference_config
        from infra.core.config import to_dict

        result["config"]["endpoint"] = {
            "clients": clients,
            "requests_per_client": per_client,
            "rounds": rounds,
            "seed": args.seed,
            "registered_set": register_set,
            "variants": variants,
            "server_processes": workers,
            "serving_defaults": to_dict(load_inference_config().serving),
        }
        work = Path(tempfile.mkdtemp(prefix="varsr-bench-"))
        try:
            result["endpoint"] = bench_server(
                vqvae.cpu(),
                varsr.cpu(),
                work,
                clients,
                per_client,
                rounds,
                lr_side,
                args.seed,
                register_set,
                variants,
                workers,
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
