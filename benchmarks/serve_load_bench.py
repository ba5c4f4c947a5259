"""Load test of the served endpoint's limits (issue 28, "Done when"; inference/README.md, "Limits of the served
endpoint"): what a user sees when small requests and too-large ones arrive together.

One `varsr serve` of the tiny preset (random weights, registered in a SQLite registry in a temporary folder) on
127.0.0.1 only. For a fixed time (``--duration``, at most 300 s) ``--small-clients`` threads send small photos
(16x16 at x4) back to back while ``--large-clients`` threads send, in turn, requests the endpoint must refuse: the
97-byte 4096x1 strip at x4 (over the work budget), a flat 2048x2048 PNG at x4 (work and memory), a body over
``serving.max_request_bytes``, a malformed 1 MB body, deeply nested JSON and a ``tile`` overlap past its bound. At
most ``--max-requests`` requests in all. Every 0.2 s the resident memory of the server's processes is summed.

Prints ONE JSON object: the config it ran; counts by HTTP status (no 5xx is expected); the small requests' count and
p50/p99 latency; the too-large ones by kind (status counts, p99 latency of their refusal, largest reply body); the
server's RSS at start and its peak.

    .venv/bin/python benchmarks/serve_load_bench.py --duration 60
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

for _k, _v in {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_k, _v)

# the endpoint's budgets for this run (serving.* of `varsr serve --set`); the tiny model does 3 AR steps per tile
SERVING = [
    "runtime.cpu_threads=1",
    "serving.max_request_work=300",
    "serving.max_request_memory_mb=1024",
    "serving.max_request_bytes=2000000",
    "serving.request_timeout_s=30",
]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return round(s[lo] + (s[hi] - s[lo]) * (k - lo), 4)


def png_b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def bodies() -> tuple[list[bytes], dict[str, bytes]]:
    """Small request bodies, and the too-large ones by kind."""
    from PIL import Image
    from skimage import data

    src = Image.fromarray(data.chelsea())
    small = [
        json.dumps(
            {
                "dataframe_split": {"columns": ["image"], "data": [[png_b64(src.rotate(20 * i).resize((16, 16)))]]},
                "params": {"seed": 0},
            }
        ).encode()
        for i in range(8)
    ]

    def split(b64: str, **params) -> bytes:
        return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b64]]}, "params": params}).encode()

    large = {
        "strip_4096x1_x4": split(png_b64(Image.new("RGB", (4096, 1), (200, 10, 10))), scale=4),
        "flat_2048x2048_x4": split(png_b64(Image.new("RGB", (2048, 2048), (120, 90, 60))), scale=4),
        "body_over_limit": b'{"dataframe_split": "' + b"A" * 2_500_000 + b'"}',
        "malformed_1mb": b'{"dataframe_split": {"columns": ["image"], "data": [["' + b"Q" * 1_000_000,
        "nested_json": b"[" * 100_000 + b"]" * 100_000,
        "tile_overlap_3": split(png_b64(src.resize((16, 16))), tile=3),
    }
    return small, large


def group_rss_bytes(root_pid: int) -> int:
    """Resident memory of ``root_pid`` and all its descendants (the `varsr serve` group), from /proc."""
    children: dict[int, list[int]] = defaultdict(list)
    rss: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            st = (d / "stat").read_text()
            fields = st[st.rindex(")") + 2 :].split()
            children[int(fields[1])].append(int(d.name))
            rss[int(d.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [root_pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (<= 300)")
    ap.add_argument("--small-clients", type=int, default=4, help="threads sending small requests (<= 8)")
    ap.add_argument("--large-clients", type=int, default=2, help="threads sending too-large requests (<= 4)")
    ap.add_argument("--max-requests", type=int, default=5000, help="requests in all (<= 20000)")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more serving.*/runtime.* settings for the server",
    )
    args = ap.parse_args(argv)
    duration = max(1.0, min(args.duration, 300.0))
    n_small, n_large = max(1, min(args.small_clients, 8)), max(0, min(args.large_clients, 4))
    max_requests = max(1, min(args.max_requests, 20000))
    overrides = SERVING + list(args.overrides)

    import requests
    import torch

    from inference.config import load_inference_config
    from inference.registry import register_model
    from inference.serve import background_server
    from infra.core.net import free_port
    from model import VARSRConfig, build, save_pretrained

    small, large = bodies()
    work = Path(tempfile.mkdtemp(prefix="varsr-load-"))
    result: dict = {
        "benchmark": "varsr-serve-load",
        "config": {
            "preset": "tiny",
            "duration_s": duration,
            "small_clients": n_small,
            "large_clients": n_large,
            "max_requests": max_requests,
            "serving_set": overrides,
            "small_request": "16x16 PNG at x4 (64x64 out), seed 0",
            "large_kinds": sorted(large),
            "large_body_bytes": {k: len(v) for k, v in large.items()},
            "host": "127.0.0.1",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
        },
    }
    try:
        torch.manual_seed(0)
        ckpt = save_pretrained(work / "ckpt", *build(VARSRConfig.preset("tiny")))
        uri = f"sqlite:///{work / 'mlflow.db'}"
        register_model(
            ckpt,
            "varsr-load",
            tracking_uri=uri,
            validate_example=False,
            config=load_inference_config(overrides=["runtime.cpu_threads=1"]),
        )
        port = free_port()
        with background_server(
            "models:/varsr-load@champion",
            port,
            tracking_uri=uri,
            cwd=ROOT,
            overrides=overrides,
            log_path=work / "server.log",
            tmp_dir=work / "server-tmp",
        ) as url:
            serve_pid = next(
                int(d.name)
                for d in Path("/proc").iterdir()
                if d.name.isdigit()
                and b"infra.cli\0serve" in (d / "cmdline").read_bytes()
                and f"\0{port}\0".encode() in (d / "cmdline").read_bytes()
            )
            headers = {"Content-Type": "application/json"}
            requests.post(f"{url}/invocations", data=small[0], headers=headers, timeout=120)  # warm-up
            rss_start = group_rss_bytes(serve_pid)
            lock = threading.Lock()
            sent = itertools.count()
            stop_at = time.monotonic() + duration
            statuses: Counter = Counter()
            small_lat: list[float] = []
            small_status: Counter = Counter()
            large_stats = {k: {"statuses": Counter(), "latency": [], "max_reply_bytes": 0} for k in large}
            peak = {"rss": rss_start}

            def client(kind_cycle, is_small: bool):
                with requests.Session() as s:
                    for kind, body in kind_cycle:
                        if time.monotonic() >= stop_at or next(sent) >= max_requests:
                            return
                        t0 = time.perf_counter()
                        try:
                            r = s.post(f"{url}/invocations", data=body, headers=headers, timeout=120)
                            code, size = r.status_code, len(r.content)
                        except requests.RequestException as e:
                            code, size = type(e).__name__, 0
                            s.close()
                        dt = time.perf_counter() - t0
                        with lock:
                            statuses[str(code)] += 1
                            if is_small:
                                small_status[str(code)] += 1
                                if code == 200:
                                    small_lat.append(dt)
                            else:
                                st = large_stats[kind]
                                st["statuses"][str(code)] += 1
                                st["latency"].append(dt)
                                st["max_reply_bytes"] = max(st["max_reply_bytes"], size)

            def sample():
                while time.monotonic() < stop_at:
                    peak["rss"] = max(peak["rss"], group_rss_bytes(serve_pid))
                    time.sleep(0.2)

            threads = [threading.Thread(target=sample, daemon=True)]
            for i in range(n_small):
                threads.append(
                    threading.Thread(
                        target=client,
                        args=(
                            itertools.cycle([("small", small[(i + k) % len(small)]) for k in range(len(small))]),
                            True,
                        ),
                    )
                )
            kinds = sorted(large)
            for i in range(n_large):
                order = kinds[i % len(kinds) :] + kinds[: i % len(kinds)]
                threads.append(
                    threading.Thread(target=client, args=(itertools.cycle([(k, large[k]) for k in order]), False))
                )
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=duration + 200)
            wall = time.perf_counter() - t0
            log_tail = (work / "server.log").read_text()[-1500:]
        result["wall_s"] = round(wall, 2)
        result["requests"] = sum(statuses.values())
        result["status_counts"] = dict(sorted(statuses.items()))
        result["server_errors_5xx"] = sum(v for k, v in statuses.items() if k.isdigit() and int(k) >= 500)
        result["small"] = {
            "sent": sum(small_status.values()),
            "ok": len(small_lat),
            "status_counts": dict(small_status),
            "latency_s_p50": pct(small_lat, 50),
            "latency_s_p99": pct(small_lat, 99),
            "latency_s_max": pct(small_lat, 100),
        }
        result["refused"] = {
            k: {
                "status_counts": dict(v["statuses"]),
                "latency_s_p99": pct(v["latency"], 99),
                "max_reply_bytes": v["max_reply_bytes"],
            }
            for k, v in large_stats.items()
        }
        result["refused_total"] = sum(sum(v["statuses"].values()) for v in large_stats.values())
        result["server_rss_mb"] = {"start": round(rss_start / 2**20, 1), "peak": round(peak["rss"] / 2**20, 1)}
        if result["server_errors_5xx"]:
            result["server_log_tail"] = log_tail
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
