"""Resize operators of the degradation, and the per-sample random resize-back of the training reader.

`torch_resize` reproduces PyTorch's `F.interpolate` (no antialias) on an (H, W, C) float32 array, in NumPy:

- output size: given, or floor(input * scale_factor);
- source coordinate of output pixel i: `scale * (i + 0.5) - 0.5` with `scale = 1 / scale_factor` when a scale
  factor is given (as `F.interpolate(x, scale_factor=s)` does), else `input / output` (align_corners=False);
  so a resize by a scale factor is not the same as a resize to the resulting size unless input * s is an integer;
- bilinear: two taps, negative source coordinates clamped to 0, the right neighbour clamped to the last pixel;
- bicubic: Keys' cubic convolution with a = -0.75 on the four neighbours floor(src) - 1 .. floor(src) + 2 (indices
  clamped to the image), source coordinates not clamped;
- area: adaptive average pooling, i.e. output i averages input [floor(i in/out), ceil((i+1) in/out)) whatever the
  scale factor (F.interpolate's "area" mode is `adaptive_avg_pool2d`);
- the source coordinate is computed in float32 like PyTorch's CPU kernels;
- bilinear leaves an axis whose size does not change untouched (PyTorch's kernel skips it), even for a scale
  factor other than 1; bicubic does not (it maps that axis with 1/s too).
Rows and columns are resized separately (all three modes are separable), each as a product with a sparse matrix
holding a few weights per output pixel.

`opencv_resize` is the earlier backend: cv2.resize to the output size with INTER_AREA / INTER_LINEAR /
INTER_CUBIC, which maps pixel centres with the input/output size ratio and averages areas differently from
adaptive pooling for non-integer factors.

`random_resize_back` is what the reference's training dataloader does to every LR after the degradation: it
resizes the LR back to the HR size with an interpolation mode drawn uniformly per sample from area / bilinear /
bicubic (`F.interpolate(lr, size=hr_size, mode=mode)`), then quantises to 8 bits.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache
from typing import Sequence

import cv2
import numpy as np
import scipy.sparse as sp

MODES = ("area", "bilinear", "bicubic")
RESIZE_BACK_MODES = MODES  # the reference draws uniformly from these when resizing the LR back
_CV2 = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
_A = -0.75  # PyTorch's bicubic coefficient


def output_size(in_size: int, scale_factor: float) -> int:
    """F.interpolate's output size for a scale factor: floor(in * s), computed in double."""
    return max(1, int(math.floor(float(in_size) * float(scale_factor))))


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution weights of the taps at offsets -1, 0, 1, 2 for fractional positions t."""
    a = np.float32(_A)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)


@lru_cache(maxsize=512)
def _taps(in_size: int, out_size: int, mode: str, scale_factor: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights), each (out_size, K): output i = sum_k weights[i, k] * input[indices[i, k]]."""
    dst = np.arange(out_size, dtype=np.float32)
    if mode == "area":
        i = np.arange(out_size, dtype=np.int64)
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)  # ceil
        k = int((end - start).max())
        idx = np.minimum(start[:, None] + np.arange(k)[None, :], in_size - 1)
        w = ((start[:, None] + np.arange(k)[None, :]) < end[:, None]).astype(np.float32)
        return idx, (w / (end - start)[:, None].astype(np.float32)).astype(np.float32)
    if scale_factor is not None and scale_factor > 0:
        scale = np.float32(1.0 / scale_factor)
    else:
        scale = np.float32(in_size) / np.float32(out_size)
    src = scale * (dst + np.float32(0.5)) - np.float32(0.5)
    if mode == "bilinear":
        src = np.maximum(src, np.float32(0.0))
        i0 = np.minimum(src.astype(np.int64), in_size - 1)
        lam = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
        i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
        return np.stack([i0, i1], 1), np.stack([1 - lam, lam], 1).astype(np.float32)
    if mode == "bicubic":
        i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
        t = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
        idx = np.clip(i0[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
        return idx, _cubic_weights(t).astype(np.float32)
    raise ValueError(f"unknown resize mode {mode!r}; expected one of {MODES}")


@lru_cache(maxsize=512)
def _matrix(in_size: int, out_size: int, mode: str, scale_factor: float | None) -> sp.csr_matrix:
    """The 1-D resampling as a sparse (out_size, in_size) matrix (a few non-zeros per row)."""
    idx, w = _taps(in_size, out_size, mode, scale_factor)
    indptr = np.arange(0, idx.size + 1, idx.shape[1])
    return sp.csr_matrix((w.ravel(), idx.ravel(), indptr), shape=(out_size, in_size))


def _transpose(x: np.ndarray) -> np.ndarray:
    """Swap the first two axes into a contiguous array (cv2.transpose handles up to 4 channels fast)."""
    if x.ndim == 2 or x.shape[2] <= 4:
        return cv2.transpose(x)
    return np.ascontiguousarray(x.swapaxes(0, 1))


def _resize_rows(x: np.ndarray, m: sp.csr_matrix) -> np.ndarray:
    return np.asarray(m @ x.reshape(x.shape[0], -1), dtype=np.float32).reshape((m.shape[0],) + x.shape[1:])


def torch_resize(
    img: np.ndarray, mode: str, size: Sequence[int] | None = None, scale_factor: float | None = None
) -> np.ndarray:
    """PyTorch `F.interpolate(x, size=size | scale_factor=s, mode=mode)` (align_corners=False, no antialias) of an
    (H, W[, C]) float32 array. Exactly one of `size` (H, W) and `scale_factor` (both axes) is given."""
    if mode not in MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {MODES}")
    if (size is None) == (scale_factor is None):
        raise ValueError("give exactly one of size and scale_factor")
    h, w = img.shape[:2]
    if size is not None:
        oh, ow, sf = max(1, int(size[0])), max(1, int(size[1])), None
    elif scale_factor is not None:
        sf = float(scale_factor)
        oh, ow = output_size(h, sf), output_size(w, sf)
    # an axis whose size does not change is the identity when mapped with in/out (size given, or s == 1, or
    # area), and PyTorch's bilinear kernel skips such an axis even for a scale factor; bicubic maps it with 1/s
    keep_h = oh == h and (sf is None or sf == 1.0 or mode != "bicubic")
    keep_w = ow == w and (sf is None or sf == 1.0 or mode != "bicubic")
    x = np.ascontiguousarray(img, dtype=np.float32)
    if not keep_h:
        x = _resize_rows(x, _matrix(h, oh, mode, sf))
    if not keep_w:
        x = _transpose(_resize_rows(_transpose(x), _matrix(w, ow, mode, sf)))
    return x


def opencv_resize(img: np.ndarray, mode: str, size: Sequence[int]) -> np.ndarray:
    """cv2.resize to `size` (H, W) with INTER_AREA / INTER_LINEAR / INTER_CUBIC (size-ratio pixel mapping)."""
    h, w = max(1, int(size[0])), max(1, int(size[1]))
    if (h, w) == img.shape[:2]:
        return img
    return cv2.resize(img, (w, h), interpolation=_CV2[mode])


# --------------------------------------------------------------------------------------- resize-back (reader)
def pick_resize_back_mode(
    rng: random.Random | np.random.Generator | int, modes: Sequence[str] = RESIZE_BACK_MODES
) -> str:
    """One mode drawn uniformly from `modes` (the reference: uniform over area / bilinear / bicubic per sample).
    `rng`: a `random.Random`, a NumPy Generator, or an int seed (a fresh PCG64 stream)."""
    if not modes:
        raise ValueError("resize-back needs at least one mode")
    if isinstance(rng, (int, np.integer)):
        rng = np.random.default_rng(int(rng))
    i = rng.randrange(len(modes)) if isinstance(rng, random.Random) else int(rng.integers(len(modes)))
    mode = str(modes[i])
    if mode not in MODES:
        raise ValueError(f"unknown resize-back mode {mode!r}; expected one of {MODES}")
    return mode


def resize_back(lr: np.ndarray, size_hw: Sequence[int], mode: str):
    """LR uint8 (h, w, 3) -> torch float32 tensor (3, H, W) in [0, 1]: `F.interpolate(size=size_hw, mode=mode)`
    semantics, then 8-bit quantised (clamp(round(255 x), 0, 255) / 255) as the reference does after resizing back.
    Deterministic: replays a recorded mode."""
    import torch

    x = np.asarray(lr, dtype=np.float32) / np.float32(255.0)
    y = torch_resize(x, mode, size=(int(size_hw[0]), int(size_hw[1])))
    y = np.clip(np.rint(y * np.float32(255.0)), 0, 255) / np.float32(255.0)
    return torch.from_numpy(np.ascontiguousarray(y.transpose(2, 0, 1), dtype=np.float32))


def random_resize_back(
    lr: np.ndarray,
    size_hw: Sequence[int],
    rng: random.Random | np.random.Generator | int,
    modes: Sequence[str] = RESIZE_BACK_MODES,
):
    """The reference's training-time resize-back of one sample: draw a mode (`pick_resize_back_mode`), resize the
    uint8 LR to `size_hw` (`resize_back`). Returns (tensor (3, H, W) float32 in [0, 1], {"mode": mode}); the
    dict is the parameter to record with the sample."""
    mode = pick_resize_back_mode(rng, modes)
    return resize_back(lr, size_hw, mode), {"mode": mode}
