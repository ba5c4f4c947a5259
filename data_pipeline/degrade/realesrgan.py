"""Real-ESRGAN second-order degradation (the VARSR training LR synthesis), split into sampling and application.

`sample_degradation(rng, cfg, hr_shape)` draws every random choice (kernels, resize modes and scales, noise kinds,
noise seeds, JPEG qualities, final order) into a JSON-able dict; `apply_degradation(hr, params)` is a pure function
of the HR image and that dict, so the parameters recorded in a sample's JSON reproduce its LR exactly. The dict
also records which operator implementations ("backends") produced the LR.

Operators (how they relate to the PyTorch reference code):
- blur: `cv2.filter2D` with BORDER_REFLECT_101 = torch 'reflect' padding + correlation (no kernel flip), as BasicSR;
  separable (rank-1) kernels, i.e. isotropic Gaussians, use `cv2.sepFilter2D` (same result up to float rounding);
- resize (`resize.py`), backend "torch" (default): PyTorch `F.interpolate` semantics as the reference calls it:
  the first-order resize by a scale factor (pixel centres mapped with 1/s), the second-order and final resizes to
  a size (mapped with in/out); area = adaptive average pooling; bilinear and bicubic (a = -0.75) with
  align_corners=False, no antialias. Backend "opencv": cv2.resize to the same output sizes (INTER_AREA /
  INTER_LINEAR / INTER_CUBIC), which maps pixels with the size ratio and averages areas differently;
- JPEG (`jpeg.py`), backend "diffjpeg" (default): the reference's tensor JPEG (4:2:0, 8x8 DCT, float-scaled
  standard tables, rounding of the coefficients, inverse) at the sampled float quality, on the unrounded image
  clamped to [0, 1]. Backend "libjpeg": OpenCV/libjpeg encode + decode of the 8-bit-rounded image at the quality
  rounded to an integer (real JPEG artefacts);
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
from .jpeg import diff_jpeg, lib_jpeg
from .kernels import kernel_from_params, sinc_kernel
from .resize import MODES, opencv_resize, torch_resize

RESIZE_BACKENDS = ("torch", "opencv")
JPEG_BACKENDS = ("diffjpeg", "libjpeg")
# parameters recorded without "backends" (shards written before the choice existed) were made with these
LEGACY_BACKENDS = {"resize": "opencv", "jpeg": "libjpeg"}


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
    d["seed"] = int(rng.integers(0, 2**63 - 1))
    return d


def _check(cfg: DegradationConfig) -> None:
    if cfg.resize_backend not in RESIZE_BACKENDS or cfg.jpeg_backend not in JPEG_BACKENDS:
        raise ValueError(
            f"degradation backends must be resize_backend in {RESIZE_BACKENDS} and jpeg_backend in "
            f"{JPEG_BACKENDS}, got {cfg.resize_backend!r}, {cfg.jpeg_backend!r}"
        )
    for name in ("resize_modes", "resize_back_modes"):
        modes = list(getattr(cfg, name))
        if not modes or any(m not in MODES for m in modes):
            raise ValueError(f"degradation.{name} must be a non-empty list of {MODES}, got {modes}")


def sample_degradation(rng: np.random.Generator, cfg: DegradationConfig, hr_shape: tuple[int, int]) -> dict:
    """Draw all parameters of one degradation of an HR image of shape (H, W)."""
    _check(cfg)
    h, w = hr_shape
    modes = list(cfg.resize_modes)
    pick = lambda: str(modes[int(rng.choice(len(modes)))])  # noqa: E731
    # libjpeg takes an integer quality; the tensor JPEG keeps the sampled float, as the reference
    quality = (lambda q: int(round(q))) if cfg.jpeg_backend == "libjpeg" else float
    k1 = _sample_kernel(rng, cfg.kernel1)
    k2 = _sample_kernel(rng, cfg.kernel2)
    if rng.random() < cfg.final_sinc_prob:
        fs = int(rng.choice(cfg.final_sinc_sizes))
        final_sinc = {"type": "sinc", "size": fs, "omega_c": _u(rng, cfg.final_sinc_omega)}
    else:
        final_sinc = None  # identity (pulse) kernel
    r1 = {**_sample_resize(rng, cfg.resize_prob, cfg.resize_range), "mode": pick()}
    n1 = _sample_noise(rng, cfg.gaussian_noise_prob, cfg.noise_range, cfg.poisson_scale_range, cfg.gray_noise_prob)
    j1 = quality(_u(rng, cfg.jpeg_range))
    second_blur = bool(rng.random() < cfg.second_blur_prob)
    r2 = {**_sample_resize(rng, cfg.resize_prob2, cfg.resize_range2), "mode": pick()}
    r2["size"] = [int(h / cfg.scale * r2["scale"]), int(w / cfg.scale * r2["scale"])]
    n2 = _sample_noise(rng, cfg.gaussian_noise_prob2, cfg.noise_range2, cfg.poisson_scale_range2, cfg.gray_noise_prob2)
    order = "resize_sinc_jpeg" if rng.random() < cfg.final_order_resize_first_prob else "jpeg_resize_sinc"
    r3 = {"mode": pick(), "size": [h // cfg.scale, w // cfg.scale]}
    j2 = quality(_u(rng, cfg.jpeg_range2))
    return {
        "kernel1": k1,
        "resize1": r1,
        "noise1": n1,
        "jpeg1": {"quality": j1},
        "second_blur": second_blur,
        "kernel2": k2,
        "resize2": r2,
        "noise2": n2,
        "final_order": order,
        "resize3": r3,
        "final_sinc": final_sinc,
        "jpeg2": {"quality": j2},
        "scale": cfg.scale,
        "backends": {"resize": cfg.resize_backend, "jpeg": cfg.jpeg_backend},
        "resize_back": {"modes": [str(m) for m in cfg.resize_back_modes]},
    }


# ---------------------------------------------------------------------------------------------------- operators
def blur(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlation with reflect-101 borders; rank-1 kernels (isotropic Gaussians) run as two 1-D passes."""
    u, sv, vt = np.linalg.svd(kernel)
    if sv[1] <= 1e-9 * sv[0]:
        col = (u[:, 0] * np.sqrt(sv[0])).astype(np.float32)
        row = (vt[0] * np.sqrt(sv[0])).astype(np.float32)
        return cv2.sepFilter2D(img, -1, row, col, borderType=cv2.BORDER_REFLECT_101)
    return cv2.filter2D(img, -1, kernel.astype(np.float32), borderType=cv2.BORDER_REFLECT_101)


def add_noise(img: np.ndarray, p: dict) -> np.ndarray:
    rng = np.random.default_rng(p["seed"])
    h, w = img.shape[:2]
    if p["type"] == "gaussian":
        shape = (h, w, 1) if p["gray"] else (h, w, 3)
        noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(p["sigma"] / 255.0)
    else:
        src = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[:, :, None] if p["gray"] else img
        q8 = np.clip(np.rint(src * 255.0), 0, 255).astype(np.uint8)
        vals: float = int(np.count_nonzero(np.bincount(q8.ravel(), minlength=256)))
        vals = float(2 ** math.ceil(math.log2(max(vals, 1))))
        q = q8.astype(np.float32) / np.float32(255.0)
        out = rng.poisson(q * vals).astype(np.float32) / np.float32(vals)
        noise = (out - q) * np.float32(p["scale"])
    return np.clip(img + noise, 0.0, 1.0, dtype=np.float32)


def _resize(img: np.ndarray, backend: str, mode: str, size_hw=None, scale: float | None = None) -> np.ndarray:
    """Resize by a scale factor (`scale`) or to `size_hw`; the opencv backend always resizes to the size."""
    if backend == "torch":
        return torch_resize(img, mode, size=size_hw, scale_factor=scale)
    if backend == "opencv":
        if size_hw is None:
            size_hw = (int(img.shape[0] * scale), int(img.shape[1] * scale))
        return opencv_resize(img, mode, size_hw)
    raise ValueError(f"unknown resize backend {backend!r}; expected one of {RESIZE_BACKENDS}")


def _jpeg(img: np.ndarray, backend: str, quality: float) -> np.ndarray:
    if backend == "diffjpeg":
        return diff_jpeg(np.clip(img, 0.0, 1.0), float(quality))
    if backend == "libjpeg":
        return lib_jpeg(img, int(quality))
    raise ValueError(f"unknown JPEG backend {backend!r}; expected one of {JPEG_BACKENDS}")


# ---------------------------------------------------------------------------------------------------- pipeline
def apply_degradation(hr: np.ndarray, params: dict) -> np.ndarray:
    """HR uint8 (H, W, 3) RGB + parameters -> LR uint8 (H/scale, W/scale, 3). Deterministic."""
    if params.get("kind") == "bicubic":
        return bicubic_lr(hr, int(params["scale"]))
    h, w = hr.shape[:2]
    be = params.get("backends", LEGACY_BACKENDS)
    rz, jp = be["resize"], be["jpeg"]
    x = hr.astype(np.float32) / np.float32(255.0)
    # first order: blur -> resize (by a scale factor) -> noise -> JPEG
    x = blur(x, kernel_from_params(params["kernel1"]))
    r1 = params["resize1"]
    x = _resize(x, rz, r1["mode"], scale=r1["scale"])
    x = add_noise(x, params["noise1"])
    x = _jpeg(x, jp, params["jpeg1"]["quality"])
    # second order: (blur) -> resize (to a size) -> noise -> final [resize -> sinc -> JPEG] or [JPEG -> resize -> sinc]
    if params["second_blur"]:
        x = blur(x, kernel_from_params(params["kernel2"]))
    x = _resize(x, rz, params["resize2"]["mode"], size_hw=params["resize2"]["size"])
    x = add_noise(x, params["noise2"])
    fs = params["final_sinc"]
    r3 = params["resize3"]
    if params["final_order"] == "resize_sinc_jpeg":
        x = _resize(x, rz, r3["mode"], size_hw=r3["size"])
        if fs is not None:
            x = blur(x, sinc_kernel(fs["size"], fs["omega_c"]))
        x = _jpeg(x, jp, params["jpeg2"]["quality"])
    else:
        x = _jpeg(x, jp, params["jpeg2"]["quality"])
        x = _resize(x, rz, r3["mode"], size_hw=r3["size"])
        if fs is not None:
            x = blur(x, sinc_kernel(fs["size"], fs["omega_c"]))
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def bicubic_lr(hr: np.ndarray, scale: int) -> np.ndarray:
    """The undamaged LR: PIL bicubic downsample by ``scale`` (what benchmark LR images are), uint8 RGB."""
    from PIL import Image

    h, w = hr.shape[:2]
    small = Image.fromarray(hr).resize((w // scale, h // scale), Image.Resampling.BICUBIC)
    return np.asarray(small, dtype=np.uint8).copy()


def degrade(hr: np.ndarray, cfg: DegradationConfig, seed: int, variant: int = 0) -> tuple[np.ndarray, dict]:
    """Sample parameters with a PCG64 stream seeded by `seed`, apply them; returns (LR uint8, params incl. seed).
    Variants below ``cfg.clean_variants`` get the plain bicubic LR (params ``{"kind": "bicubic", "scale"}``)."""
    if variant < cfg.clean_variants:
        return bicubic_lr(hr, cfg.scale), {
            "kind": "bicubic",
            "scale": int(cfg.scale),
            "seed": int(seed),
            "resize_back": {"modes": [str(m) for m in cfg.resize_back_modes]},
        }
    rng = np.random.default_rng(seed)
    params = sample_degradation(rng, cfg, hr.shape[:2])
    params["seed"] = int(seed)
    return apply_degradation(hr, params), params
