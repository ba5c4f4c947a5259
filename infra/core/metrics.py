"""Full-reference image quality: PSNR and SSIM on the BT.601 Y channel (the paper's tables, docs/MODEL.md §4.4) and on
RGB.

Y = (65.481 R + 128.553 G + 24.966 B) / 255 + 16/255 for R, G, B in [0, 1], in float64. SSIM is Wang et al.'s: an
11-tap Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, statistics over the valid region (no padding), averaged over
channels for RGB. Optional no-reference / learned metrics (NIQE, LPIPS, ...) run only when pyiqa and its weights are
available locally; otherwise they are skipped with a notice.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

BT601 = np.array([65.481, 128.553, 24.966], dtype=np.float64)


def as_float_rgb(img: Image.Image | np.ndarray) -> np.ndarray:
    """RGB image -> HxWx3 float64 in [0, 1]."""
    a = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img)
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    return a.astype(np.float64)


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 float64 RGB in [0, 1] -> HxW Y (BT.601, studio range, in [16/255, 235/255])."""
    return (rgb @ BT601) / 255.0 + 16.0 / 255.0


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements (inf for identical inputs)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def _gaussian_kernel(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, win: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of two HxW (or HxWxC, averaged over channels) float images."""
    x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
    y = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float64))
    if x.ndim == 2:
        x, y = x[None], y[None]
    else:
        x, y = x.permute(2, 0, 1), y.permute(2, 0, 1)
    if min(x.shape[-2:]) < win:
        raise ValueError(f"SSIM needs images of at least {win}x{win} pixels, got {tuple(x.shape[-2:])}")
    c = x.shape[0]
    g = _gaussian_kernel(win, sigma)
    kh = g.view(1, 1, win, 1).expand(c, 1, win, 1)
    kw = g.view(1, 1, 1, win).expand(c, 1, 1, win)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t[None], kh, groups=c), kw, groups=c)[0]

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean(dim=(-2, -1)).mean())


def full_reference(sr: Image.Image | np.ndarray, hr: Image.Image | np.ndarray) -> dict[str, float]:
    """psnr_y, ssim_y, psnr_rgb, ssim_rgb of ``sr`` against ``hr`` (PIL images or HxWx3 uint8/float arrays of the
    same size)."""
    s, h = as_float_rgb(sr), as_float_rgb(hr)
    if s.shape != h.shape:
        raise ValueError(f"SR size {s.shape[1::-1]} differs from HR size {h.shape[1::-1]}")
    ys, yh = rgb_to_y(s), rgb_to_y(h)
    return {"psnr_y": psnr(ys, yh), "ssim_y": ssim(ys, yh), "psnr_rgb": psnr(s, h), "ssim_rgb": ssim(s, h)}


def batch_full_reference(sr: torch.Tensor, hr: torch.Tensor) -> dict[str, float]:
    """Mean :func:`full_reference` over a batch of (B, 3, H, W) images in [0, 1], each first rounded to 8 bits as a
    saved image would be, so training validation and ``varsr eval`` report the same quantities."""
    def to_u8(t: torch.Tensor) -> np.ndarray:
        return (t.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())

    rows = [full_reference(to_u8(s), to_u8(h)) for s, h in zip(sr, hr)]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def optional_metrics(names: tuple[str, ...] = ("niqe", "lpips", "dists", "musiq", "clipiqa")
                     ) -> tuple[dict[str, Callable[[Image.Image, Image.Image], float]], list[str]]:
    """Metric functions available offline (pyiqa with locally cached weights), and a notice per skipped one."""
    notices: list[str] = []
    try:
        import pyiqa
    except ImportError:
        return {}, [f"{', '.join(names)} skipped: pyiqa is not installed (optional; needs locally cached weights)"]
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    found: dict[str, Callable[[Image.Image, Image.Image], float]] = {}
    for name in names:
        try:
            metric = pyiqa.create_metric(name, device="cpu")
        except Exception as e:  # noqa: BLE001 - weights not cached / no network: skip with the reason
            notices.append(f"{name} skipped: weights not available offline ({type(e).__name__})")
            continue

        def run(sr: Image.Image, hr: Image.Image, _m=metric) -> float:
            to_t = lambda im: torch.from_numpy(as_float_rgb(im)).permute(2, 0, 1)[None].float()  # noqa: E731
            return float(_m(to_t(sr), to_t(hr)).item()) if _m.metric_mode == "FR" else float(_m(to_t(sr)).item())

        found[name] = run
    return found, notices


# ---- no-reference: high-frequency energy ----------------------------------------------------------------------------
def _gaussian_blur_2d(y: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (radius 3 sigma, reflect padding) of an HxW float64 image."""
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    t = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float64))[None, None]
    t = F.pad(t, (r, r, r, r), mode="reflect")
    t = F.conv2d(t, g.view(1, 1, 1, -1))
    t = F.conv2d(t, g.view(1, 1, -1, 1))
    return t[0, 0].numpy()


def hf_energy(img: Image.Image | np.ndarray, sigma: float = 1.0) -> float:
    """Mean squared high-pass of the Y channel (Y minus its Gaussian blur, sigma in pixels), in (8-bit levels)^2.

    A no-reference sharpness measure: detail, edges and texture raise it; blur (bicubic upsampling) lowers it.
    Noise raises it too, so read it beside PSNR/SSIM, or as ``hf_ratio`` against the HR reference.
    """
    y = rgb_to_y(as_float_rgb(img)) * 255.0
    if min(y.shape) < 4 * sigma + 2:
        raise ValueError(f"image {y.shape[::-1]} too small for a high-pass with sigma {sigma}")
    hp = y - _gaussian_blur_2d(y, sigma)
    return float(np.mean(hp**2))


def hf_ratio(sr: Image.Image, hr: Image.Image, sigma: float = 1.0) -> float:
    """hf_energy(sr) / hf_energy(hr): 1 = as much fine detail as the reference, < 1 blurrier, > 1 noisier/sharper."""
    ref = hf_energy(hr, sigma)
    return float("nan") if ref == 0 else hf_energy(sr, sigma) / ref


def hf_gap_db(sr: Image.Image, hr: Image.Image, sigma: float = 1.0) -> float:
    """|10·log10(hf_ratio)|: how far the SR's high-frequency energy is from the reference's, in dB (0 = equal).
    Lower is better; bicubic upsampling typically sits several dB below the reference."""
    r = hf_ratio(sr, hr, sigma)
    return float("nan") if not r > 0 else abs(10.0 * math.log10(r))


def mean_chroma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 2) per-image mean opponent colour (R - G, B - G), float64: the part of an image's
    average colour that a grey (R = G = B) picture does not have."""
    m = x.detach().double().mean(dim=(2, 3))
    return torch.stack([m[:, 0] - m[:, 1], m[:, 2] - m[:, 1]], dim=1)


def chroma_fidelity(x: torch.Tensor, rec: torch.Tensor) -> dict[str, float]:
    """How much of each image's average colour a reconstruction keeps (tokenizer check, docs/EXPERIMENTS.md).

    ``x``, ``rec``: (B, 3, H, W) in the same range. ``chroma_err``: mean |mean_chroma(rec) - mean_chroma(x)| in those
    units. ``chroma_gain``: least-squares slope of the reconstructions' mean chroma on the inputs' (both opponent
    axes pooled, each centred over the batch): 1 when colours are reproduced, 0 when every image decodes with the
    same tint whatever its colour (a tokenizer that lost colour); NaN when the inputs' colours do not vary (B < 2
    or identical colours), where a slope means nothing.
    """
    if x.shape != rec.shape or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected two (B, 3, H, W) batches of the same shape, "
                         f"got {tuple(x.shape)}, {tuple(rec.shape)}")
    cx, cr = mean_chroma(x), mean_chroma(rec)
    err = float((cr - cx).abs().mean())
    dx, dr = cx - cx.mean(0), cr - cr.mean(0)
    var = float((dx * dx).sum())
    gain = float((dx * dr).sum()) / var if var > 1e-12 else math.nan
    return {"chroma_gain": gain, "chroma_err": err}
