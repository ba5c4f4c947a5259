"""Built-in no-reference scorers, the built-in embedder, and learned-IQA plug-ins.

Built-ins run on a thumbnail (long side <= `thumb_size`) of the decoded RGB image:
- `sharpness`: variance of the Laplacian of the grey image (8-bit units); `quality` = log(1 + sharpness), a crude
  quality proxy used for the negative rule when no learned IQA score is available;
- `noise`: Immerkaer's fast noise sigma estimate (8-bit units);
- `colourfulness`: Hasler & Suesstrunk's metric; `flatness`: share of 8x8 blocks with std < 2 (8-bit units);
- `blockiness`: mean |step| across 8-px block borders / mean |step| inside blocks (~1 clean, >1 JPEG blocky);
- `phash`: 64-bit DCT perceptual hash (signed int64) for near-duplicate detection.

Learned IQA (MUSIQ, CLIP-IQA, MANIQA, aesthetics — the paper's filters) are plug-ins: a TorchScript module in the
weights cache (`{weights_dir}/{name}.pt`) mapping (B,3,S,S) float [0,1] to (B,) scores. Absent weights -> the
scorer is skipped with one notice, and its column is absent from the table.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Callable

import cv2
import numpy as np

from .config import IQAPluginConfig

log = logging.getLogger(__name__)

BUILTIN_SCORES = ("sharpness", "quality", "noise", "colourfulness", "flatness", "blockiness")
EMBED_DIM = 72 + 128 + 48


def thumbnail(rgb: np.ndarray, size: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = size / max(h, w)
    if s >= 1:
        return rgb
    return cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def _gray(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)


def sharpness(gray: np.ndarray) -> float:
    return float(cv2.Laplacian(gray, cv2.CV_32F, ksize=1).var())


def noise_sigma(gray: np.ndarray) -> float:
    """Immerkaer (1996): sigma = sqrt(pi/2) / (6 (W-2)(H-2)) * sum |I * M|."""
    h, w = gray.shape
    if h < 3 or w < 3:
        return 0.0
    m = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
    r = cv2.filter2D(gray, cv2.CV_32F, m)[1:-1, 1:-1]
    return float(np.sqrt(np.pi / 2) * np.abs(r).sum(dtype=np.float64) / (6.0 * (w - 2) * (h - 2)))


def colourfulness(rgb: np.ndarray) -> float:
    a = rgb.astype(np.float32)
    rg = a[..., 0] - a[..., 1]
    yb = 0.5 * (a[..., 0] + a[..., 1]) - a[..., 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def flatness(gray: np.ndarray, block: int = 8, thr: float = 2.0) -> float:
    h, w = (gray.shape[0] // block) * block, (gray.shape[1] // block) * block
    if h == 0 or w == 0:
        return 1.0
    b = gray[:h, :w].reshape(h // block, block, w // block, block)
    return float((b.std(axis=(1, 3)) < thr).mean())


def blockiness(gray: np.ndarray) -> float:
    """Ratio of mean absolute steps on 8-px block borders to steps inside blocks (both directions)."""
    ratios = []
    for g in (gray, gray.T):
        d = np.abs(np.diff(g, axis=1))
        if d.shape[1] < 16:
            continue
        cols = np.arange(d.shape[1])
        border = d[:, cols % 8 == 7].mean()
        inner = d[:, cols % 8 != 7].mean()
        ratios.append(border / (inner + 1e-6))
    return float(np.mean(ratios)) if ratios else 1.0


def phash(gray: np.ndarray) -> int:
    """64-bit perceptual hash: DCT of the 32x32 grey image, top-left 8x8 (without DC) vs. its median."""
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA)
    d = cv2.dct(small)[:8, :8].flatten()
    bits = d > np.median(d[1:])
    v = 0
    for b in bits:
        v = (v << 1) | int(b)
    return int(np.int64(np.uint64(v)))  # stored as signed int64


def builtin_scores(rgb: np.ndarray) -> dict[str, float | int]:
    g = _gray(rgb)
    s = sharpness(g)
    return {
        "sharpness": s,
        "quality": float(np.log1p(s)),
        "noise": noise_sigma(g),
        "colourfulness": colourfulness(rgb),
        "flatness": flatness(g),
        "blockiness": blockiness(g),
        "phash": phash(g),
    }


def builtin_embed(rgb: np.ndarray) -> np.ndarray:
    """No-download semantic-ish embedding: HSV colour histogram (72) + 4x4-cell gradient-orientation
    histograms (128) + 4x4 Lab layout (48); each part L2-normalised, then the whole."""
    small = cv2.resize(rgb, (64, 64), interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], None, [8, 3, 3], [0, 180, 0, 256, 0, 256]).flatten()
    g = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32)
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    mag = np.hypot(gx, gy)
    ori = ((np.arctan2(gy, gx) % np.pi) / np.pi * 8).astype(np.int64).clip(0, 7)
    cell = np.arange(64) // 16
    idx = (cell[:, None] * 4 + cell[None, :]) * 8 + ori
    hog = np.bincount(idx.ravel(), weights=mag.ravel(), minlength=128)
    lab = cv2.resize(cv2.cvtColor(small, cv2.COLOR_RGB2LAB), (4, 4), interpolation=cv2.INTER_AREA)
    parts = [hist.astype(np.float64), hog, lab.astype(np.float64).ravel()]
    v = np.concatenate([p / (np.linalg.norm(p) + 1e-8) for p in parts])
    return (v / (np.linalg.norm(v) + 1e-8)).astype(np.float32)


def load_embedder(name: str) -> Callable[[list[np.ndarray]], np.ndarray]:
    """`builtin` or `module:function` taking a list of RGB uint8 images and returning (N, D) floats."""
    if name == "builtin":
        return lambda imgs: np.stack([builtin_embed(i) for i in imgs]) if imgs else np.zeros((0, EMBED_DIM), np.float32)
    mod, _, fn = name.partition(":")
    return getattr(importlib.import_module(mod), fn)


class IQAPlugin:
    """A learned IQA scorer loaded from a TorchScript file; `available` is False when the weights are absent."""

    def __init__(self, cfg: IQAPluginConfig, weights_dir: str, device: str = "cpu"):
        self.name = cfg.name
        self.size = cfg.input_size
        self.path = os.path.expanduser(cfg.file or os.path.join(weights_dir, f"{cfg.name}.pt"))
        self.device = device
        self.model = None
        if os.path.isfile(self.path):
            import torch

            self.model = torch.jit.load(self.path, map_location=device).eval()

    @property
    def available(self) -> bool:
        return self.model is not None

    def notice(self) -> str:
        return (
            f"IQA scorer '{self.name}' skipped: no weights at {self.path} "
            f"(export a TorchScript model mapping (B,3,{self.size},{self.size}) in [0,1] to (B,) there)"
        )

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        import torch

        s = self.size
        batch = []
        for im in images:
            h, w = im.shape[:2]
            k = s / min(h, w)
            r = cv2.resize(im, (max(s, round(w * k)), max(s, round(h * k))), interpolation=cv2.INTER_AREA)
            y0, x0 = (r.shape[0] - s) // 2, (r.shape[1] - s) // 2
            batch.append(r[y0 : y0 + s, x0 : x0 + s])
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float().div(255).to(self.device)
        assert self.model is not None  # score() runs once available() has loaded it
        with torch.no_grad():
            out = self.model(x)
        return out.reshape(len(images)).float().cpu().numpy()


def iqa_status(plugins: list[IQAPluginConfig], weights_dir: str) -> dict[str, str]:
    """Which learned IQA scorers will run ('ok') and which are skipped (the notice)."""
    out = {}
    for p in plugins:
        path = os.path.expanduser(p.file or os.path.join(weights_dir, f"{p.name}.pt"))
        out[p.name] = "ok" if os.path.isfile(path) else f"skipped: no weights at {path}"
    return out
