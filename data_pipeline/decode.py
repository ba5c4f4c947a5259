"""Safe decoding: bytes -> RGB uint8 (H, W, 3) or a clear reason.

Limits on bytes and pixels are checked from the header before any pixel is decoded (decompression bombs).
EXIF orientation is applied; every PIL mode ends as RGB: L/1/I;16/I/F (16-bit scaled to 8-bit), P (with
transparency -> alpha), LA/RGBA/PA composited on `background`, CMYK converted, animated -> first frame.
Outcomes: `ok`, `rejected` (policy: empty, not an image, too big, too small) or `failed` (decoder error, e.g.
truncated data).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import DecodeConfig

# PIL's global settings are left alone (other components share the process): our own pixel limit is checked from
# the header, and PIL's DecompressionBombError (above 2 x Image.MAX_IMAGE_PIXELS) is reported the same way.


@dataclass
class Decoded:
    status: str  # ok | rejected | failed
    reason: str = ""  # machine-readable reason for rejected/failed
    error: str = ""  # human-readable detail
    image: np.ndarray | None = None  # (H, W, 3) uint8 RGB
    info: dict = field(default_factory=dict)


def _to_rgb(im: Image.Image, background: tuple[int, int, int]) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im).astype(np.float64)
        if mode == "F":
            a = a * 255.0 if a.max(initial=0) <= 1.0 else a
        elif a.max(initial=0) > 255:
            a = a / 257.0  # 16-bit full range -> 8-bit
        g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        a = np.asarray(im).astype(np.float32)
        alpha = a[:, :, 3:4] / 255.0
        bg = np.asarray(background, np.float32)[None, None, :]
        rgb = a[:, :, :3] * alpha + bg * (1.0 - alpha)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX
    return np.ascontiguousarray(np.asarray(im))


def probe(data: bytes, cfg: DecodeConfig | None = None) -> Decoded:
    """Header-only checks; returns status ok with info (format, mode, size) or the rejection."""
    cfg = cfg or DecodeConfig()
    if len(data) == 0:
        return Decoded("rejected", "empty_file", "zero bytes")
    if len(data) > cfg.max_bytes:
        return Decoded("rejected", "too_many_bytes", f"more than {cfg.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return Decoded("rejected", "not_an_image", "no image format recognised")
    except Image.DecompressionBombError as e:
        return Decoded("rejected", "decompression_bomb", str(e))
    except Exception as e:  # noqa: BLE001 - a broken header is a failed decode
        return Decoded("failed", "decode_error", f"{type(e).__name__}: {e}")
    w, h = im.size
    info = {
        "format": im.format,
        "mode": im.mode,
        "width": w,
        "height": h,
        "frames": int(getattr(im, "n_frames", 1) or 1),
    }
    if w * h > cfg.max_pixels:
        return Decoded(
            "rejected", "decompression_bomb", f"{w}x{h} = {w * h} pixels > max_pixels {cfg.max_pixels}", info=info
        )
    if min(w, h) < cfg.min_side:
        return Decoded("rejected", "too_small", f"{w}x{h} below min_side {cfg.min_side}", info=info)
    return Decoded("ok", info={**info, "_im": im})  # "_im": the opened (not yet decoded) image


def decode_image(data: bytes, cfg: DecodeConfig | None = None, draft_to: int | None = None) -> Decoded:
    """Decode to RGB uint8. `draft_to` lets JPEG decode at a reduced size >= draft_to (fast scoring)."""
    cfg = cfg or DecodeConfig()
    p = probe(data, cfg)
    if p.status != "ok":
        return p
    im: Image.Image = p.info.pop("_im")
    info = p.info
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if info["frames"] > 1:
                im.seek(0)
            if draft_to and im.format == "JPEG":
                im.draft(im.mode, (draft_to, draft_to))
            im.load()
            exif_orientation = 1
            try:
                exif_orientation = int(im.getexif().get(0x0112, 1))
            except Exception:  # noqa: BLE001 - unreadable EXIF: keep orientation as is
                pass
            if exif_orientation != 1:
                im = ImageOps.exif_transpose(im)
            rgb = _to_rgb(im, cfg.background)
    except Image.DecompressionBombError as e:
        return Decoded("rejected", "decompression_bomb", str(e), info=info)
    except Exception as e:  # noqa: BLE001 - truncated / corrupt data
        msg = f"{type(e).__name__}: {e}"
        reason = "truncated" if "truncat" in msg.lower() or "broken data stream" in msg.lower() else "decode_error"
        return Decoded("failed", reason, msg, info=info)
    if exif_orientation in (5, 6, 7, 8):
        info["width"], info["height"] = info["height"], info["width"]
    info["exif_orientation"] = exif_orientation
    return Decoded("ok", image=rgb, info=info)
