"""End-to-end benchmark: wall time of each `varsr demo` stage and the peak memory, as one JSON object.

    python benchmarks/e2e_bench.py [--workdir DIR] [--stage2-steps N --batch-size N]
                                   [--from-scratch --vqvae-steps N --stage1-steps N]

Runs the demo afresh (``--fresh``) in a subprocess: by default stage 2 finetunes the shipped base model
(model/pretrained/small4-base); ``--from-scratch`` trains every stage. Peak memory is the largest resident set of any
process the demo started (getrusage of the children: the data job, each training stage, the model server, …).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None, help="default: a temporary folder (removed afterwards)")
    ap.add_argument("--vqvae-steps", type=int, default=None)
    ap.add_argument("--stage1-steps", type=int, default=None)
    ap.add_argument("--stage2-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--from-scratch", action="store_true")
    a = ap.parse_args()

    tmp = None if a.workdir else tempfile.TemporaryDirectory(prefix="varsr-e2e-")
    work = Path(a.workdir or tmp.name) / "demo"
    cmd = [sys.executable, "-m", "infra.cli", "demo", "--workdir", str(work), "--fresh"]
    for flag in ("vqvae_steps", "stage1_steps", "stage2_steps", "batch_size"):
        if getattr(a, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
    if a.from_scratch:
        cmd.append("--from-scratch")
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.monotonic()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if res.returncode != 0:
        print(res.stdout[-3000:], res.stderr[-3000:], file=sys.stderr)
        return res.returncode
    st = json.loads((work / "state.json").read_text())
    from infra.demo.demo import DemoConfig

    defaults = DemoConfig()
    out = {
        "benchmark": "varsr demo end to end (embedded defaults)",
        "config": {
            "from_scratch": a.from_scratch,
            "vqvae_steps": (a.vqvae_steps or defaults.vqvae_steps) if a.from_scratch else 0,
            "stage1_steps": (a.stage1_steps or defaults.stage1_steps) if a.from_scratch else 0,
            "stage2_steps": a.stage2_steps or defaults.stage2_steps,
            "batch_size": a.batch_size or defaults.batch_size,
            "preset": "small",
            "base": None if a.from_scratch else defaults.base,
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg_1min": os.getloadavg()[0]},
        "stages_s": {k: v["seconds"] for k, v in st.items()},
        "total_wall_s": round(wall, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "serve_http_latency_s": st.get("serve", {}).get("info", {}).get("latency_s"),
        "upscale_heldout": {
            k: v for k, v in st.get("upscale", {}).get("info", {}).items() if k.startswith(("psnr", "ssim", "hf_"))
        },
    }
    print(json.dumps(out))
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
