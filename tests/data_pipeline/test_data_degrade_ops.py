"""The degradation's operators against independent computations: the torch-semantics resize against PyTorch's own
F.interpolate, the tensor JPEG against a float64 re-derivation of the JPEG steps written out here, the reader's
resize-back; and the pipeline with every backend: recorded parameters replay the LR, legacy parameters replay."""

from __future__ import annotations

import json
import math
import random

import cv2
import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from data_pipeline.config import DegradationConfig
from data_pipeline.degrade import (
    apply_degradation,
    degrade,
    pick_resize_back_mode,
    random_resize_back,
    resize_back,
    sample_degradation,
    torch_resize,
)
from data_pipeline.degrade.jpeg import diff_jpeg, lib_jpeg, quality_factor
from data_pipeline.degrade.resize import opencv_resize


def _torch(img: np.ndarray, mode: str, **kw) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]
    extra = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(t, mode=mode, **kw, **extra)[0].permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def photo():
    return np.ascontiguousarray(skimage.data.astronaut()[40:240, 150:323]).astype(np.float32) / 255.0  # 200 x 173


# ------------------------------------------------------------------------------------------------------- resize
@pytest.mark.parametrize("mode", ["area", "bilinear", "bicubic"])
@pytest.mark.parametrize("scale", [0.3, 0.4137, 0.5, 0.77, 1.0, 1.0009, 1.013, 1.2, 1.5, 2.0])
def test_resize_by_scale_factor_equals_torch(photo, mode, scale):
    rng = np.random.default_rng(7)
    for img in (photo, rng.random((37, 53, 3), dtype=np.float32), rng.random((8, 90, 3), dtype=np.float32)):
        ref = _torch(img, mode, scale_factor=scale)
        out = torch_resize(img, mode, scale_factor=scale)
        assert out.shape == ref.shape and out.dtype == np.float32
        np.testing.assert_allclose(out, ref, rtol=0, atol=5e-5)


@pytest.mark.parametrize("mode", ["area", "bilinear", "bicubic"])
def test_resize_to_size_equals_torch(photo, mode):
    for size in ((50, 43), (128, 128), (200, 180), (77, 400), (31, 29), (600, 519)):
        ref = _torch(photo, mode, size=size)
        out = torch_resize(photo, mode, size=size)
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=0, atol=5e-5)
    grey = photo[..., 1].copy()  # 2-D arrays work too
    ref = _torch(grey[..., None], mode, size=(64, 70))[..., 0]
    np.testing.assert_allclose(torch_resize(grey, mode, size=(64, 70)), ref, rtol=0, atol=5e-5)


def test_scale_factor_mapping_is_not_size_mapping(photo):
    """What the reference's first resize does (1/s pixel mapping) differs from resizing to the same size, and
    OpenCV (size-ratio mapping, its own area averaging) differs from both; the difference is real content."""
    for mode in ("bilinear", "bicubic"):
        by_s = torch_resize(photo, mode, scale_factor=0.3)
        by_size = torch_resize(photo, mode, size=by_s.shape[:2])
        assert by_s.shape == by_size.shape and np.abs(by_s - by_size).max() > 0.05
    a = torch_resize(photo, "area", scale_factor=0.3)
    cv = opencv_resize(photo, "area", a.shape[:2])
    assert np.abs(a - cv).max() > 0.02
    with pytest.raises(ValueError, match="exactly one"):
        torch_resize(photo, "area")
    with pytest.raises(ValueError, match="unknown resize mode"):
        torch_resize(photo, "lanczos", size=(10, 10))


# ---------------------------------------------------------------------------------------------------- JPEG
_Y = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.float64,
)
_CH = np.full((8, 8), 99.0)
_CH[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]


def _jpeg_float64(img: np.ndarray, q: float) -> tuple[np.ndarray, np.ndarray]:
    """The JPEG steps one by one in float64, with the DCT as cosine sums over each 8x8 block. Returns the RGB result in
    [0, 1] and a per-pixel mask of the pixels whose blocks hold a coefficient within float32 error of a rounding
    tie (where float32 arithmetic may legitimately round the other way)."""
    h, w = img.shape[:2]
    hp, wp = h + (-h % 16), w + (-w % 16)
    x = np.zeros((hp, wp, 3))
    x[:h, :w] = img.astype(np.float64) * 255.0  # zero (black) padding to multiples of 16
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128.0
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128.0
    factor = (5000.0 / q if q < 50 else 200.0 - 2.0 * q) / 100.0
    cos = np.array([[math.cos((2 * px + 1) * f * math.pi / 16) for px in range(8)] for f in range(8)])  # [f, px]
    alpha = np.array([1 / math.sqrt(2)] + [1.0] * 7)

    def code(plane, table):
        out, tie = np.zeros_like(plane), np.zeros(plane.shape, bool)
        qt = table.T * factor  # the reference's transposed indexing
        for by in range(0, plane.shape[0], 8):
            for bx in range(0, plane.shape[1], 8):
                blk = plane[by : by + 8, bx : bx + 8] - 128.0
                # F(u, v) = 1/4 a(u) a(v) sum_ij f(i, j) cos((2i+1) u pi/16) cos((2j+1) v pi/16)
                coef = 0.25 * np.outer(alpha, alpha) * np.einsum("ij,ui,vj->uv", blk, cos, cos)
                quot = coef / qt
                # float32 DCTs of 8-bit-range blocks carry well under 1e-4 absolute error per coefficient
                tie[by : by + 8, bx : bx + 8] = (np.abs(quot - np.floor(quot) - 0.5) < 2e-4 / qt).any()
                deq = np.round(quot) * qt
                # f(i, j) = 1/4 sum_uv a(u) a(v) F(u, v) cos((2i+1) u pi/16) cos((2j+1) v pi/16)
                out[by : by + 8, bx : bx + 8] = (
                    0.25 * np.einsum("uv,ui,vj->ij", np.outer(alpha, alpha) * deq, cos, cos) + 128.0
                )
        return out, tie

    def sub(p):
        return (p[0::2, 0::2] + p[1::2, 0::2] + p[0::2, 1::2] + p[1::2, 1::2]) / 4.0

    def up(p):
        return np.repeat(np.repeat(p, 2, 0), 2, 1)

    y2, ty = code(y, _Y)
    cb2, tcb = code(sub(cb), _CH)
    cr2, tcr = code(sub(cr), _CH)
    cb2, cr2 = up(cb2), up(cr2)
    rgb = np.stack(
        [y2 + 1.402 * (cr2 - 128), y2 - 0.344136 * (cb2 - 128) - 0.714136 * (cr2 - 128), y2 + 1.772 * (cb2 - 128)], -1
    )
    tie = ty | up(tcb) | up(tcr)
    return (np.clip(rgb, 0, 255) / 255.0)[:h, :w], tie[:h, :w]


@pytest.mark.parametrize("q", [31.7, 60.0, 72.25, 88.8, 97.3])
def test_diff_jpeg_equals_float64_derivation(q):
    rng = np.random.default_rng(3)
    smooth = cv2.GaussianBlur(rng.random((45, 70, 3)).astype(np.float32), (0, 0), 1.2)  # not multiples of 16
    photo = skimage.data.chelsea()[100:164, 200:280].astype(np.float32) / 255.0
    for img in (smooth, photo):
        ref, tie = _jpeg_float64(img, q)
        out = diff_jpeg(img, q)
        assert out.shape == img.shape and out.dtype == np.float32
        assert tie.mean() < 0.15  # the comparison covers most of the image
        np.testing.assert_allclose(out[~tie], ref[~tie], rtol=0, atol=2e-6)
        assert np.abs(out - ref).max() < 0.02  # near ties: one quantisation step at most


def test_diff_jpeg_behaves_like_jpeg():
    img = skimage.data.astronaut()[100:164, 180:260].astype(np.float32) / 255.0
    errs = [float(np.abs(diff_jpeg(img, q) - img).mean()) for q in (40.0, 60.0, 80.0, 95.0, 99.9)]
    assert errs == sorted(errs, reverse=True) and errs[0] > 2 * errs[-1]
    grey = np.repeat(img.mean(axis=2, keepdims=True), 3, axis=2)  # no chroma: 4:2:0 loses nothing
    assert float(np.abs(diff_jpeg(grey, 99.9) - grey).max()) < 0.5 / 255
    assert float(np.abs(diff_jpeg(grey, 50.0) - grey).mean()) > 1 / 255
    assert not np.array_equal(diff_jpeg(img, 80.0), diff_jpeg(img, 80.4))  # the quality is a float
    assert quality_factor(80.0) == np.float32(0.4) and quality_factor(25.0) == np.float32(2.0)
    # a close relative of libjpeg at the same quality, not the same operator
    lj = lib_jpeg(img, 80)
    dj = diff_jpeg(img, 80.0)
    assert 0 < float(np.abs(dj - lj).mean()) < float(np.abs(dj - img).mean())
    # flat colour: 4:2:0 and the DCT keep it (no chroma bleeding inside the image)
    flat = np.broadcast_to(np.array([0.2, 0.5, 0.7], np.float32), (32, 32, 3)).copy()
    np.testing.assert_allclose(diff_jpeg(flat, 75.0), flat, atol=1.5 / 255)


# ------------------------------------------------------------------------------------------------ resize-back
def test_resize_back_is_interpolate_then_8bit():
    lr = skimage.data.coffee()[:64, :96].copy()  # uint8 (64, 96, 3)
    x = torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255.0
    for mode in ("area", "bilinear", "bicubic"):
        out = resize_back(lr, (256, 384), mode)
        assert isinstance(out, torch.Tensor) and out.shape == (3, 256, 384) and out.dtype == torch.float32
        codes = out * 255
        assert torch.equal(codes, torch.round(codes)) and 0 <= float(codes.min()) and float(codes.max()) <= 255
        extra = {} if mode == "area" else {"align_corners": False}
        ref = F.interpolate(x, size=(256, 384), mode=mode, **extra)[0] * 255.0
        ref_codes = torch.clamp(torch.round(ref), 0, 255)
        diff = (codes - ref_codes).abs()
        assert float(diff.max()) <= 1
        # a code may differ only where the unrounded value sits on a rounding tie (8-bit inputs make exact .5s)
        off = diff > 0
        assert bool(((ref[off] - ref[off].floor() - 0.5).abs() < 1e-3).all())


def test_random_resize_back_draws_modes_uniformly_and_records_them():
    lr = skimage.data.coffee()[:32, :32].copy()
    counts = {"area": 0, "bilinear": 0, "bicubic": 0}
    rng = random.Random(5)
    for _ in range(600):
        t, p = random_resize_back(lr, (128, 128), rng)
        counts[p["mode"]] += 1
        if counts[p["mode"]] <= 2:  # the recorded mode replays the tensor
            assert torch.equal(t, resize_back(lr, (128, 128), p["mode"]))
    assert all(150 < c < 250 for c in counts.values()), counts
    gen = [pick_resize_back_mode(np.random.default_rng(11)) for _ in range(3)]
    assert len(set(gen)) == 1  # same seed, same draw
    assert pick_resize_back_mode(9, ["bilinear"]) == "bilinear"
    assert {pick_resize_back_mode(np.random.default_rng(s), ("area", "bicubic")) for s in range(40)} == {
        "area",
        "bicubic",
    }
    with pytest.raises(ValueError, match="unknown resize-back mode"):
        pick_resize_back_mode(0, ["nearest"])


# -------------------------------------------------------------------------------------------------- pipeline
BACKENDS = [("torch", "diffjpeg"), ("torch", "libjpeg"), ("opencv", "diffjpeg"), ("opencv", "libjpeg")]


@pytest.mark.parametrize("resize_backend,jpeg_backend", BACKENDS)
def test_recorded_parameters_replay_the_lr_with_every_backend(resize_backend, jpeg_backend):
    hr = np.ascontiguousarray(skimage.data.astronaut()[64:192, 300:428])
    cfg = DegradationConfig(resize_backend=resize_backend, jpeg_backend=jpeg_backend)
    for seed in range(6):
        lr, params = degrade(hr, cfg, seed)
        assert lr.shape == (32, 32, 3)
        assert params["backends"] == {"resize": resize_backend, "jpeg": jpeg_backend}
        assert params["resize_back"] == {"modes": ["area", "bilinear", "bicubic"]}
        q = params["jpeg1"]["quality"], params["jpeg2"]["quality"]
        assert all(isinstance(v, int if jpeg_backend == "libjpeg" else float) for v in q)
        replayed = apply_degradation(hr, json.loads(json.dumps(params)))  # through the sample JSON
        np.testing.assert_array_equal(replayed, lr)


def test_backends_change_only_the_operators():
    """Same seed, same draws: only the qualities' rounding differs; the LR changes with each operator."""
    hr = np.ascontiguousarray(skimage.data.astronaut()[:256, 128:384])
    out = {}
    for rb, jb in BACKENDS:
        cfg = DegradationConfig(resize_backend=rb, jpeg_backend=jb)
        lr, p = degrade(hr, cfg, 21)
        out[(rb, jb)] = (lr, p)
    ref = out[("torch", "diffjpeg")][1]
    for (_, jb), (_, p) in out.items():
        for k in (
            "kernel1",
            "kernel2",
            "resize1",
            "resize2",
            "resize3",
            "noise1",
            "noise2",
            "final_sinc",
            "final_order",
            "second_blur",
        ):
            assert p[k] == ref[k]
        assert p["jpeg1"]["quality"] == (round(ref["jpeg1"]["quality"]) if jb == "libjpeg" else ref["jpeg1"]["quality"])
    lrs = [v[0] for v in out.values()]
    assert all(not np.array_equal(lrs[i], lrs[j]) for i in range(4) for j in range(i + 1, 4))


def test_parameters_without_backends_replay_with_the_earlier_operators():
    """Shards written before the backends were recorded (OpenCV resize, libjpeg) still replay exactly."""
    hr = np.ascontiguousarray(skimage.data.astronaut()[200:328, 100:228])
    cfg = DegradationConfig(resize_backend="opencv", jpeg_backend="libjpeg")
    for seed in range(4):
        lr, params = degrade(hr, cfg, seed)
        legacy = {k: v for k, v in params.items() if k not in ("backends", "resize_back")}
        np.testing.assert_array_equal(apply_degradation(hr, legacy), lr)


def test_pipeline_resize_dispatch_by_scale_factor_or_size():
    """The first-order resize goes by scale factor (torch backend: F.interpolate(scale_factor=s)); the opencv
    backend resizes to floor(size * s) with its own mapping; the later resizes go to a size in both."""
    from data_pipeline.degrade.realesrgan import _resize

    img = np.ascontiguousarray(skimage.data.astronaut()[:160, :160]).astype(np.float32) / 255.0
    for mode in ("area", "bilinear", "bicubic"):
        a = _resize(img, "torch", mode, scale=0.4137)
        np.testing.assert_allclose(a, _torch(img, mode, scale_factor=0.4137), rtol=0, atol=5e-5)
        b = _resize(img, "opencv", mode, scale=0.4137)
        assert b.shape == a.shape and np.abs(a - b).max() > 1e-3
        c = _resize(img, "torch", mode, size_hw=(50, 61))
        np.testing.assert_allclose(c, _torch(img, mode, size=(50, 61)), rtol=0, atol=5e-5)


def test_bad_backend_or_mode_names_fail_clearly():
    rng = np.random.default_rng(0)
    cfg = DegradationConfig()
    cfg.resize_backend = "pil"
    with pytest.raises(ValueError, match="resize_backend"):
        sample_degradation(rng, cfg, (64, 64))
    cfg = DegradationConfig()
    cfg.resize_back_modes = ("area", "nearest")
    with pytest.raises(ValueError, match="resize_back_modes"):
        sample_degradation(rng, cfg, (64, 64))
    params = sample_degradation(rng, DegradationConfig(), (64, 64))
    params["backends"] = {"resize": "torch", "jpeg": "webp"}
    with pytest.raises(ValueError, match="unknown JPEG backend"):
        apply_degradation(np.zeros((64, 64, 3), np.uint8), params)


def test_clean_variants_are_the_benchmark_bicubic_lr_and_replay_from_their_json():
    """``clean_variants: 1``: variant 0 of a crop is PIL's bicubic x4 downsample (the evaluation protocol's LR),
    recorded as such and replayed by ``apply_degradation``; variant 1 still gets the Real-ESRGAN chain."""
    from PIL import Image

    hr = np.ascontiguousarray(skimage.data.astronaut()[64:192, 300:428])
    cfg = DegradationConfig(clean_variants=1)
    clean, params = degrade(hr, cfg, 5, variant=0)
    expect = np.asarray(Image.fromarray(hr).resize((32, 32), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(clean, expect)
    assert params["kind"] == "bicubic" and params["scale"] == 4
    np.testing.assert_array_equal(apply_degradation(hr, json.loads(json.dumps(params))), clean)
    damaged, p1 = degrade(hr, cfg, 5, variant=1)
    assert "kernel1" in p1 and damaged.shape == clean.shape and not np.array_equal(damaged, clean)
    np.testing.assert_array_equal(degrade(hr, DegradationConfig(), 5, variant=0)[0], degrade(hr, cfg, 5, 1)[0])
