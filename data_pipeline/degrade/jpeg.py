"""JPEG compression operators of the degradation: the reference's tensor JPEG, reproduced in NumPy, and libjpeg.

`diff_jpeg(img, quality)` reproduces the JPEG that the reference degradation applies in torch (the "DiffJPEG"
module, used in its non-differentiable mode) at a float quality. Written from the JPEG baseline algorithm with
the reference's particular choices:

1. zero-pad (black, in RGB) on the bottom/right to a multiple of 16 in both directions; crop back at the end;
2. x 255, RGB -> YCbCr with the BT.601 full-range matrix (Y = .299 R + .587 G + .114 B; Cb, Cr offset by 128);
   no rounding to 8 bits anywhere;
3. 4:2:0: Cb and Cr averaged over 2x2 blocks;
4. each plane cut into 8x8 blocks, level-shifted by -128, 2-D DCT-II with the orthonormal scaling
   F(u, v) = 1/4 a(u) a(v) sum_xy f(x, y) cos((2x+1) u pi/16) cos((2y+1) v pi/16), a(0) = 1/sqrt(2), else 1
   (u indexes block rows, v block columns);
5. quantisation by the standard tables (JPEG Annex K: luminance, chrominance) times a quality factor
   f = (200 - 2 q) / 100 for q >= 50, f = (5000 / q) / 100 below; the scaled table is used as a float, neither
   rounded nor clamped to [1, 255] (libjpeg does both). The reference indexes the tables transposed: the entry of
   block row u, column v is the standard table's entry at row v, column u (this only matters for the luminance
   table; the chrominance table is symmetric);
6. rounding of coefficient / table to the nearest integer, ties to even (the module's non-differentiable mode);
7. the inverse: coefficient x table, inverse DCT, +128, chroma upsampled by 2x2 replication, YCbCr -> RGB with
   R = Y + 1.402 (Cr-128), G = Y - .344136 (Cb-128) - .714136 (Cr-128), B = Y + 1.772 (Cb-128),
   clamped to [0, 255], / 255.

Arithmetic is float32 like the reference (the quality factor too), so results agree with it up to float rounding;
a coefficient whose quotient lies within float error of a rounding boundary may round the other way.

`lib_jpeg(img, quality)` is a real libjpeg encode + decode (OpenCV) of the 8-bit-rounded image at an integer
quality: genuine JPEG artefacts (integer tables, libjpeg's own colour conversion and chroma filtering).
"""

from __future__ import annotations

import cv2
import numpy as np

# JPEG Annex K.1 / K.2, rows = vertical frequency, as printed in the standard
STD_LUMINANCE = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.float32,
)
STD_CHROMINANCE = np.full((8, 8), 99, dtype=np.float32)
STD_CHROMINANCE[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]

_RGB2YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=np.float32)
_YCC2RGB = np.array([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]], dtype=np.float32)
_OFFSET = np.array([0.0, 128.0, 128.0], dtype=np.float32)
_RGB2YCC_AFFINE = np.hstack([_RGB2YCC, _OFFSET[:, None]])  # ycc = M rgb + offset
_YCC2RGB_AFFINE = np.hstack([_YCC2RGB, -(_YCC2RGB @ _OFFSET)[:, None]])  # rgb = M' (ycc - offset)


def _dct_matrix() -> np.ndarray:
    """C[u, x] = a(u)/2 cos((2x+1) u pi / 16): the block DCT is C B C^T and its inverse C^T F C."""
    u, x = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    a = np.where(u == 0, 1.0 / np.sqrt(2.0), 1.0)
    return (0.5 * a * np.cos((2 * x + 1) * u * np.pi / 16)).astype(np.float32)


_C = _dct_matrix()


def quality_factor(quality: float) -> np.float32:
    """Table multiplier of a (float) quality, in float32 as the reference computes it."""
    q = np.float32(quality)
    f = np.float32(5000.0) / q if q < 50 else np.float32(200.0) - q * np.float32(2.0)
    return np.float32(f / np.float32(100.0))


def _block_dct_quantise_roundtrip(plane: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(H, W) float32 plane, H and W multiples of 8 -> the plane after DCT, quantisation by `table`, inverse.

    Block-wise C B C^T as stacks of small matrix products (C on every 8-row slab, C^T on every run of 8 columns),
    which BLAS runs single-threaded: one large product would start BLAS threads that cost more than they save."""
    h, w = plane.shape
    x = np.matmul(_C, (plane - np.float32(128.0)).reshape(h // 8, 8, w))  # (a, u, W): rows transformed
    coef = np.matmul(x.reshape(h, w // 8, 8), _C.T).reshape(h // 8, 8, w // 8, 8)  # (a, u, b, v)
    t = table[None, :, None, :]
    coef /= t
    np.rint(coef, out=coef)  # ties to even, like torch.round
    coef *= t
    x = np.matmul(coef.reshape(h, w // 8, 8), _C)  # columns back
    return np.matmul(_C.T, x.reshape(h // 8, 8, w)).reshape(h, w) + np.float32(128.0)  # rows back


def diff_jpeg(img: np.ndarray, quality: float) -> np.ndarray:
    """float32 RGB (H, W, 3) in [0, 1] -> its JPEG reconstruction at `quality` (float), float32 in [0, 1]."""
    h, w = img.shape[:2]
    ph, pw = -h % 16, -w % 16
    x = np.asarray(img, dtype=np.float32) * np.float32(255.0)
    if ph or pw:
        x = np.pad(x, ((0, ph), (0, pw), (0, 0)))
    f = quality_factor(quality)
    ytab, ctab = STD_LUMINANCE.T * f, STD_CHROMINANCE.T * f  # transposed, as the reference
    ycc = cv2.transform(x, _RGB2YCC_AFFINE)
    out = np.empty_like(ycc)
    out[..., 0] = _block_dct_quantise_roundtrip(np.ascontiguousarray(ycc[..., 0]), ytab)
    chroma = (ycc[0::2, 0::2, 1:] + ycc[1::2, 0::2, 1:] + ycc[0::2, 1::2, 1:] + ycc[1::2, 1::2, 1:]) * np.float32(0.25)
    for c in (0, 1):
        rec = _block_dct_quantise_roundtrip(np.ascontiguousarray(chroma[..., c]), ctab)
        for dy in (0, 1):
            for dx in (0, 1):
                out[dy::2, dx::2, 1 + c] = rec  # 2x2 replication
    rgb = cv2.transform(out[:h, :w], _YCC2RGB_AFFINE)
    return np.clip(rgb, 0.0, 255.0) / np.float32(255.0)


def lib_jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """libjpeg encode + decode of the 8-bit-rounded image at an integer quality; float32 RGB in [0, 1]."""
    u8 = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(u8, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    dec = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if dec is None:
        raise RuntimeError("JPEG decoding failed")
    return cv2.cvtColor(dec, cv2.COLOR_BGR2RGB).astype(np.float32) / np.float32(255)
