"""Held-out quality measurements (infra/demo/quality.py) and the high-frequency energy measure (infra/core/metrics.py),
on a randomly initialised tiny model (fast) and synthetic images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from infra.core.metrics import chroma_fidelity, full_reference, hf_energy, hf_gap_db, hf_ratio
from infra.demo.quality import bicubic, make_pair, one_pass_stitched, sr_figures, tokenizer_ceiling


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
    im = Image.fromarray(base).resize((w, h), Image.BICUBIC)
    noise = rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def tiny():
    from model import VARSRConfig, build

    torch.manual_seed(0)
    vqvae, varsr = build(VARSRConfig.preset("tiny"))
    return vqvae.eval(), varsr.eval()


def test_hf_energy_orders_sharp_over_blurred_and_gap_is_zero_for_the_reference():
    img = _photo(96, 96)
    blurred = img.filter(ImageFilter.GaussianBlur(2))
    assert hf_energy(img) > 4 * hf_energy(blurred) > 0
    assert hf_gap_db(img, img) == 0.0
    assert hf_ratio(blurred, img) < 0.25
    small = img.resize((24, 24), Image.BICUBIC).resize((96, 96), Image.BICUBIC)
    assert hf_gap_db(small, img) > 6.0  # bicubic x4 loses most high-frequency energy


def test_make_pair_crops_to_size_and_downsamples_by_four():
    p = make_pair(_photo(300, 170), "x", 256, 128)
    assert p.hr.size == (256, 128) and p.lr.size == (64, 32)
    assert bicubic(p).size == p.hr.size


@torch.no_grad()
def test_tokenizer_ceiling_with_exact_residual_is_the_autoencoder_reconstruction(tiny):
    vqvae, _ = tiny
    hr = _photo(128, 64, 1)  # two 64-px tiles of the tiny model
    got = tokenizer_ceiling(vqvae, 64, hr)
    x = torch.from_numpy(np.asarray(hr, dtype=np.float32) / 255).permute(2, 0, 1)
    tiles = torch.stack([x[:, :, :64], x[:, :, 64:]]) * 2 - 1
    rec = (vqvae.fhat_to_img(vqvae.encode(tiles)) + 1) / 2  # decode of the exact encoder latent f
    img = torch.cat([rec[0], rec[1]], dim=2).clamp(0, 1)
    ref = Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    want = full_reference(ref, hr)["psnr_y"]
    assert got["psnr_y_tokens_residual"] == pytest.approx(want, abs=0.05)
    assert got["chroma_err_tokens_residual"] == pytest.approx(
        chroma_fidelity((tiles + 1) / 2, rec.clamp(0, 1))["chroma_err"], abs=1e-6
    )
    assert set(got) == {
        "psnr_y_tokens",
        "ssim_y_tokens",
        "psnr_y_tokens_residual",
        "ssim_y_tokens_residual",
        "chroma_err_tokens",
        "chroma_err_tokens_residual",
        "hf_energy_tokens",
    }
    # with the LR: its own codes decoded; an "LR" that is the HR itself (so its bicubic upsampling is the HR) gives
    # the tokens-only ceiling exactly
    same = tokenizer_ceiling(vqvae, 64, hr, lr=hr)
    assert same["psnr_y_lr_tokens"] == pytest.approx(same["psnr_y_tokens"], abs=1e-9)
    lr = hr.resize((32, 16), Image.BICUBIC)
    assert tokenizer_ceiling(vqvae, 64, hr, lr=lr)["psnr_y_lr_tokens"] < same["psnr_y_tokens"] + 3


@torch.no_grad()
def test_token_accuracy_counts_agreement_per_scale(tiny):
    """Teacher-forced and sampled codes are scored against the HR's per scale; an LR whose upsampling is the HR
    itself has all its codes right; a model whose head always prefers code 0 is right exactly where the HR's code is
    0."""
    from infra.demo.quality import HeldOut, token_accuracy

    vqvae, varsr = tiny
    hr = _photo(128, 64, 2)
    pair = HeldOut("x", hr, hr)
    acc = token_accuracy(varsr, vqvae, 64, [pair], cfg=1.0)
    K = len(varsr.patch_nums)
    assert set(acc) == {"teacher_forced", "sampled", "lr_codes"}
    assert all(len(v) == K and all(0 <= a <= 1 for a in v) for v in acc.values())
    assert acc["lr_codes"] == [1.0] * K
    x = torch.from_numpy(np.asarray(hr, dtype=np.float32) / 255).permute(2, 0, 1)
    gt = vqvae.tokenize(torch.stack([x[:, :, :64], x[:, :, 64:]]) * 2 - 1)[0]
    biased = type(varsr.head)(varsr.head.in_features, varsr.head.out_features)
    biased.weight.data.zero_()
    biased.bias.data.zero_()
    biased.bias.data[0] = 10.0
    saved, varsr.head = varsr.head, biased
    try:
        acc0 = token_accuracy(varsr, vqvae, 64, [pair], cfg=0.0)
    finally:
        varsr.head = saved
    want = [round(float((g == 0).float().mean()), 4) for g in gt]
    assert acc0["teacher_forced"] == want and acc0["sampled"] == want


def _coloured_batch(n: int = 8, side: int = 32, seed: int = 0) -> torch.Tensor:
    """n images in [0, 1], each with its own random mean colour plus texture."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.rand(n, 3, 1, 1, generator=g) * 0.6 + 0.2
    return (colour + 0.1 * torch.randn(n, 3, side, side, generator=g)).clamp(0, 1)


def test_chroma_fidelity_is_one_when_colours_are_kept_and_zero_when_every_image_gets_one_tint():
    x = _coloured_batch()
    assert chroma_fidelity(x, x) == pytest.approx({"chroma_gain": 1.0, "chroma_err": 0.0})
    grey = x.mean(1, keepdim=True).expand_as(x)
    tint = torch.tensor([0.05, 0.05, -0.1]).view(1, 3, 1, 1)  # R = G > B: the olive cast of a colour-less tokenizer
    lost = chroma_fidelity(x, grey + tint)
    assert lost["chroma_gain"] == pytest.approx(0.0, abs=1e-6)
    cx = torch.stack([x[:, 0].mean((1, 2)) - x[:, 1].mean((1, 2)), x[:, 2].mean((1, 2)) - x[:, 1].mean((1, 2))], 1)
    want_err = float((cx.double() - torch.tensor([0.0, -0.15], dtype=torch.float64)).abs().mean())
    assert lost["chroma_err"] == pytest.approx(want_err, abs=1e-6)
    half = chroma_fidelity(x, grey + 0.5 * (x - grey))  # every colour difference halved
    assert half["chroma_gain"] == pytest.approx(0.5, abs=1e-6)
    assert np.isnan(chroma_fidelity(x[:1], x[:1])["chroma_gain"])  # one image: no slope to measure
    with pytest.raises(ValueError, match="same shape"):
        chroma_fidelity(x, x[:, :2])


def test_one_pass_stitched_covers_the_image_window_by_window(tiny):
    from inference.pipeline import VARSRPipeline

    vqvae, varsr = tiny
    pipe = VARSRPipeline(vqvae, varsr, device="cpu")
    p = make_pair(_photo(128, 128, 2), "x", 128, 128)
    out = one_pass_stitched(pipe, p, 64, seed=0, cfg=1.0)
    assert out.size == (128, 128)
    # the top-left window alone gives the same pixels as its quarter of the stitched result
    alone = pipe.upscale(p.lr.crop((0, 0, 16, 16)), scale=4, seed=0, cfg=1.0)
    assert np.array_equal(np.asarray(alone), np.asarray(out)[:64, :64])
    figs = sr_figures(out, p.hr)
    assert set(figs) == {"psnr_y", "ssim_y", "hf_energy", "hf_gap_db"}


def test_the_demo_quality_bar_needs_psnr_near_bicubic_and_hf_energy_nearer_the_hr():
    from infra.demo.demo import format_figures, upscale_figures

    hr = _photo(128, 128, seed=3)
    p = make_pair(hr, "x", 128, 128)
    bic = bicubic(p)
    sharp = hr.filter(ImageFilter.GaussianBlur(0.6))  # near the HR, sharper than bicubic
    m = upscale_figures(sharp, bic, hr)
    assert m["quality_bar_met"] == 1.0 and m["psnr_y_gap_to_bicubic_db"] > 0
    assert "quality bar" in format_figures(m) and ": met" in format_figures(m)
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8))  # much HF energy, not the photo
    m = upscale_figures(noise, bic, hr)
    assert m["quality_bar_met"] == 0.0 and m["psnr_y_gap_to_bicubic_db"] < -3
    blurry = hr.filter(ImageFilter.GaussianBlur(4))  # no HF: further from the HR's HF energy than bicubic
    m = upscale_figures(blurry, bic, hr)
    assert m["quality_bar_met"] == 0.0 and "NOT met" in format_figures(m)


def test_sr_figures_score_as_the_eval_suite_does():
    """The demo's held-out figures and `varsr eval --suite` share one scorer (inference/eval_metrics.py)."""
    from inference.eval_metrics import load_metrics, score_image
    from infra.core.metrics import niqe

    hr = _photo(128, 128, 5)
    p = make_pair(hr, "x", 128, 128)
    figs = sr_figures(bicubic(p), p.hr, extra=("niqe", "brisque"))
    suite = score_image(np.asarray(bicubic(p)), np.asarray(p.hr), load_metrics(["psnr_y", "ssim_y", "brisque"])[0])
    assert figs["psnr_y"] == suite["psnr_y"] and figs["ssim_y"] == suite["ssim_y"]
    assert figs["niqe"] == niqe(np.asarray(bicubic(p))) and figs["brisque"] == suite["brisque"]
