"""Unit tests of the inference building blocks: colour fix, latent tiling, image decoding, metrics."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from inference.colorfix import adain_color_fix, channel_mean_std, wavelet_color_fix, wavelet_decompose
from inference.images import ImageInputError, decode_base64_image, encode_png_base64, load_image, open_image_bytes
from inference.tiling import Tile, blend_tiles, tile_grid, tile_starts, window_1d
from infra.core.metrics import full_reference, rgb_to_y


# ---- colour fix -------------------------------------------------------------------------------------------------
def test_adain_matches_reference_mean_and_unbiased_std():
    g = torch.Generator().manual_seed(0)
    target = 0.5 + 0.05 * torch.randn(2, 3, 32, 40, generator=g)
    source = 0.4 + 0.08 * torch.randn(2, 3, 24, 24, generator=g) + torch.tensor([0.0, 0.1, -0.1]).view(1, 3, 1, 1)
    out = adain_color_fix(target, source, clamp=False)
    torch.testing.assert_close(out.mean(dim=(2, 3)), source.mean(dim=(2, 3)), atol=1e-6, rtol=0)
    # std = sqrt(unbiased var + 1e-5) for both images (docs/MODEL.md §4.4): the output's raw std is the reference's
    # up to eps
    st_raw = target.flatten(2).std(dim=2, unbiased=True)
    ss_eps = (source.flatten(2).var(dim=2, unbiased=True) + 1e-5).sqrt()
    st_eps = (st_raw**2 + 1e-5).sqrt()
    out_std = out.flatten(2).std(dim=2, unbiased=True)
    torch.testing.assert_close(out_std, ss_eps * st_raw / st_eps, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out_std, source.flatten(2).std(dim=2, unbiased=True), atol=5e-3, rtol=0)
    _, s_eps = channel_mean_std(out)
    torch.testing.assert_close(s_eps.flatten(), channel_mean_std(source)[1].flatten(), atol=5e-3, rtol=0)


def test_adain_clamps_to_unit_range():
    out = adain_color_fix(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16) * 3)
    assert out.min() >= 0 and out.max() <= 1


def test_wavelet_decomposition_is_exact_and_colour_fix_takes_low_frequencies_of_source():
    x = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    high, low = wavelet_decompose(x)
    torch.testing.assert_close(high + low, x, atol=1e-6, rtol=0)
    tgt = torch.from_numpy(np.asarray(Image.fromarray(skdata.astronaut()).resize((64, 64)), np.float32) / 255)
    tgt = tgt.permute(2, 0, 1)[None]
    cast = (tgt * 0.7 + torch.tensor([0.2, 0.0, 0.1]).view(1, 3, 1, 1)).clamp(0, 1)  # a colour cast
    fixed = wavelet_color_fix(cast, tgt, clamp=False)
    # global colour (the lowest frequency) now follows the reference, detail follows the target
    assert (fixed.mean(dim=(2, 3)) - tgt.mean(dim=(2, 3))).abs().max() < 0.01
    assert (cast.mean(dim=(2, 3)) - tgt.mean(dim=(2, 3))).abs().max() > 0.05


# ---- tiling -----------------------------------------------------------------------------------------------------
def test_tile_starts_cover_overlap_and_snap_to_border():
    assert tile_starts(32, 32, 8) == [0]
    assert tile_starts(56, 32, 8) == [0, 24]
    assert tile_starts(60, 32, 8) == [0, 24, 28]  # last one snapped to the border
    for n in range(4, 40):
        s = tile_starts(n, 4, 1)
        assert s[0] == 0 and s[-1] == n - 4 and all(b - a <= 3 for a, b in zip(s, s[1:]))
    with pytest.raises(ValueError):
        tile_starts(10, 4, 4)


@pytest.mark.parametrize("kind", ["gaussian", "cosine"])
def test_window_is_symmetric_and_positive(kind):
    for t in (4, 7, 32):
        w = window_1d(t, kind)
        assert torch.all(w > 0)
        torch.testing.assert_close(w, w.flip(0))


@pytest.mark.parametrize("kind", ["gaussian", "cosine"])
def test_blending_identical_overlapping_latents_reproduces_them(kind):
    h, w, t = 13, 18, 4
    g = torch.Generator().manual_seed(2)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    smooth = torch.stack([torch.sin(3 * ys + k) * torch.cos(2 * xs - k) for k in range(8)])
    for latent in (smooth, torch.full((8, h, w), 0.37), torch.randn(8, h, w, generator=g)):
        tiles = tile_grid(h, w, t, 1)
        crops = torch.stack([latent[:, tl.y : tl.y + t, tl.x : tl.x + t] for tl in tiles])
        out = blend_tiles(crops, tiles, (h, w), kind)
        torch.testing.assert_close(out, latent, atol=1e-6, rtol=0)


def test_blend_is_a_weighted_mean_that_favours_tile_centres():
    tiles = [Tile(0, 0), Tile(0, 3)]  # two 4-wide tiles on a 1x7 strip sharing column 3
    lat = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    out = blend_tiles(lat, tiles, (4, 7))
    assert torch.all(out[..., :3] == 0) and torch.all(out[..., 4:] == 1)
    assert 0.0 < float(out[0, 0, 3]) < 1.0
    torch.testing.assert_close(out[0, :, 3], torch.full((4,), 0.5, dtype=out.dtype))  # symmetric windows


# ---- image decoding ---------------------------------------------------------------------------------------------
def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_modes_become_rgb():
    rgba = Image.new("RGBA", (4, 3), (255, 0, 0, 0))  # fully transparent red -> white
    assert open_image_bytes(_png(rgba)).getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (4, 3), (0, 128))  # half-transparent black on white -> mid grey
    assert abs(open_image_bytes(_png(la)).getpixel((0, 0))[0] - 127) <= 1
    assert load_image(Image.new("L", (5, 5), 77)).getpixel((1, 1)) == (77, 77, 77)
    p = Image.new("P", (5, 5))
    p.putpalette([10, 20, 30] * 256)
    assert load_image(p).getpixel((0, 0)) == (10, 20, 30)
    assert load_image(Image.new("CMYK", (5, 5), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    i16 = Image.fromarray(np.full((6, 6), 65535, np.uint16))
    assert open_image_bytes(_png(i16)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(np.full((3, 4), 0.5, np.float32)).size == (4, 3)
    assert load_image(torch.zeros(3, 7, 5)).size == (5, 7)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (8, 4), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    assert open_image_bytes(buf.getvalue()).size == (4, 8)


def test_bad_base64_and_non_images_and_limits_have_clear_errors():
    with pytest.raises(ImageInputError, match="not valid base64"):
        decode_base64_image("@@@")
    with pytest.raises(ImageInputError, match="not a recognised image"):
        decode_base64_image(base64.b64encode(b"plain text").decode())
    with pytest.raises(ImageInputError, match="too large"):
        decode_base64_image(base64.b64encode(_png(Image.new("RGB", (300, 300)))).decode(), max_pixels=256 * 256)
    with pytest.raises(ImageInputError, match="too large"):
        decode_base64_image("A" * 1000, max_bytes=100)
    with pytest.raises(ImageInputError, match="truncated|corrupt"):
        open_image_bytes(_png(Image.new("RGB", (64, 64), (1, 2, 3)))[:60])
    with pytest.raises(ImageInputError, match="base64-encoded string"):
        decode_base64_image(12)
    ok = Image.new("RGB", (9, 7), (1, 2, 3))
    assert decode_base64_image("data:image/png;base64," + encode_png_base64(ok)).size == (9, 7)


# ---- metrics ----------------------------------------------------------------------------------------------------
def test_metrics_match_scikit_image_on_y_and_rgb():
    hr = Image.fromarray(skdata.astronaut()).resize((96, 96), Image.BICUBIC)
    sr = hr.resize((24, 24), Image.BICUBIC).resize((96, 96), Image.BICUBIC)
    m = full_reference(sr, hr)
    a, b = np.asarray(sr, np.float64) / 255, np.asarray(hr, np.float64) / 255
    ya = 16 / 255 + (65.481 * a[..., 0] + 128.553 * a[..., 1] + 24.966 * a[..., 2]) / 255
    yb = 16 / 255 + (65.481 * b[..., 0] + 128.553 * b[..., 1] + 24.966 * b[..., 2]) / 255
    np.testing.assert_allclose(rgb_to_y(a), ya, atol=1e-12)
    kw = dict(data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert m["psnr_y"] == pytest.approx(peak_signal_noise_ratio(yb, ya, data_range=1.0), abs=1e-9)
    assert m["ssim_y"] == pytest.approx(structural_similarity(yb, ya, **kw), abs=1e-9)
    assert m["psnr_rgb"] == pytest.approx(peak_signal_noise_ratio(b, a, data_range=1.0), abs=1e-9)
    assert m["ssim_rgb"] == pytest.approx(structural_similarity(b, a, channel_axis=2, **kw), abs=1e-9)
    assert 15 < m["psnr_y"] < 40 and 0 < m["ssim_y"] < 1
