"""A small real-photo corpus from images bundled with installed packages, plus crafted bad files.

`write_sample_corpus(dir)` writes photos from scikit-image, scikit-learn (and matplotlib when installed) in
varied formats and modes (EXIF-rotated JPEG, L, LA, P with transparency, RGBA, CMYK JPEG, 16-bit PNG, animated
GIF), an exact and a near duplicate, and bad files (truncated JPEG, zero-byte, non-image, decompression bomb,
tiny image). It returns {name: {"kind", "expect"}} where expect is "ok" (decodes) or "rejected:<reason>" /
"failed:<reason>" as the decoder reports it.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def decompression_bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims width x height grey pixels while the file is a few hundred bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4, 9)  # a few zero rows; the rest is "missing"
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _jpeg(im: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, "JPEG", quality=kw.pop("quality", 92), **kw)
    return b.getvalue()


def _png(im: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, "PNG", compress_level=1, **kw)
    return b.getvalue()


def write_sample_corpus(directory: str | Path, with_bad_files: bool = True) -> dict[str, dict]:
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    d = Path(directory)
    (d / "photos").mkdir(parents=True, exist_ok=True)
    (d / "modes").mkdir(exist_ok=True)
    files: dict[str, tuple[bytes, str, str]] = {}
    rgb = Image.fromarray

    astro = sd.astronaut()
    files["photos/astronaut.png"] = (_png(rgb(astro)), "RGB PNG", "ok")
    files["photos/astronaut_copy.png"] = (_png(rgb(astro)), "exact duplicate", "ok")
    files["photos/astronaut_q85.jpg"] = (_jpeg(rgb(astro), quality=85), "near duplicate (re-encoded)", "ok")
    files["photos/coffee.jpg"] = (_jpeg(rgb(sd.coffee())), "RGB JPEG", "ok")
    files["photos/rocket.jpg"] = (_jpeg(rgb(sd.rocket())), "RGB JPEG", "ok")
    files["photos/hubble_deep_field.jpg"] = (_jpeg(rgb(sd.hubble_deep_field())), "RGB JPEG", "ok")
    files["photos/retina.jpg"] = (_jpeg(rgb(sd.retina())), "RGB JPEG 1411px", "ok")
    files["photos/immunohistochemistry.png"] = (_png(rgb(sd.immunohistochemistry())), "RGB PNG", "ok")
    for name, im in zip(("china", "flower"), load_sample_images().images):
        files[f"photos/{name}.jpg"] = (_jpeg(rgb(im)), "RGB JPEG", "ok")
    try:
        import matplotlib.cbook as cbook

        hopper = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
        files["photos/grace_hopper.jpg"] = (hopper.read_bytes(), "RGB JPEG (matplotlib)", "ok")
    except Exception:  # noqa: BLE001 - matplotlib is optional
        pass
    # EXIF orientation 6: pixels stored rotated 90 degrees counter-clockwise, displayed upright
    exif = Image.Exif()
    exif[0x0112] = 6
    files["modes/chelsea_exif_rot6.jpg"] = (
        _jpeg(rgb(np.rot90(sd.chelsea(), 1).copy()), exif=exif.tobytes()),
        "EXIF-rotated JPEG",
        "ok",
    )
    files["modes/camera_L.png"] = (_png(rgb(sd.camera())), "mode L", "ok")
    brick = sd.brick()
    la = np.stack([brick, np.full_like(brick, 200)], axis=2)
    files["modes/brick_LA.png"] = (_png(Image.fromarray(la, "LA")), "mode LA", "ok")
    grass_p = rgb(np.stack([sd.grass()] * 3, axis=2)).quantize(64)
    files["modes/grass_P_transparency.png"] = (_png(grass_p, transparency=0), "mode P with transparency", "ok")
    rocket = sd.rocket()
    yy, xx = np.indices(rocket.shape[:2])
    alpha = np.where((yy - 213) ** 2 + (xx - 320) ** 2 < 200**2, 255, 0).astype(np.uint8)  # opaque disc
    files["modes/rocket_RGBA.png"] = (
        _png(Image.fromarray(np.dstack([rocket, alpha]), "RGBA")),
        "mode RGBA (transparent outside a disc)",
        "ok",
    )
    files["modes/gravel_CMYK.jpg"] = (
        _jpeg(rgb(np.stack([sd.gravel()] * 3, axis=2)).convert("CMYK")),
        "CMYK JPEG",
        "ok",
    )
    moon16 = sd.moon().astype(np.uint16) * 257
    files["modes/moon_16bit.png"] = (_png(Image.fromarray(moon16)), "16-bit grey PNG (I;16)", "ok")
    cw = sd.colorwheel()
    frames = [rgb(np.roll(cw, 40 * i, axis=1)) for i in range(3)]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    files["modes/colorwheel_animated.gif"] = (b.getvalue(), "animated GIF (first frame used)", "ok")
    files["modes/text_small.png"] = (_png(rgb(sd.text())), "small grey image (172x448)", "ok")
    if with_bad_files:
        (d / "bad").mkdir(exist_ok=True)
        full = _jpeg(rgb(sd.coffee()))
        files["bad/truncated.jpg"] = (full[: len(full) // 2], "truncated JPEG", "failed:truncated")
        files["bad/zero_bytes.png"] = (b"", "zero-byte file", "rejected:empty_file")
        files["bad/not_an_image.jpg"] = (
            b"this is a text file, not an image\n" * 20,
            "non-image text",
            "rejected:not_an_image",
        )
        files["bad/bomb.png"] = (
            decompression_bomb_png(),
            "decompression bomb (100000x100000 header)",
            "rejected:decompression_bomb",
        )
        files["bad/tiny.png"] = (_png(rgb(astro[:4, :4].copy())), "tiny 4x4 image", "rejected:too_small")
    out = {}
    for name, (data, kind, expect) in sorted(files.items()):
        (d / name).write_bytes(data)
        out[name] = {"kind": kind, "expect": expect}
    return out
