"""Where SR quality goes, measured on held-out photos: shared by `varsr demo`, `varsr demo pretrain` and
benchmarks/quality_bench.py.

For a held-out photo (HR) and its x4 bicubic LR:

* ``tokenizer_ceiling`` — the best any transformer could do with this tokenizer: the HR cut into model-sized tiles,
  tokenised, and decoded from (a) the multi-scale tokens alone (f_hat of the codes) and (b) the tokens plus the exact
  continuous residual of the last scale (what a perfect refiner adds: f_hat + R - e_last = f, the encoder latent).
  With the LR, also (c) the tokens of the bicubic-upsampled LR decoded: what a transformer that only copied its
  input's codes would reach.
* ``token_accuracy`` — per scale, how often the transformer's codes equal the HR's: teacher-forced (the training
  objective's accuracy) and sampled (what inference draws), beside how often the bicubic LR's own codes do.
* ``sr_figures`` — PSNR-Y / SSIM-Y / high-frequency energy of an SR result beside bicubic's, scored by the same
  functions as ``varsr eval --suite`` (inference/eval_metrics.py).
* ``bundled_table`` — ``varsr eval --suite bundled`` for a checkpoint against bicubic: the model card's held-out table.
* ``evaluate_checkpoint`` — all of the above for a checkpoint on a list of held-out photos (the recipe's export
  scores its base with it).
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


def _tiles(img: Image.Image, S: int) -> tuple[torch.Tensor, Image.Image]:
    """The whole ``S``-px tiles of ``img`` (row-major, (N, 3, S, S) in [0, 1]) and the crop they cover."""
    W, H = (img.width // S) * S, (img.height // S) * S
    if W == 0 or H == 0:
        raise ValueError(f"HR {img.size} is smaller than one model tile ({S} px)")
    ref = img.crop((0, 0, W, H))
    x = _to_tensor(ref)
    return torch.stack([x[:, j : j + S, i : i + S] for j in range(0, H, S) for i in range(0, W, S)]), ref


def _untile(tiles: torch.Tensor, ref: Image.Image) -> Image.Image:
    S = tiles.shape[-1]
    canvas = torch.zeros(3, ref.height, ref.width)
    k = 0
    for j in range(0, ref.height, S):
        for i in range(0, ref.width, S):
            canvas[:, j : j + S, i : i + S] = tiles[k]
            k += 1
    return _to_pil(canvas)


@torch.no_grad()
def tokenizer_ceiling(vqvae, image_size: int, hr: Image.Image, lr: Image.Image | None = None) -> dict[str, float]:
    """PSNR-Y/SSIM-Y of the HR decoded from its tokens, and from tokens + exact residual (tile by tile), and how far
    each decoded tile's mean colour is off (``chroma_err_*``, :func:`infra.core.metrics.chroma_fidelity`, in [0, 1]
    units: a tokenizer that lost colour shows here, docs/EXPERIMENTS.md); ``hf_energy_tokens``: the high-frequency
    energy of the tokens-only decode. With ``lr``, ``psnr_y_lr_tokens``: the codes of the bicubic-upsampled LR
    decoded, scored against the HR."""
    from infra.core.metrics import chroma_fidelity, full_reference, hf_energy

    tiles, ref = _tiles(hr, image_size)
    batch = tiles * 2 - 1
    idx, R, f_hat = vqvae.tokenize(batch)
    f_exact = vqvae.exact_latent(idx, R, f_hat)
    out = {}
    for key, f in (("tokens", f_hat), ("tokens_residual", f_exact)):
        rec = (vqvae.fhat_to_img(f).float() + 1) / 2
        img = _untile(rec, ref)
        m = full_reference(img, ref)
        out[f"psnr_y_{key}"], out[f"ssim_y_{key}"] = m["psnr_y"], m["ssim_y"]
        out[f"chroma_err_{key}"] = chroma_fidelity((batch + 1) / 2, rec)["chroma_err"]
        if key == "tokens":
            out["hf_energy_tokens"] = hf_energy(img)
    if lr is not None:
        up, _ = _tiles(lr.convert("RGB").resize(hr.size, Image.Resampling.BICUBIC), image_size)
        rec = (vqvae.fhat_to_img(vqvae.tokenize(up * 2 - 1)[2]).float() + 1) / 2
        out["psnr_y_lr_tokens"] = full_reference(_untile(rec, ref), ref)["psnr_y"]
    return out


@torch.no_grad()
def token_accuracy(
    varsr, vqvae, image_size: int, pairs: list[HeldOut], cfg: float = 1.0, seed: int = 0
) -> dict[str, list[float]]:
    """Per scale, the share of codes equal to the HR's codes, over the whole tiles of ``pairs``:

    - ``teacher_forced``: argmax of the training forward (HR codes as the previous scales' inputs, the bicubic LR as
      the prefix): the training objective's accuracy on held-out photos;
    - ``sampled``: the codes ``generate`` draws at guidance ``cfg`` (each scale conditioned on its own earlier draws);
    - ``lr_codes``: the codes of the bicubic-upsampled LR itself (a copy of the input's codes).
    """
    from model.sampling import image_generators

    hr = torch.cat([_tiles(p.hr, image_size)[0] for p in pairs])
    up = torch.cat([_tiles(bicubic(p), image_size)[0] for p in pairs])
    gt, R, _ = vqvae.tokenize(hr * 2 - 1)
    lr_codes = vqvae.tokenize(up * 2 - 1)[0]
    labels = torch.zeros(hr.shape[0], dtype=torch.long)
    logits, _ = varsr(vqvae.idxBl_to_var_input(gt), labels, up * 2 - 1, R)
    tf = [logits[:, s].argmax(-1) for s in varsr.scale_slices()]
    _, info = varsr.generate(
        up, label=0, cfg=cfg, generator=image_generators(seed, hr.shape[0]), return_fhat=True, return_info=True
    )

    def agree(codes):
        return [round(float((c == g).float().mean()), 4) for c, g in zip(codes, gt)]

    return {"teacher_forced": agree(tf), "sampled": agree(info.tokens), "lr_codes": agree(lr_codes)}


def sr_figures(sr: Image.Image, hr: Image.Image, extra: tuple[str, ...] = ()) -> dict[str, float]:
    """PSNR-Y, SSIM-Y (scored as ``varsr eval --suite`` scores: inference/eval_metrics.py) and the high-frequency
    energy (and its gap to the HR's, in dB) of one result; ``extra``: more suite metrics by name (e.g. niqe)."""
    from inference.eval_metrics import load_metrics, score_image
    from infra.core.metrics import hf_energy, hf_gap_db

    sr = sr.convert("RGB").resize(hr.size, Image.Resampling.BICUBIC) if sr.size != hr.size else sr.convert("RGB")
    metrics, _ = load_metrics(["psnr_y", "ssim_y", *extra], required=extra)
    m = score_image(np.asarray(sr), np.asarray(hr.convert("RGB")), metrics)
    return {**m, "hf_energy": hf_energy(sr), "hf_gap_db": hf_gap_db(sr, hr)}


def bundled_table(
    ckpt: str | Path,
    out_dir: str | Path,
    cfg: float | None = None,
    color_fix: str | None = None,
    seed: int = 0,
    tracking_uri: str | None = None,
    log_to_mlflow: bool = False,
):
    """The model against bicubic on the small real set, by ``varsr eval --suite bundled`` (inference/eval_suite.py):
    the held-out table of the model card and the README. Returns the suite's result (``.table``, and
    ``out_dir/table.md``)."""
    from inference.eval_suite import Method, load_suite, run_suite

    kw = {k: v for k, v in {"cfg": cfg, "color_fix": color_fix}.items() if v is not None}
    methods = [Method(Path(str(ckpt)).name, str(ckpt), upscale_kwargs=kw), Method("bicubic")]
    return run_suite(
        load_suite("bundled", [f"seed={seed}"]),
        methods,
        out_dir,
        log_to_mlflow=log_to_mlflow,
        tracking_uri=tracking_uri,
    )


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


def evaluate_checkpoint(
    ckpt: Path, files: list[str], n: int, hr_side: int, cfg: float, color_fix: str = "adain"
) -> dict:
    """Tokenizer ceiling and SR vs bicubic on ``n`` held-out photos (square ``hr_side`` crops), seed 0, with the given
    colour fix against the bicubic LR (adain: the release's; inference/colorfix.py)."""
    from inference.pipeline import VARSRPipeline

    pipe = VARSRPipeline.from_pretrained(ckpt, device="cpu")
    S = pipe.image_size
    pairs = load_pairs(files, hr_side, n)
    rows = []
    for p in pairs:
        r = {"image": p.name}
        r.update({f"ceiling_{k}": v for k, v in tokenizer_ceiling(pipe.vqvae, S, p.hr).items()})
        r.update({f"bicubic_{k}": v for k, v in sr_figures(bicubic(p), p.hr).items()})
        sr = pipe.upscale(p.lr, cfg=cfg, seed=0, color_fix=color_fix)
        r.update({f"varsr_{k}": v for k, v in sr_figures(sr, p.hr).items()})
        rows.append(r)
    mean = mean_figures([{k: v for k, v in r.items() if k != "image"} for r in rows])
    return {
        "images": rows,
        "mean": mean,
        "config": {"hr_side": hr_side, "cfg": cfg, "color_fix": color_fix, "seed": 0, "n": len(rows)},
    }
