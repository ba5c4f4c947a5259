"""Cost of the evaluation metrics (docs/EVALUATION.md), as one JSON object.

    python benchmarks/eval_bench.py [--side 512] [--repeat 3] [--pairs 3000] [--weights-dir DIR]

* ``per_image_s``: seconds per image per metric on one core (torch and BLAS at one thread), median of ``--repeat``
  runs over four photos at ``--side`` px (the research code's 512-px HR);
* ``pairs_core_hours``: that cost for ``--pairs`` DIV2K-style pairs and one method, in core-hours (divide by cores:
  the suite's Ray tasks score pairs independently);
* ``small_set``: every offline metric over the bundled set (inference/eval_sets.py) for two methods (bicubic and the
  HR itself, so that no model runs), wall seconds in this process;
* ``skipped``: the learned metrics whose package or weights are absent, one line each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=3000)
    ap.add_argument("--weights-dir", default=None)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numpy as np
    import torch
    from PIL import Image
    from skimage import data as skdata

    from inference.eval_metrics import ALL, load_metrics, score_image
    from inference.eval_sets import prepare_bundled

    torch.set_num_threads(1)
    s = args.side
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.stereo_motorcycle()[0]]
    hrs = [np.asarray(Image.fromarray(p).resize((s, s), Image.Resampling.BICUBIC)) for p in photos]
    srs = [
        np.asarray(
            Image.fromarray(h)
            .resize((s // 4, s // 4), Image.Resampling.BICUBIC)
            .resize((s, s), Image.Resampling.BICUBIC)
        )
        for h in hrs
    ]
    metrics, skipped = load_metrics(list(ALL), args.weights_dir)
    per_image = {}
    for m in metrics:
        if m.fn is None:
            continue
        m.score(srs[0], hrs[0])  # warm-up: parameter loading, caches
        runs = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            for sr, hr in zip(srs, hrs):
                m.score(sr, hr)
            runs.append((time.perf_counter() - t0) / len(hrs))
        per_image[m.info.name] = round(statistics.median(runs), 4)
    offline = [m for m in metrics if not m.info.learned]
    with tempfile.TemporaryDirectory() as d:
        es = prepare_bundled(Path(d) / "bundled")
        t0 = time.perf_counter()
        for p in es.pairs:
            hr, lr = (np.asarray(im.convert("RGB")) for im in p.load())
            bic = np.asarray(Image.fromarray(lr).resize(hr.shape[1::-1], Image.Resampling.BICUBIC))
            score_image(bic, hr, offline)
            score_image(hr, hr, offline)
        small = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "benchmark": "eval_metrics",
                "side": s,
                "threads": 1,
                "repeat": args.repeat,
                "per_image_s": per_image,
                "pairs": args.pairs,
                "pairs_core_hours": {k: round(v * args.pairs / 3600, 3) for k, v in per_image.items()},
                "pairs_core_hours_all_offline": round(
                    sum(per_image[m.info.name] for m in offline) * args.pairs / 3600, 3
                ),
                "small_set": {
                    "pairs": len(es.pairs),
                    "side": es.manifest["protocol"]["hr_size"],
                    "methods": 2,
                    "metrics": [m.info.name for m in offline],
                    "seconds": round(small, 2),
                },
                "skipped": skipped,
                "machine": {
                    "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
