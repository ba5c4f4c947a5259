"""Full-reference image quality: PSNR and SSIM on the BT.601 Y channel (the paper's tables, docs/MODEL.md §4.4) and on
RGB.

Y = (65.481 R + 128.553 G + 24.966 B) / 255 + 16/255 for R, G, B in [0, 1], in float64. SSIM is Wang et al.'s: an
11-tap Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, statistics over the valid region (no padding), averaged over
channels for RGB. No crop border unless a caller asks for one (the research code's Table 1 crops none).

No-reference, offline (docs/EVALUATION.md): :func:`niqe` (Mittal et al. 2013, with the pristine-model parameters of
BasicSR 1.4.2's source distribution, fetched and checked by sha256 at set-up) and :func:`brisque` (Mittal et al. 2012,
the ``brisque`` package's SVR model and feature code). Both take an HxWx3 RGB uint8 array and return a float, lower =
better. Learned metrics (LPIPS, DISTS, MUSIQ, ...) are plug-ins of ``inference/eval_metrics.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

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
        return t.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()

    rows = [full_reference(to_u8(s), to_u8(h)) for s, h in zip(sr, hr)]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


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
        raise ValueError(
            f"expected two (B, 3, H, W) batches of the same shape, got {tuple(x.shape)}, {tuple(rec.shape)}"
        )
    cx, cr = mean_chroma(x), mean_chroma(rec)
    err = float((cr - cx).abs().mean())
    dx, dr = cx - cx.mean(0), cr - cr.mean(0)
    var = float((dx * dx).sum())
    gain = float((dx * dr).sum()) / var if var > 1e-12 else math.nan
    return {"chroma_gain": gain, "chroma_err": err}


# ---- no-reference, offline: NIQE and BRISQUE -----------------------------------------------------------------------
NIQE_PARAMS_ENV = "VARSR_NIQE_PARAMS"  # overrides where the pristine-model parameters are read from
NIQE_PARAMS_FILE = "niqe_pris_params.npz"
# basicsr-1.4.2.tar.gz (PyPI sdist) and the npz inside it; infra/scripts/fetch_niqe_params.sh checks both
BASICSR_SDIST_SHA256 = "b89b595a87ef964cda9913b4d99380ddb6554c965577c0c10cb7b78e31301e87"
NIQE_PARAMS_SHA256 = "2a7c182a68c9e7f1b2e2e5ec723279d6f65d912b6fcaf37eb2bf03d7367c4296"
NIQE_BLOCK = 96  # patch side at full scale (the published NIQE's P = 96)


class MetricUnavailable(RuntimeError):
    """A metric's parameters or package are absent; the message says in one line what is missing and how to get it."""


def eval_cache_dir() -> Path:
    """Where set-up puts metric parameters: ``<venv>/share/varsr/eval`` (tied to the environment, not the checkout)."""
    import sys

    return Path(sys.prefix) / "share" / "varsr" / "eval"


def niqe_params_path() -> Path:
    """``$VARSR_NIQE_PARAMS``, else ``eval_cache_dir()/niqe_pris_params.npz``."""
    import os

    return Path(os.environ.get(NIQE_PARAMS_ENV) or eval_cache_dir() / NIQE_PARAMS_FILE)


_NIQE_CACHE: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def load_niqe_params(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mu (36,), cov (36, 36), gaussian window (7, 7)) of the pristine model, checked against the recorded sha256."""
    import hashlib

    p = Path(path) if path else niqe_params_path()
    key = str(p)
    if key not in _NIQE_CACHE:
        if not p.is_file():
            raise MetricUnavailable(
                f"niqe: pristine-model parameters {p} are missing; run infra/scripts/setup.sh "
                f"(it fetches basicsr==1.4.2's sdist and extracts {NIQE_PARAMS_FILE})"
            )
        raw = p.read_bytes()
        if hashlib.sha256(raw).hexdigest() != NIQE_PARAMS_SHA256:
            raise MetricUnavailable(f"niqe: {p} is not BasicSR 1.4.2's {NIQE_PARAMS_FILE} (sha256 differs)")
        with np.load(p, allow_pickle=False) as d:
            _NIQE_CACHE[key] = (
                d["mu_pris_param"].reshape(-1).astype(np.float64),
                d["cov_pris_param"].astype(np.float64),
                d["gaussian_window"].astype(np.float64),
            )
    return _NIQE_CACHE[key]


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``imresize`` 'bicubic')."""
    ax = np.abs(x)
    return np.where(
        ax <= 1, 1.5 * ax**3 - 2.5 * ax**2 + 1, np.where(ax <= 2, -0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2, 0.0)
    )


def _imresize_matrix(n_in: int, scale: float) -> np.ndarray:
    """(n_out, n_in) weights of MATLAB's antialiased bicubic ``imresize`` along one axis (symmetric borders)."""
    n_out = int(math.ceil(n_in * scale))
    kscale = min(scale, 1.0)  # antialiasing: a stretched kernel when shrinking
    width = 4.0 / kscale
    x = np.arange(1, n_out + 1, dtype=np.float64) / scale + 0.5 * (1 - 1 / scale)  # 1-based input coordinates
    left = np.floor(x - width / 2)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]
    w = kscale * _cubic(kscale * (x[:, None] - idx))
    w = w / w.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(n_in), np.arange(n_in)[::-1]])
    cols = mirror[np.mod(idx.astype(np.int64) - 1, 2 * n_in)]
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.repeat(np.arange(n_out), taps), cols.reshape(-1)), w.reshape(-1))
    return m


def imresize_half(img: np.ndarray) -> np.ndarray:
    """MATLAB ``imresize(img, 0.5)`` (bicubic, antialiased) of an HxW float image, as the published NIQE uses."""
    h, w = img.shape
    return _imresize_matrix(h, 0.5) @ img @ _imresize_matrix(w, 0.5).T


_GAM = np.arange(0.2, 10.001, 0.001)  # the AGGD shape grid the published code searches
_R_GAM = None


def _aggd(x: np.ndarray) -> tuple[float, float, float]:
    """Asymmetric generalised Gaussian fit by moment matching: (shape alpha, left scale, right scale)."""
    from scipy.special import gamma

    global _R_GAM
    if _R_GAM is None:
        _R_GAM = gamma(2 / _GAM) ** 2 / (gamma(1 / _GAM) * gamma(3 / _GAM))
    x = x.reshape(-1)
    neg, pos = x[x < 0], x[x > 0]
    lstd = math.sqrt(float(np.mean(neg**2))) if neg.size else math.nan
    rstd = math.sqrt(float(np.mean(pos**2))) if pos.size else math.nan
    g = lstd / rstd
    rhat = float(np.mean(np.abs(x))) ** 2 / float(np.mean(x**2))
    rhatn = rhat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    alpha = float(_GAM[np.argmin((_R_GAM - rhatn) ** 2)])
    k = math.sqrt(math.gamma(1 / alpha) / math.gamma(3 / alpha))
    return alpha, lstd * k, rstd * k


def _niqe_block_features(b: np.ndarray) -> list[float]:
    """18 features of one MSCN patch: the AGGD fit of the coefficients (alpha, mean scale) and, for each of the four
    neighbour products (circular shifts (0, 1), (1, 0), (1, 1), (1, -1) as in the published code), alpha, mean and
    the left and right scales."""
    from scipy.special import gamma

    a, bl, br = _aggd(b)
    feats = [a, (bl + br) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a, bl, br = _aggd(b * np.roll(b, shift, axis=(0, 1)))
        mean = (br - bl) * gamma(2 / a) / gamma(1 / a)
        feats += [a, float(mean), bl, br]
    return feats


def _mscn(y: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients (local Gaussian statistics, edge-replicating borders)."""
    from scipy.ndimage import convolve

    mu = convolve(y, window, mode="nearest")
    sigma = np.sqrt(np.abs(convolve(y * y, window, mode="nearest") - mu * mu))
    return (y - mu) / (sigma + 1.0)


def niqe_y(y: np.ndarray, params: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> float:
    """NIQE of an HxW luminance image in [0, 255] (the image cut to whole 96-px patches, each described at full and
    half scale; the distance of their multivariate Gaussian to the pristine one). Lower = more natural."""
    mu_p, cov_p, window = params or load_niqe_params()
    nh, nw = y.shape[0] // NIQE_BLOCK, y.shape[1] // NIQE_BLOCK
    if nh == 0 or nw == 0:
        raise ValueError(f"NIQE needs an image of at least {NIQE_BLOCK}x{NIQE_BLOCK} pixels, got {y.shape[::-1]}")
    img = np.asarray(y, dtype=np.float64)[: nh * NIQE_BLOCK, : nw * NIQE_BLOCK]
    per_scale = []
    for scale in (1, 2):
        m = _mscn(img, window)
        s = NIQE_BLOCK // scale
        per_scale.append(
            [_niqe_block_features(m[i * s : (i + 1) * s, j * s : (j + 1) * s]) for i in range(nh) for j in range(nw)]
        )
        if scale == 1:
            img = imresize_half(img / 255.0) * 255.0
    feats = np.concatenate([np.asarray(f) for f in per_scale], axis=1)  # (blocks, 36)
    mu_d = np.nanmean(feats, axis=0)
    clean = feats[~np.isnan(feats).any(axis=1)]
    cov_d = np.cov(clean, rowvar=False) if len(clean) > 1 else np.zeros_like(cov_p)
    d = mu_p - mu_d
    return float(math.sqrt(float(d @ np.linalg.pinv((cov_p + cov_d) / 2) @ d)))


def niqe(rgb: np.ndarray | Image.Image, crop_border: int = 0) -> float:
    """NIQE of an RGB image (HxWx3 uint8), on its BT.601 Y rounded to 8-bit levels as the published code and the
    research code's Table 1 do; ``crop_border`` pixels cut from each side first (0 = none). Lower = better."""
    y = np.round(rgb_to_y(as_float_rgb(rgb)) * 255.0)
    if crop_border:
        y = y[crop_border:-crop_border, crop_border:-crop_border]
    return niqe_y(y)


# the files the brisque package ships for its SVR (LIVE-trained), checked before use: the scaling file is a pickle
BRISQUE_MODEL_SHA256 = {
    "svm.txt": "19526fb799c4c7992ccc109fcfecddb25976ba024b194cd3ee275d27e8909c8d",
    "normalize.pickle": "a91753fe7088efe0b40e4d091315201fdb067966fc6785cf465e1eab060acda9",
}
_BRISQUE: list = []


def brisque_model():
    """(package model object, libsvm model) from the ``brisque`` package's shipped files (no download)."""
    if not _BRISQUE:
        import hashlib
        import os
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the package imports scipy's deprecated ndimage.filters namespace
                from brisque.brisque import BRISQUE
                from brisque.models import MODEL_PATH
        except ImportError as e:
            raise MetricUnavailable(
                f"brisque: the brisque package is not installed ({e}); run infra/scripts/setup.sh"
            ) from None
        for name, want in BRISQUE_MODEL_SHA256.items():
            with open(os.path.join(MODEL_PATH, name), "rb") as f:
                got = hashlib.sha256(f.read()).hexdigest()
            if got != want:
                raise MetricUnavailable(f"brisque: {name} of the installed brisque package is not the pinned one")
        _BRISQUE.append(BRISQUE(url=False))
    return _BRISQUE[0]


def brisque(rgb: np.ndarray | Image.Image) -> float:
    """BRISQUE of an RGB image (HxWx3 uint8): the ``brisque`` package's 36 features (MSCN and neighbour-product AGGD
    fits on the grey image at full and half scale) scored by its shipped SVR. Lower = better (about 0-100)."""
    import cv2
    import skimage.color

    model = brisque_model()
    a = np.asarray(rgb.convert("RGB") if isinstance(rgb, Image.Image) else rgb)
    grey = skimage.color.rgb2gray(a[..., :3])
    half = cv2.resize(grey, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
    feats = np.concatenate([model.calculate_brisque_features(g, kernel_size=7, sigma=7 / 6) for g in (grey, half)])
    # the package returns some features as 1-element arrays, which numpy 2 no longer converts with float()
    flat = np.array([float(np.ravel(f)[0]) for f in feats], dtype=np.float64)
    return float(model.calculate_image_quality_score(flat))
