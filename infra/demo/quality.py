"""Where SR quality goes, measured on held-out photos: shared by `varsr demo`, `varsr demo pretrain` and
benchmarks/quality_bench.py.

For a held-out photo (HR) and its x4 bicubic LR:

* ``tokenizer_ceiling`` — the best any transformer could do with this tokenizer: the HR cut into model-sized tiles,
  tokenised, and decoded from (a) the multi-scale tokens alone (f_hat of the codes) and (b) the tokens plus the exact
  continuous residual of the last scale (what a perfect refiner adds: f_hat + R - e_last = f, the encoder latent).
* ``sr_figures`` — PSNR-Y / SSIM-Y / high-frequency energy of an SR result beside bicubic's.
* ``one_pass_stitched`` — every model window super-resolved alone and stitched without blending, against which the
  pipeline's overlapping, latent-blended tiling is compared on the same image.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image


@dataclass
class HeldOut:
    """One held-out pair: HR (sides multiples of the model resolution) and its x4 bicubic LR."""

    name: str
    hr: Image.Image
    lr: Image.Image


def make_pair(img: Image.Image, name: str, hr_w: int, hr_h: int, scale: int = 4) -> HeldOut:
    """Resize (LANCZOS, keeping the aspect) to cover hr_w x hr_h, centre-crop to it, bicubic-downsample by ``scale``."""
    img = img.convert("RGB")
    s = max(hr_w / img.width, hr_h / img.height)
    w, h = max(hr_w, round(img.width * s)), max(hr_h, round(img.height * s))
    big = img.resize((w, h), Image.Resampling.LANCZOS)
    x0, y0 = (w - hr_w) // 2, (h - hr_h) // 2
    hr = big.crop((x0, y0, x0 + hr_w, y0 + hr_h))
    lr = hr.resize((hr_w // scale, hr_h // scale), Image.Resampling.BICUBIC)
    return HeldOut(name, hr, lr)


def load_pairs(files: list[str | Path], hr_side: int, limit: int | None = None) -> list[HeldOut]:
    """Held-out pairs of square ``hr_side`` crops from image files (sorted, at most ``limit``)."""
    Image.MAX_IMAGE_PIXELS = 200_000_000  # trusted package wallpapers exceed PIL's default warning limit
    out = []
    for f in sorted(map(Path, files))[: limit or None]:
        with Image.open(f) as im:
            out.append(make_pair(im, f"{f.parent.name}/{f.stem}", hr_side, hr_side))
    return out


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def _to_pil(t: torch.Tensor) -> Image.Image:
    a = (t.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(a)


@torch.no_grad()
def tokenizer_ceiling(vqvae, image_size: int, hr: Image.Image) -> dict[str, float]:
    """PSNR-Y/SSIM-Y of the HR decoded from its tokens, and from tokens + exact residual (tile by tile), and how far
    each decoded tile's mean colour is off (``chroma_err_*``, :func:`infra.core.metrics.chroma_fidelity`, in [0, 1]
    units: a tokenizer that lost colour shows here, docs/MODEL.md §1.2)."""
    from infra.core.metrics import chroma_fidelity, full_reference

    S = image_size
    W, H = (hr.width // S) * S, (hr.height // S) * S
    if W == 0 or H == 0:
        raise ValueError(f"HR {hr.size} is smaller than one model tile ({S} px)")
    ref = hr.crop((0, 0, W, H))
    x = _to_tensor(ref)
    tiles = [x[:, j:j + S, i:i + S] for j in range(0, H, S) for i in range(0, W, S)]
    batch = torch.stack(tiles) * 2 - 1
    idx, R, f_hat = vqvae.tokenize(batch)
    e_last = vqvae.embed_idx(idx[-1]).float()  # (B, n_last, Cvae)
    f_exact = f_hat + (R - e_last).transpose(1, 2).reshape_as(f_hat)
    out = {}
    for key, f in (("tokens", f_hat), ("tokens_residual", f_exact)):
        rec = (vqvae.fhat_to_img(f).float() + 1) / 2
        canvas = torch.zeros_like(x)
        k = 0
        for j in range(0, H, S):
            for i in range(0, W, S):
                canvas[:, j:j + S, i:i + S] = rec[k]
                k += 1
        m = full_reference(_to_pil(canvas), ref)
        out[f"psnr_y_{key}"], out[f"ssim_y_{key}"] = m["psnr_y"], m["ssim_y"]
        out[f"chroma_err_{key}"] = chroma_fidelity((batch + 1) / 2, rec)["chroma_err"]
    return out


def sr_figures(sr: Image.Image, hr: Image.Image) -> dict[str, float]:
    """PSNR-Y, SSIM-Y and the high-frequency energy (and its gap to the HR's, in dB) of one result."""
    from infra.core.metrics import full_reference, hf_energy, hf_gap_db

    sr = sr.convert("RGB").resize(hr.size, Image.Resampling.BICUBIC) if sr.size != hr.size else sr.convert("RGB")
    m = full_reference(sr, hr)
    return {"psnr_y": m["psnr_y"], "ssim_y": m["ssim_y"], "hf_energy": hf_energy(sr), "hf_gap_db": hf_gap_db(sr, hr)}


def bicubic(p: HeldOut) -> Image.Image:
    return p.lr.resize(p.hr.size, Image.Resampling.BICUBIC)


def one_pass_stitched(pipe, p: HeldOut, image_size: int, scale: int = 4, **kw) -> Image.Image:
    """Each model window of the LR super-resolved alone (one pass, no tiling) and pasted side by side."""
    S, s = image_size, image_size // scale
    out = Image.new("RGB", ((p.lr.width // s) * S, (p.lr.height // s) * S))
    for j in range(0, p.lr.height - s + 1, s):
        for i in range(0, p.lr.width - s + 1, s):
            win = p.lr.crop((i, j, i + s, j + s))
            out.paste(pipe.upscale(win, scale=scale, **kw), (i * scale, j * scale))
    return out


def mean_figures(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each figure over images (keys of the first row)."""
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}
