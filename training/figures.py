"""Figures of a training run (rank 0 writes them; training/tracking.py logs them as artifacts): loss curves against
step (:func:`plot_curves`, :func:`plot_loss_curves`) and labelled sample grids (:func:`save_grid`, read back by
:func:`grid_tiles`), the LR | SR | HR rows of stage 2's validation, generated | real of stage 1's, HR |
reconstruction | tokens only of stage 0's (docs/CONTRACTS.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path


# ---- plots -----------------------------------------------------------------------------------------------------------
def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [h for h in history if h.get(key) is not None and math.isfinite(float(h[key]))]
    return [h["step"] for h in rows], [float(h[key]) for h in rows]


def plot_curves(
    history: list[dict], panels: list[tuple[str, list[str]]], path: str | Path, log_panels: tuple[str, ...] = ()
) -> Path:
    """One panel per ``(title, [metric keys])`` against step (keys missing from the history are left out; a key seen
    only at some steps, such as ``val/...``, is drawn with markers). The figure is saved with its titles and labels
    inside the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, [k for k in keys if _series(history, k)[0]]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    fig, axes = plt.subplots(
        1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 3.8), squeeze=False, layout="constrained"
    )
    n_steps = len(history)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            xs, ys = _series(history, k)
            sparse = len(xs) < max(2, n_steps // 2)
            ax.plot(xs, ys, "o-" if sparse else "-", label=k, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        if title in log_panels:
            ax.set_yscale("log")
        if len(keys) > 1:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return Path(path)


def plot_loss_curves(history: list[dict], path: str | Path) -> Path:
    """Stage 1/2: losses (train and validation), refiner loss, learning rate, validation PSNR-Y against step."""
    return plot_curves(
        history,
        [
            ("loss", ["loss/total", "loss/ce", "val/loss"]),
            ("refiner loss", ["loss/refiner"]),
            ("learning rate", ["lr"]),
            ("validation PSNR-Y (dB)", ["val/psnr_y"]),
        ],
        path,
    )


# ---- sample grids ----------------------------------------------------------------------------------------------------
GRID_META_KEY = "varsr.grid"  # PNG text chunk: the tile boxes, so tools (and tests) can cut the tiles back out


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def save_grid(
    rows: list[list], titles: list[str], path: str | Path, row_labels: list[str] | None = None, min_tile: int = 128
) -> Path:
    """rows: per sample ``[img (3,H,W) in [0,1], ...]`` -> one PNG with a column per title (e.g. LR | SR | HR).

    Tiles smaller than ``min_tile`` pixels are enlarged by an integer factor with nearest-neighbour (pixels stay
    pixels, so LR / SR / HR differences show); each column is at least as wide as its header, headers are centred
    above their column, and each row gets its label (``row_labels``) above its tiles. The tile boxes are stored in
    the PNG's ``varsr.grid`` text chunk (see :func:`grid_tiles`).
    """
    import numpy as np
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    tiles = [
        [(np.clip(t.detach().float().cpu().permute(1, 2, 0).numpy(), 0, 1) * 255).round().astype(np.uint8) for t in row]
        for row in rows
    ]
    h, w = tiles[0][0].shape[:2]
    k = max(1, math.ceil(min_tile / max(1, min(h, w))))
    th, tw = h * k, w * k
    head_font, label_font = _font(15), _font(13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str, font) -> tuple[float, float]:
        x0, y0, x1, y1 = probe.textbbox((0, 0), text, font=font)
        return x1 - x0, y1 - y0

    pad, gap = 8, 12
    col_w = [max(tw, text_size(t, head_font)[0] + 2 * pad) for t in titles]
    head_h = max(text_size(t, head_font)[1] for t in titles) + 2 * pad
    label_h = (max(text_size(lbl, label_font)[1] for lbl in row_labels) + pad) if row_labels else 0
    label_w = max((text_size(lbl, label_font)[0] for lbl in row_labels), default=0) if row_labels else 0
    W = max(sum(col_w) + gap * (len(titles) - 1) + 2 * pad, label_w + 2 * pad)
    H = head_h + len(tiles) * (label_h + th + gap) + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    xs, x = [], pad
    for cw in col_w:
        xs.append(x)
        x += cw + gap
    for j, t in enumerate(titles):
        tw_, _ = text_size(t, head_font)
        draw.text((xs[j] + (col_w[j] - tw_) // 2, pad), t, fill=(0, 0, 0), font=head_font)
    boxes = []
    y = head_h
    for i, row in enumerate(tiles):
        if row_labels:
            draw.text((pad, y), row_labels[i], fill=(60, 60, 60), font=label_font)
            y += label_h
        row_boxes = []
        for j, img in enumerate(row):
            x0 = xs[j] + (col_w[j] - tw) // 2
            canvas.paste(Image.fromarray(img).resize((tw, th), Image.Resampling.NEAREST), (int(x0), int(y)))
            row_boxes.append([x0, y, x0 + tw, y + th])
        boxes.append(row_boxes)
        y += th + gap
    info = PngInfo()
    info.add_text(GRID_META_KEY, json.dumps({"titles": titles, "rows": row_labels, "scale": k, "tiles": boxes}))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, pnginfo=info)
    return Path(path)


def grid_tiles(path: str | Path) -> tuple[dict, list[list]]:
    """Read a grid written by :func:`save_grid`: (its metadata, per row the tiles as HxWx3 uint8 arrays)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        meta = json.loads(im.text[GRID_META_KEY])
        a = np.asarray(im.convert("RGB"))
    return meta, [[a[y0:y1, x0:x1] for x0, y0, x1, y1 in row] for row in meta["tiles"]]
