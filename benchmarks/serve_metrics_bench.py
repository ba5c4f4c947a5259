"""Do the endpoint's Prometheus counters agree with what its clients saw? (issue 32, "Measured"; inference/README.md,
"Metrics and health").

One `varsr serve` of the tiny preset (random weights, registered in a SQLite registry in a temporary folder) on
127.0.0.1 only, with ``--workers`` processes (prometheus_client's multiprocess mode). After /health/ready answers 200,
``/metrics`` is scraped once; then ``--clients`` threads each send ``--requests`` requests back to back (every
``--bad-every``-th one a malformed body the guard refuses with 400), while another thread scrapes ``/metrics`` every
0.2 s; then ``/metrics`` is scraped again. Bounded: at most ``--clients x --requests`` requests (<= 400).

Prints ONE JSON object: the config; what the clients saw (requests by status, latency p50/p90/p99 and mean); what
the server counted between the two scrapes (requests by status, the latency histogram's count, mean and the bucket
each quantile falls in); whether they agree (same count per status; each quantile's bucket the same as the
clients' or the next one up or down, "within a bucket"; the client's latency includes the loopback and
JSON framing the server does not see); the largest ``requests_in_flight`` seen during the load; and the resident
memory of each worker process idle (after warm-up) and after the load, from ``varsr_process_resident_memory_bytes``.

    .venv/bin/python benchmarks/serve_metrics_bench.py --workers 2 --clients 4 --requests 15
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
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

for _k, _v in {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}.items():
    os.environ.setdefault(_k, _v)

NAME = "varsr-bench-metrics"


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{url}/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def total(samples, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def by_label(samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, ls), v in samples.items():
        if n == name:
            key = dict(ls)[label]
            out[key] = out.get(key, 0.0) + v
    return out


def bucket_index(bounds: list[float], x: float) -> int:
    """Index of the histogram bucket (upper bounds ``bounds``, +Inf last) that holds ``x``."""
    return next(i for i, b in enumerate(bounds) if x <= b)


def server_quantile_bucket(bounds: list[float], cumulative: list[float], q: float) -> int:
    """The bucket in which the q-quantile of a histogram (cumulative counts per bound) lies."""
    rank = q / 100.0 * cumulative[-1]
    return next(i for i, c in enumerate(cumulative) if c >= rank and c > 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=15, help="requests per client")
    ap.add_argument("--bad-every", type=int, default=8, help="every n-th request of a client is malformed (0: none)")
    args = ap.parse_args(argv)
    if args.clients * args.requests > 400:
        raise SystemExit("at most 400 requests in all")

    import numpy as np
    import requests
    import torch
    from PIL import Image

    from inference.config import load_inference_config
    from inference.registry import register_model
    from inference.serve import background_server
    from inference.serve_metrics import LATENCY_BUCKETS
    from infra.core.net import free_port
    from model import VARSRConfig, build, save_pretrained

    work = Path(tempfile.mkdtemp(prefix="varsr-metrics-bench-"))
    try:
        torch.manual_seed(0)
        vqvae, varsr = build(VARSRConfig.preset("tiny"))
        ckpt = save_pretrained(work / "ckpt", vqvae, varsr)
        uri = f"sqlite:///{work / 'mlflow.db'}"
        register_model(
            ckpt,
            NAME,
            alias="champion",
            tracking_uri=uri,
            config=load_inference_config(overrides=["runtime.cpu_threads=1"]),
            validate_example=False,
        )

        def body(i: int) -> str:
            img = Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return json.dumps(
                {
                    "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(buf.getvalue()).decode()]]},
                    "params": {"seed": 0},
                }
            )

        good = [body(i) for i in range(8)]
        with background_server(
            f"models:/{NAME}@champion",
            free_port(),
            tracking_uri=uri,
            workers=args.workers,
            log_path=work / "server.log",
            tmp_dir=work / "tmp",
            ready_timeout=300,
        ) as url:
            deadline = time.monotonic() + 300
            while requests.get(f"{url}/health/ready", timeout=10).status_code != 200:
                if time.monotonic() > deadline:
                    raise SystemExit("server not ready")
                time.sleep(0.2)
            before = scrape(url)
            idle_rss = by_label(before, "varsr_process_resident_memory_bytes", "pid")

            seen: list[tuple[int, float]] = []
            lock = threading.Lock()
            done = threading.Event()
            in_flight_max = [0.0]

            def client(c: int):
                s = requests.Session()
                for i in range(args.requests):
                    bad = args.bad_every > 0 and (i + 1) % args.bad_every == 0
                    data = '{"dataframe_split": [' if bad else good[(c + i) % len(good)]
                    t0 = time.perf_counter()
                    r = s.post(
                        f"{url}/invocations", data=data, headers={"Content-Type": "application/json"}, timeout=120
                    )
                    dt = time.perf_counter() - t0
                    with lock:
                        seen.append((r.status_code, dt))

            def watch():
                while not done.is_set():
                    in_flight_max[0] = max(in_flight_max[0], total(scrape(url), "varsr_requests_in_flight"))
                    time.sleep(0.2)

            watcher = threading.Thread(target=watch)
            watcher.start()
            t0 = time.perf_counter()
            threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            done.set()
            watcher.join()
            after = scrape(url)
            load_rss = by_label(after, "varsr_process_resident_memory_bytes", "pid")

        client_codes = Counter(str(code) for code, _ in seen)
        d_codes = {
            k: v - by_label(before, "varsr_requests_total", "code").get(k, 0.0)
            for k, v in by_label(after, "varsr_requests_total", "code").items()
        }
        server_codes = {k: int(v) for k, v in d_codes.items() if v}
        lat = [dt for _, dt in seen]
        bounds = list(LATENCY_BUCKETS) + [float("inf")]
        cum = [
            total(after, "varsr_request_duration_seconds_bucket", le=_le(b))
            - total(before, "varsr_request_duration_seconds_bucket", le=_le(b))
            for b in bounds
        ]
        n_server = total(after, "varsr_request_duration_seconds_count") - total(
            before, "varsr_request_duration_seconds_count"
        )
        sum_server = total(after, "varsr_request_duration_seconds_sum") - total(
            before, "varsr_request_duration_seconds_sum"
        )
        quantiles = {}
        for q in (50, 90, 99):
            ci, si = bucket_index(bounds, pct(lat, q)), server_quantile_bucket(bounds, cum, q)
            quantiles[f"p{q}"] = {
                "client_s": round(pct(lat, q), 4),
                "client_bucket_le": _le(bounds[ci]),
                "server_bucket_le": _le(bounds[si]),
                "within_a_bucket": abs(ci - si) <= 1,
            }
        out = {
            "bench": "serve_metrics",
            "config": {
                "workers": args.workers,
                "clients": args.clients,
                "requests_per_client": args.requests,
                "bad_every": args.bad_every,
                "model": "tiny (random weights)",
                "image": "16x16 PNG at x4",
                "host": "127.0.0.1",
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            },
            "clients": {
                "requests": len(seen),
                "by_status": dict(sorted(client_codes.items())),
                "wall_s": round(wall, 3),
                "mean_s": round(sum(lat) / len(lat), 4),
            },
            "server": {
                "requests": int(n_server),
                "by_status": dict(sorted(server_codes.items())),
                "mean_s": round(sum_server / max(1.0, n_server), 4),
                "images": int(total(after, "varsr_images_total") - total(before, "varsr_images_total")),
                "tiles": int(total(after, "varsr_tiles_total") - total(before, "varsr_tiles_total")),
                "refusals": {
                    k: int(v - by_label(before, "varsr_refusals_total", "reason").get(k, 0))
                    for k, v in by_label(after, "varsr_refusals_total", "reason").items()
                },
                "requests_in_flight_max_seen": int(in_flight_max[0]),
            },
            "latency_quantiles": quantiles,
            "agree": {
                "same_count": int(n_server) == len(seen),
                "same_count_by_status": server_codes == dict(client_codes),
                "latency_within_a_bucket": all(v["within_a_bucket"] for v in quantiles.values()),
            },
            "memory_per_worker_mib": {
                "idle_after_warmup": sorted(round(v / 2**20, 1) for v in idle_rss.values()),
                "after_load": sorted(round(v / 2**20, 1) for v in load_rss.values()),
            },
        }
        print(json.dumps(out))
        return 0 if all(out["agree"].values()) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _le(b: float) -> str:
    """A bucket bound as Prometheus writes it in the ``le`` label."""
    return "+Inf" if b == float("inf") else repr(float(b))


if __name__ == "__main__":
    sys.exit(main())
