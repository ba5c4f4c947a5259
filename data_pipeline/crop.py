"""HR crop (docs/MODEL.md §5.5): resize the short side to round(f * crop) with LANCZOS, centre or random crop, random
flip."""

from __future__ import annotations

import numpy as np
from PIL import Image


def crop_hr(
    rgb: np.ndarray, crop: int, short_factor: float, mode: str, flip_prob: float, rng: np.random.Generator
) -> tuple[np.ndarray, dict]:
    """Returns the (crop, crop, 3) uint8 HR and what was done (resize size, box, flip) for the sample JSON."""
    h, w = rgb.shape[:2]
    short = max(crop, int(round(short_factor * crop)))
    s = short / min(h, w)
    nw, nh = max(crop, int(round(w * s))), max(crop, int(round(h * s)))
    if mode == "center":
        y0, x0 = (nh - crop) // 2, (nw - crop) // 2
    else:
        y0, x0 = int(rng.integers(0, nh - crop + 1)), int(rng.integers(0, nw - crop + 1))
    if (nw, nh) != (w, h):
        # resample only the crop window: PIL's `box` maps the window back to source coordinates, which equals
        # resize-then-crop up to +-1 level on edge pixels and costs (crop / short)^2 of the full resize
        sx, sy = w / nw, h / nh
        box = (x0 * sx, y0 * sy, (x0 + crop) * sx, (y0 + crop) * sy)
        hr = np.asarray(Image.fromarray(rgb).resize((crop, crop), Image.Resampling.LANCZOS, box=box))
    else:
        hr = rgb[y0 : y0 + crop, x0 : x0 + crop]
    flip = bool(rng.random() < flip_prob)
    if flip:
        hr = hr[:, ::-1]
    return np.ascontiguousarray(hr), {"resized_to": [nw, nh], "box": [x0, y0, x0 + crop, y0 + crop], "flip": flip}
