"""Real-ESRGAN degradation (docs/MODEL.md §5.7): kernels, parameter ranges, sizes, determinism, the varsr-mild
preset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import skimage.data

from data_pipeline.config import BuildConfig, DegradationConfig, load_build_config
from data_pipeline.degrade import apply_degradation, degrade, sample_degradation
from data_pipeline.degrade.kernels import kernel_from_params, mixed_kernel, pad_to, sinc_kernel
from data_pipeline.degrade.realesrgan import blur

PI = math.pi


@pytest.fixture(scope="module")
def hr128():
    return np.ascontiguousarray(skimage.data.astronaut()[100:228, 200:328])


def test_varsr_mild_preset_matches_spec_table():
    d = load_build_config("varsr-mild").degradation
    assert d == BuildConfig().degradation  # the defaults are the paper's
    assert d.scale == 4
    for k, sig in ((d.kernel1, (0.2, 3.0)), (d.kernel2, (0.2, 1.5))):
        assert k.sizes == [7, 9, 11, 13, 15, 17, 19, 21]
        assert k.kernel_list == ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
        assert k.kernel_prob == [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]
        assert k.sinc_prob == 0.1 and k.sigma_x == sig and k.sigma_y == sig
        assert k.rotation == pytest.approx((-PI, PI)) and k.betag_range == (0.5, 4.0) and k.betap_range == (1, 2)
        assert k.sinc_omega_small == pytest.approx((PI / 3, PI)) and k.sinc_omega_large == pytest.approx((PI / 5, PI))
        assert k.sinc_small_below == 13
    assert d.final_sinc_prob == 0.8 and d.final_sinc_omega == pytest.approx((PI / 3, PI))
    assert d.resize_modes == ["area", "bilinear", "bicubic"]
    assert d.resize_prob == (0.2, 0.7, 0.1) and d.resize_range == (0.3, 1.5)
    assert d.gaussian_noise_prob == 0.5 and d.noise_range == (1, 15) and d.poisson_scale_range == (0.05, 2.0)
    assert d.gray_noise_prob == 0.4 and d.jpeg_range == (60, 95)
    assert d.second_blur_prob == 0.5 and d.resize_prob2 == (0.3, 0.4, 0.3) and d.resize_range2 == (0.6, 1.2)
    assert d.gaussian_noise_prob2 == 0.5 and d.noise_range2 == (1, 12) and d.poisson_scale_range2 == (0.05, 1.0)
    assert d.gray_noise_prob2 == 0.4 and d.jpeg_range2 == (60, 100) and d.final_order_resize_first_prob == 0.5
    # the reference's operators: F.interpolate resize, tensor JPEG; resize-back over the three modes
    assert d.resize_backend == "torch" and d.jpeg_backend == "diffjpeg"
    assert tuple(d.resize_back_modes) == ("area", "bilinear", "bicubic")


def test_realesrgan_preset_is_stronger():
    mild, strong = load_build_config("varsr-mild").degradation, load_build_config("realesrgan-x4plus").degradation
    assert strong.preset == "realesrgan-x4plus"
    assert strong.noise_range[1] > mild.noise_range[1] and strong.jpeg_range[0] < mild.jpeg_range[0]
    assert strong.second_blur_prob == 0.8 and strong.resize_range == (0.15, 1.5)
    assert strong.resize_backend == "torch" and strong.jpeg_backend == "libjpeg"


@pytest.mark.parametrize(
    "kind", ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
)
def test_mixed_kernels_sum_to_one_and_peak_at_centre(kind):
    for k in (7, 13, 21):
        ker = mixed_kernel(kind, k, 1.7, 0.6, 0.5, beta=1.5)
        assert ker.shape == (k, k) and ker.sum() == pytest.approx(1.0, abs=1e-12) and (ker >= 0).all()
        assert ker[k // 2, k // 2] == ker.max()
        assert pad_to(ker).shape == (21, 21) and pad_to(ker).sum() == pytest.approx(1.0)
    iso = mixed_kernel("iso", 9, 1.2, 3.0, 1.0)
    np.testing.assert_allclose(iso, iso.T)  # iso ignores sigma_y and rotation
    an = mixed_kernel("aniso", 15, 3.0, 0.5, 0.0)
    assert an[7, :].sum() > an[:, 7].sum()  # wide along x


def test_sinc_kernel_sums_to_one_and_low_passes():
    for k, w in ((7, PI / 3), (21, PI / 5), (13, PI)):
        ker = sinc_kernel(k, w)
        assert ker.sum() == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(ker, ker.T, atol=1e-15)
    # a checkerboard (Nyquist) is strongly attenuated by a pi/3 low-pass
    x = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)[..., None].repeat(3, 2)
    y = blur(x, sinc_kernel(21, PI / 3))
    assert y[20:44, 20:44].std() < 0.05 * x.std()


def test_parameters_lie_in_configured_ranges():
    cfg = DegradationConfig()
    rng = np.random.default_rng(0)
    seen_types, seen_modes, orders = set(), set(), set()
    for _ in range(400):
        p = sample_degradation(rng, cfg, (512, 512))
        for name, kc in (("kernel1", cfg.kernel1), ("kernel2", cfg.kernel2)):
            k = p[name]
            seen_types.add(k["type"])
            assert k["size"] in kc.sizes
            if k["type"] == "sinc":
                lo, hi = kc.sinc_omega_small if k["size"] < 13 else kc.sinc_omega_large
                assert lo <= k["omega_c"] <= hi
            else:
                assert kc.sigma_x[0] <= k["sigma_x"] <= kc.sigma_x[1]
                assert kc.sigma_y[0] <= k["sigma_y"] <= kc.sigma_y[1]
                assert kc.rotation[0] <= k["rotation"] <= kc.rotation[1]
                if k["type"].startswith("generalized"):
                    assert kc.betag_range[0] <= k["beta"] <= kc.betag_range[1]
                elif k["type"].startswith("plateau"):
                    assert kc.betap_range[0] <= k["beta"] <= kc.betap_range[1]
            assert kernel_from_params(k).sum() == pytest.approx(1.0, abs=1e-9)
        r1, r2 = p["resize1"], p["resize2"]
        assert cfg.resize_range[0] <= r1["scale"] <= cfg.resize_range[1]
        assert cfg.resize_range2[0] <= r2["scale"] <= cfg.resize_range2[1]
        assert r2["size"] == [int(128 * r2["scale"])] * 2 and p["resize3"]["size"] == [128, 128]
        seen_modes.update([r1["mode"], r2["mode"], p["resize3"]["mode"]])
        for n, sr, pr in (
            ("noise1", cfg.noise_range, cfg.poisson_scale_range),
            ("noise2", cfg.noise_range2, cfg.poisson_scale_range2),
        ):
            nz = p[n]
            if nz["type"] == "gaussian":
                assert sr[0] <= nz["sigma"] <= sr[1]
            else:
                assert pr[0] <= nz["scale"] <= pr[1]
        assert cfg.jpeg_range[0] <= p["jpeg1"]["quality"] <= cfg.jpeg_range[1]
        assert cfg.jpeg_range2[0] <= p["jpeg2"]["quality"] <= cfg.jpeg_range2[1]
        fs = p["final_sinc"]
        if fs is not None:
            assert fs["size"] in cfg.final_sinc_sizes
            assert cfg.final_sinc_omega[0] <= fs["omega_c"] <= cfg.final_sinc_omega[1]
        orders.add(p["final_order"])
    assert seen_types == {"sinc", *cfg.kernel1.kernel_list}
    assert seen_modes == {"area", "bilinear", "bicubic"} and len(orders) == 2


def test_degrade_sizes_values_and_determinism(hr128):
    cfg = DegradationConfig()
    for seed in range(12):
        lr, params = degrade(hr128, cfg, seed)
        assert lr.shape == (32, 32, 3) and lr.dtype == np.uint8
        assert params["seed"] == seed
        lr2, _ = degrade(hr128, cfg, seed)
        np.testing.assert_array_equal(lr, lr2)
        np.testing.assert_array_equal(apply_degradation(hr128, params), lr)  # params reproduce the LR
        # the LR is a degraded version of the HR: close to its 4x area downscale on average
        ref = hr128.reshape(32, 4, 32, 4, 3).mean(axis=(1, 3))
        assert np.abs(lr.astype(float) - ref).mean() < 40
    a, _ = degrade(hr128, cfg, 1)
    b, _ = degrade(hr128, cfg, 2)
    assert not np.array_equal(a, b)


def test_degrade_at_512_and_other_scale():
    hr = skimage.data.astronaut()
    lr, p = degrade(hr, DegradationConfig(), 123)
    assert lr.shape == (128, 128, 3) and p["resize3"]["size"] == [128, 128]
    lr2, _ = degrade(hr[:256, :256].copy(), DegradationConfig(scale=2), 5)
    assert lr2.shape == (128, 128, 3)


def test_full_sample_at_512(tmp_path):
    """decode -> crop 512 -> degrade -> PNG at the default (paper) geometry; LR 128 reproduced from its JSON."""
    import hashlib
    import json

    from PIL import Image

    from data_pipeline.materialise import materialise_image
    from data_pipeline.shards import decode_png, upsample_lr

    p = tmp_path / "retina.jpg"
    Image.fromarray(skimage.data.retina()).save(p, quality=90)
    data = p.read_bytes()
    row = {
        "uri": str(p),
        "sha256": hashlib.sha256(data).hexdigest(),
        "width": 1411,
        "height": 1411,
        "label": 0,
        "class_id": 7,
        "scores_json": "{}",
        "meta": "{}",
    }
    cfg = BuildConfig()
    [(key, members)] = materialise_image(row, cfg)
    hr, lr, meta = decode_png(members["hr.png"]), decode_png(members["lr.png"]), json.loads(members["json"])
    assert hr.shape == (512, 512, 3) and lr.shape == (128, 128, 3)
    assert meta["crop"]["resized_to"] == [640, 640] and meta["class_id"] == 7 and meta["lr_size"] == [128, 128]
    np.testing.assert_array_equal(apply_degradation(hr, meta["degradation"]["params"]), lr)
    up = upsample_lr(lr, (512, 512), "pil_bicubic")
    assert up.shape == (3, 512, 512) and 0 <= float(up.min()) and float(up.max()) <= 1
