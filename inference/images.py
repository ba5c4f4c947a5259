"""Safe image input/output for inference: any PIL mode, EXIF orientation, size limits checked before decoding.

Every entry point (Python API, CLI, served endpoint) funnels its input through :func:`to_rgb_image` so that grey,
palette, alpha, CMYK, 16-bit and EXIF-rotated inputs all become the same thing: an 8-bit RGB ``PIL.Image``.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor, str, Path, bytes]


class ImageInputError(ValueError):
    """The input is not a usable image (unreadable, not an image, too large...). The message says which."""


def check_pixels(width: int, height: int, max_pixels: int | None, what: str = "input") -> None:
    """Reject an image whose pixel count exceeds ``max_pixels`` (None = no limit)."""
    if width <= 0 or height <= 0:
        raise ImageInputError(f"{what} image has an empty size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageInputError(
            f"{what} image is too large: {width}x{height} = {width * height} pixels > limit {max_pixels}"
        )


def open_image_bytes(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode encoded image bytes (PNG/JPEG/...) into RGB, checking the size from the header first."""
    if not data:
        raise ImageInputError("image data is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            check_pixels(img.width, img.height, max_pixels)
            img.load()
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageInputError(f"input image is too large (decompression bomb guard): {e}") from None
    except UnidentifiedImageError:
        raise ImageInputError("data is not a recognised image (PNG, JPEG, WebP, TIFF, BMP ...)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageInputError(f"image data is corrupt or truncated: {e}") from None
    return to_rgb_image(img)


def open_image_path(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Read an image file into RGB (see :func:`open_image_bytes`)."""
    p = Path(path)
    if not p.is_file():
        raise ImageInputError(f"{p} is not a file")
    return open_image_bytes(p.read_bytes(), max_pixels)


def decode_base64_image(text: Any, max_pixels: int | None = None, max_bytes: int | None = None) -> Image.Image:
    """Strictly decode a base64 string (optionally a ``data:image/...;base64,`` URL) into an RGB image."""
    if not isinstance(text, str):
        raise ImageInputError(f"'image' must be a base64-encoded string, got {type(text).__name__}")
    s = text.strip()
    if s.startswith("data:"):
        head, _, s = s.partition(",")
        if ";base64" not in head:
            raise ImageInputError("data URL is not base64-encoded")
    if max_bytes is not None and len(s) > max_bytes:
        raise ImageInputError(f"encoded image is too large: {len(s)} bytes > limit {max_bytes}")
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageInputError(f"'image' is not valid base64: {e}") from None
    return open_image_bytes(raw, max_pixels)


def encode_png_base64(img: Image.Image) -> str:
    """PNG-encode an image and return it as base64 text."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _high_bit_depth_to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float greyscale -> 8-bit L, keeping the full tonal range."""
    arr = np.asarray(img)
    if img.mode == "F":
        a = arr.astype(np.float64)
        a = a * 255.0 if np.nanmax(a) <= 1.0 else a
    else:
        a = arr.astype(np.float64)
        a = a / 257.0 if (img.mode.startswith("I;16") or a.max() > 255) else a
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def to_rgb_image(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB: EXIF orientation applied, first frame, alpha composited on white."""
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _high_bit_depth_to_8bit(img)
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("PA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def array_to_image(arr: np.ndarray) -> Image.Image:
    """HxW / HxWxC numpy (uint8, uint16, or float in [0, 1]) -> RGB image."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageInputError(f"array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {a.shape}")
    if a.dtype == np.uint8:
        u8 = a
    elif a.dtype == np.uint16:
        u8 = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        u8 = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    else:
        raise ImageInputError(f"unsupported array dtype {a.dtype} (use uint8, uint16 or float in [0, 1])")
    mode = {2: "L"}.get(u8.ndim) or ("RGB" if u8.shape[2] == 3 else "RGBA")
    return to_rgb_image(Image.fromarray(np.ascontiguousarray(u8), mode=mode))


def tensor_to_image(t: torch.Tensor) -> Image.Image:
    """(3,H,W) / (1,H,W) / (H,W) float tensor in [0, 1] -> RGB image (rounded to 8 bit)."""
    x = t.detach().to("cpu", torch.float32)
    if x.ndim == 3 and x.shape[0] in (1, 3, 4):
        x = x.permute(1, 2, 0)
    return array_to_image(x.numpy())


def load_image(x: ImageLike, max_pixels: int | None = None) -> Image.Image:
    """Any supported input -> RGB image, enforcing ``max_pixels``."""
    if isinstance(x, Image.Image):
        check_pixels(x.width, x.height, max_pixels)
        img = to_rgb_image(x)
    elif isinstance(x, (str, Path)):
        img = open_image_path(x, max_pixels)
    elif isinstance(x, (bytes, bytearray)):
        img = open_image_bytes(bytes(x), max_pixels)
    elif isinstance(x, np.ndarray):
        img = array_to_image(x)
    elif isinstance(x, torch.Tensor):
        img = tensor_to_image(x)
    else:
        raise ImageInputError(f"unsupported image input type {type(x).__name__}")
    check_pixels(img.width, img.height, max_pixels)
    return img


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> (3,H,W) float32 in [0, 1]."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def tensor_to_pil_round(x: torch.Tensor) -> Image.Image:
    """(3,H,W) float in [0, 1] -> uint8 PIL by rounding (docs/MODEL.md §4.4 step 1)."""
    a = (x.detach().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a, mode="RGB")


def tensor_to_pil_trunc(x: torch.Tensor) -> Image.Image:
    """(3,H,W) float in [0, 1] -> uint8 PIL by truncation (ToPILImage, docs/MODEL.md §4.4 step 2 / docs/MODEL.md §7.2
    item 8)."""
    a = (x.detach().clamp(0, 1) * 255.0).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a, mode="RGB")
