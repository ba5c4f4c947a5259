"""Image statistics of degraded LRs on real photos: PSNR against a clean downscale, sharpness, noise estimate and
blockiness (medians over crops x seeds), per operator variant; prints ONE JSON object.

    python benchmarks/degrade_stats.py [--preset varsr-mild] [--seeds 40] [--variants all|default]

Crops: the bundled real photos (scikit-image astronaut, coffee, chelsea, rocket, retina, immunohistochemistry,
hubble_deep_field; scikit-learn china, flower; matplotlib grace_hopper), each resized to a 640-px short side with
LANCZOS as the shard builder does for positives, then three 512 x 512 crops (start, centre, end of the long axis;
the diagonal for square images). Each crop is degraded with seeds 0..N-1 by `degrade(hr, cfg, seed)`; every
variant sees the same crops and seeds, so parameter draws are identical across variants and only the operators
differ.

Variants (overrides of the preset): "reference_ops" = torch-semantics resize + tensor JPEG (the defaults),
"opencv_libjpeg" = the earlier operators, and the two single swaps. `--variants default` runs only the preset as
loaded (this also runs on code that predates the backend fields).

Figures per variant: median / mean PSNR (dB) of the 8-bit LR against the HR's exact 4 x 4 box average (float);
median sharpness (variance of the 3x3 Laplacian of the grey LR) and noise (Immerkaer sigma of the grey LR) and
blockiness, as the pipeline's scorers compute them.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.append(str(Path(__file__).resolve().parent.parent))  # PYTHONPATH (e.g. an older checkout) wins

VARIANTS = {
    "reference_ops": ["degradation.resize_backend=torch", "degradation.jpeg_backend=diffjpeg"],
    "opencv_libjpeg": ["degradation.resize_backend=opencv", "degradation.jpeg_backend=libjpeg"],
    "torch_resize_only": ["degradation.resize_backend=torch", "degradation.jpeg_backend=libjpeg"],
    "diffjpeg_only": ["degradation.resize_backend=opencv", "degradation.jpeg_backend=diffjpeg"],
}


def photos() -> dict[str, np.ndarray]:
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    out = {
        n: getattr(sd, n)()
        for n in ("astronaut", "coffee", "chelsea", "rocket", "retina", "immunohistochemistry", "hubble_deep_field")
    }
    for name, im in zip(("china", "flower"), load_sample_images().images):
        out[name] = im
    try:
        import matplotlib.cbook as cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            out["grace_hopper"] = np.asarray(Image.open(f).convert("RGB"))
    except Exception:  # noqa: BLE001 - matplotlib is optional
        pass
    return {k: np.ascontiguousarray(v[..., :3]) for k, v in out.items()}


def crops(imgs: dict[str, np.ndarray], crop: int = 512, short: int = 640) -> list[tuple[str, np.ndarray]]:
    res = []
    for name, rgb in imgs.items():
        h, w = rgb.shape[:2]
        s = short / min(h, w)
        nw, nh = max(crop, round(w * s)), max(crop, round(h * s))
        big = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.Resampling.LANCZOS))
        for f in (0.0, 0.5, 1.0):
            y, x = int(f * (nh - crop)), int(f * (nw - crop))
            res.append((f"{name}@{x},{y}", np.ascontiguousarray(big[y : y + crop, x : x + crop])))
    return res


def psnr(lr: np.ndarray, ref: np.ndarray) -> float:
    mse = float(np.mean((lr.astype(np.float64) - ref) ** 2))
    return 10 * math.log10(255.0**2 / mse) if mse > 0 else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="varsr-mild")
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--variants", default="all", choices=["all", "default"])
    args = ap.parse_args()

    import cv2

    try:
        from data_pipeline.config import load_build_config as load_config
    except ImportError:  # an older checkout measured through PYTHONPATH
        from data_pipeline.config import load_config
    from data_pipeline.degrade import degrade
    from data_pipeline.scorers import blockiness, noise_sigma, sharpness

    cv2.setNumThreads(1)
    cs = crops(photos())
    variants = VARIANTS if args.variants == "all" else {"default": []}
    cfgs = {name: load_config(args.preset, ov).degradation for name, ov in variants.items()}
    stats = {name: {"psnr": [], "sharpness": [], "noise": [], "blockiness": []} for name in variants}
    seconds = {name: 0.0 for name in variants}
    for _, hr in cs:
        clean = hr.astype(np.float64).reshape(128, 4, 128, 4, 3).mean(axis=(1, 3))
        for seed in range(args.seeds):
            for name, cfg in cfgs.items():  # interleaved: every variant sees the same load
                t0 = time.process_time()
                lr, _ = degrade(hr, cfg, seed)
                seconds[name] += time.process_time() - t0
                g = cv2.cvtColor(lr, cv2.COLOR_RGB2GRAY).astype(np.float32)
                st = stats[name]
                st["psnr"].append(psnr(lr, clean))
                st["sharpness"].append(sharpness(g))
                st["noise"].append(noise_sigma(g))
                st["blockiness"].append(blockiness(g))
    n = len(cs) * args.seeds
    out: dict = {
        "benchmark": "varsr degradation LR statistics on real photos",
        "config": {
            "preset": args.preset,
            "crops": len(cs),
            "seeds_per_crop": args.seeds,
            "draws": n,
            "crop": 512,
            "lr": 128,
            "short_side_before_crop": 640,
            "clean_reference": "exact 4x4 box average of the HR (float)",
            "photos": sorted({c[0].split("@")[0] for c in cs}),
            "variants": {k: v for k, v in variants.items()},
        },
        "machine": {
            "python": platform.python_version(),
            "note": "shared 2-core dev machine; CPU time per degradation, not wall",
        },
        "results": {},
    }
    for name, st in stats.items():
        a = {k: np.asarray(v) for k, v in st.items()}
        out["results"][name] = {
            "psnr_median_db": round(float(np.median(a["psnr"])), 3),
            "psnr_mean_db": round(float(a["psnr"].mean()), 3),
            "sharpness_median": round(float(np.median(a["sharpness"])), 2),
            "noise_median": round(float(np.median(a["noise"])), 4),
            "blockiness_median": round(float(np.median(a["blockiness"])), 4),
            "cpu_ms_per_degradation": round(1000 * seconds[name] / n, 2),
        }
    if "reference_ops" in stats and "opencv_libjpeg" in stats:
        new, old = (np.asarray(stats[k]["psnr"]) for k in ("reference_ops", "opencv_libjpeg"))
        out["paired_psnr_change_db"] = {
            "median": round(float(np.median(new - old)), 3),
            "mean": round(float(np.mean(new - old)), 3),
        }
        for k in ("torch_resize_only", "diffjpeg_only"):
            d = np.asarray(stats[k]["psnr"]) - old
            out["paired_psnr_change_db"][f"{k}_median"] = round(float(np.median(d)), 3)
            out["paired_psnr_change_db"][f"{k}_mean"] = round(float(np.mean(d)), 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
