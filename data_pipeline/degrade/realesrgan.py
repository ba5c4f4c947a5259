"""Real-ESRGAN second-order degradation (spec §5.7), split into sampling and application.

`sample_degradation(rng, cfg, hr_shape)` draws every random choice (kernels, resize modes and scales, noise kinds,
noise seeds, JPEG qualities, final order) into a JSON-able dict; `apply_degradation(hr, params)` is a pure function
of the HR image and that dict, so the parameters recorded in a sample's JSON reproduce its LR exactly.

Implementation notes (differences from the PyTorch research code, all documented here):
- blur: `cv2.filter2D` with BORDER_REFLECT_101 = torch 'reflect' padding + correlation (no kernel flip), as BasicSR;
  separable (rank-1) kernels, i.e. isotropic Gaussians, use `cv2.sepFilter2D` (same result up to float rounding);
- resize modes use OpenCV: area -> INTER_AREA, bilinear -> INTER_LINEAR (= torch bilinear, align_corners=False,
  no antialias), bicubic -> INTER_CUBIC (a = -0.75 like torch). INTER_AREA equals torch 'area' (adaptive average
  pooling) for integer down-scaling factors and differs slightly otherwise;
- JPEG: OpenCV/libjpeg encode + decode of the 8-bit-rounded image at an integer quality (upstream DiffJPEG uses a
  float quality); sampled qualities are rounded to the nearest integer and recorded;
- noise: float32 NumPy PCG64 streams seeded by the recorded per-stage seed; Poisson noise as BasicSR
  (values counted on the 8-bit-rounded image, rounded up to a power of two).
Images are float32 RGB in [0, 1] (H, W, 3) internally; the result is the 8-bit LR at HR/scale.
OpenCV is called directly rather than through albumentations: albumentations' operations here are thin OpenCV
wrappers, but its JPEG op encodes RGB arrays as if they were BGR (wrong chroma weights), and its transforms draw
from their own random state, which cannot be recorded in, or replayed from, the sample JSON.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from ..config import DegradationConfig, KernelConfig
from .kernels import kernel_from_params, sinc_kernel

_MODES = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}


# ----------------------------------------------------------------------------------------------------- sampling
def _u(rng: np.random.Generator, r) -> float:
    return float(rng.uniform(r[0], r[1]))


def _sample_kernel(rng: np.random.Generator, kc: KernelConfig) -> dict:
    size = int(rng.choice(kc.sizes))
    if rng.random() < kc.sinc_prob:
        omega = _u(rng, kc.sinc_omega_small if size < kc.sinc_small_below else kc.sinc_omega_large)
        return {"type": "sinc", "size": size, "omega_c": omega}
    p = np.asarray(kc.kernel_prob, np.float64)
    kind = str(kc.kernel_list[int(rng.choice(len(kc.kernel_list), p=p / p.sum()))])
    sx = _u(rng, kc.sigma_x)
    if kind.endswith("iso") and not kind.endswith("aniso"):
        sy, rot = sx, 0.0
    else:
        sy, rot = _u(rng, kc.sigma_y), _u(rng, kc.rotation)
    beta = 1.0
    if kind.startswith("generalized") or kind.startswith("plateau"):
        lo, hi = kc.betag_range if kind.startswith("generalized") else kc.betap_range
        beta = _u(rng, (lo, 1.0)) if rng.random() < 0.5 else _u(rng, (1.0, hi))
    return {"type": kind, "size": size, "sigma_x": sx, "sigma_y": sy, "rotation": rot, "beta": beta}


def _sample_resize(rng, probs, rng_range) -> dict:
    p = np.asarray(probs, np.float64)
    direction = ["up", "down", "keep"][int(rng.choice(3, p=p / p.sum()))]
    if direction == "up":
        s = _u(rng, (1.0, rng_range[1]))
    elif direction == "down":
        s = _u(rng, (rng_range[0], 1.0))
    else:
        s = 1.0
    return {"direction": direction, "scale": s}


def _sample_noise(rng, gauss_p, sigma_range, poisson_range, gray_p) -> dict:
    if rng.random() < gauss_p:
        d = {"type": "gaussian", "sigma": _u(rng, sigma_range)}
    else:
        d = {"type": "poisson", "scale": _u(rng, poisson_range)}
    d["gray"] = bool(rng.random() < gray_p)
    d["seed"] = int(rng.integers(0, 2 ** 63 - 1))
    return d


def sample_degradation(rng: np.random.Generator, cfg: DegradationConfig, hr_shape: tuple[int, int]) -> dict:
    """Draw all parameters of one degradation of an HR image of shape (H, W)."""
    h, w = hr_shape
    modes = list(cfg.resize_modes)
    pick = lambda: str(modes[int(rng.choice(len(modes)))])  # noqa: E731
    k1 = _sample_kernel(rng, cfg.kernel1)
    k2 = _sample_kernel(rng, cfg.kernel2)
    if rng.random() < cfg.final_sinc_prob:
        fs = int(rng.choice(cfg.final_sinc_sizes))
        final_sinc = {"type": "sinc", "size": fs, "omega_c": _u(rng, cfg.final_sinc_omega)}
    else:
        final_sinc = None                       # identity (pulse) kernel
    r1 = {**_sample_resize(rng, cfg.resize_prob, cfg.resize_range), "mode": pick()}
    n1 = _sample_noise(rng, cfg.gaussian_noise_prob, cfg.noise_range, cfg.poisson_scale_range, cfg.gray_noise_prob)
    j1 = int(round(_u(rng, cfg.jpeg_range)))
    second_blur = bool(rng.random() < cfg.second_blur_prob)
    r2 = {**_sample_resize(rng, cfg.resize_prob2, cfg.resize_range2), "mode": pick()}
    r2["size"] = [int(h / cfg.scale * r2["scale"]), int(w / cfg.scale * r2["scale"])]
    n2 = _sample_noise(rng, cfg.gaussian_noise_prob2, cfg.noise_range2, cfg.poisson_scale_range2,
                       cfg.gray_noise_prob2)
    order = "resize_sinc_jpeg" if rng.random() < cfg.final_order_resize_first_prob else "jpeg_resize_sinc"
    r3 = {"mode": pick(), "size": [h // cfg.scale, w // cfg.scale]}
    j2 = int(round(_u(rng, cfg.jpeg_range2)))
    return {"kernel1": k1, "resize1": r1, "noise1": n1, "jpeg1": {"quality": j1},
            "second_blur": second_blur, "kernel2": k2, "resize2": r2, "noise2": n2,
            "final_order": order, "resize3": r3, "final_sinc": final_sinc, "jpeg2": {"quality": j2},
            "scale": cfg.scale}


# ---------------------------------------------------------------------------------------------------- operators
def blur(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlation with reflect-101 borders; rank-1 kernels (isotropic Gaussians) run as two 1-D passes."""
    u, sv, vt = np.linalg.svd(kernel)
    if sv[1] <= 1e-9 * sv[0]:
        col = (u[:, 0] * np.sqrt(sv[0])).astype(np.float32)
        row = (vt[0] * np.sqrt(sv[0])).astype(np.float32)
        return cv2.sepFilter2D(img, -1, row, col, borderType=cv2.BORDER_REFLECT_101)
    return cv2.filter2D(img, -1, kernel.astype(np.float32), borderType=cv2.BORDER_REFLECT_101)


def resize(img: np.ndarray, size_hw: tuple[int, int], mode: str) -> np.ndarray:
    h, w = max(1, int(size_hw[0])), max(1, int(size_hw[1]))
    if (h, w) == img.shape[:2]:
        return img
    return cv2.resize(img, (w, h), interpolation=_MODES[mode])


def add_noise(img: np.ndarray, p: dict) -> np.ndarray:
    rng = np.random.default_rng(p["seed"])
    h, w = img.shape[:2]
    if p["type"] == "gaussian":
        shape = (h, w, 1) if p["gray"] else (h, w, 3)
        noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(p["sigma"] / 255.0)
    else:
        src = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[:, :, None] if p["gray"] else img
        q8 = np.clip(np.rint(src * 255.0), 0, 255).astype(np.uint8)
        vals = int(np.count_nonzero(np.bincount(q8.ravel(), minlength=256)))
        vals = float(2 ** math.ceil(math.log2(max(vals, 1))))
        q = q8.astype(np.float32) / np.float32(255.0)
        out = rng.poisson(q * vals).astype(np.float32) / np.float32(vals)
        noise = (out - q) * np.float32(p["scale"])
    return np.clip(img + noise, 0.0, 1.0, dtype=np.float32)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    u8 = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(u8, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32) / np.float32(255)


# ---------------------------------------------------------------------------------------------------- pipeline
def apply_degradation(hr: np.ndarray, params: dict) -> np.ndarray:
    """HR uint8 (H, W, 3) RGB + parameters -> LR uint8 (H/scale, W/scale, 3). Deterministic."""
    h, w = hr.shape[:2]
    x = hr.astype(np.float32) / np.float32(255.0)
    # first order: blur -> resize -> noise -> JPEG
    x = blur(x, kernel_from_params(params["kernel1"]))
    r1 = params["resize1"]
    x = resize(x, (int(h * r1["scale"]), int(w * r1["scale"])), r1["mode"])
    x = add_noise(x, params["noise1"])
    x = jpeg(x, params["jpeg1"]["quality"])
    # second order: (blur) -> resize -> noise -> final [resize -> sinc -> JPEG] or [JPEG -> resize -> sinc]
    if params["second_blur"]:
        x = blur(x, kernel_from_params(params["kernel2"]))
    x = resize(x, params["resize2"]["size"], params["resize2"]["mode"])
    x = add_noise(x, params["noise2"])
    fs = params["final_sinc"]
    r3 = params["resize3"]
    if params["final_order"] == "resize_sinc_jpeg":
        x = resize(x, r3["size"], r3["mode"])
        if fs is not None:
            x = blur(x, sinc_kernel(fs["size"], fs["omega_c"]))
        x = jpeg(x, params["jpeg2"]["quality"])
    else:
        x = jpeg(x, params["jpeg2"]["quality"])
        x = resize(x, r3["size"], r3["mode"])
        if fs is not None:
            x = blur(x, sinc_kernel(fs["size"], fs["omega_c"]))
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def degrade(hr: np.ndarray, cfg: DegradationConfig, seed: int) -> tuple[np.ndarray, dict]:
    """Sample parameters with a PCG64 stream seeded by `seed`, apply them; returns (LR uint8, params incl. seed)."""
    rng = np.random.default_rng(seed)
    params = sample_degradation(rng, cfg, hr.shape[:2])
    params["seed"] = int(seed)
    return apply_degradation(hr, params), params
