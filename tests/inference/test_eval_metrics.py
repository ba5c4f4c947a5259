"""Offline metrics of the evaluation protocol against independent computations (docs/EVALUATION.md).

* NIQE (infra/core/metrics.py, written from the published algorithm) against BasicSR 1.4.2's own NIQE, run from the
  source distribution the set-up caches (infra/scripts/fetch_niqe_params.sh): within 1e-5 (relative) when both
  start from the same float64 Y (BasicSR's imresize still uses float32 weights), and within 2 % of BasicSR's
  end-to-end ``calculate_niqe`` (which computes in float32).
* PSNR-Y / SSIM-Y against a plain numpy PSNR and scikit-image's SSIM on the BT.601 Y channel, no border crop.
* BRISQUE: the package's SVR behind a plain function; it ranks distortions as the metric should.
* The metric registry: unknown names and explicitly requested but absent learned metrics fail with one line, absent
  ones that were not required are skipped with one line; LPIPS runs from a local weights folder where torchvision
  exists (random-initialised backbone saved in the hub layout).
"""

from __future__ import annotations

import importlib
import sys
import tarfile
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFilter
from skimage import data as skdata
from skimage.metrics import structural_similarity

from inference.eval_metrics import load_metrics, score_image
from infra.core import metrics as M
from infra.core.errors import UserError

BASICSR_FILES = (
    "metrics/niqe.py",
    "metrics/niqe_pris_params.npz",
    "metrics/metric_util.py",
    "utils/color_util.py",
    "utils/matlab_functions.py",
    "utils/registry.py",
)


@pytest.fixture(scope="module")
def basicsr_niqe(tmp_path_factory):
    """BasicSR 1.4.2's NIQE module, imported from the cached sdist (only the five files it needs)."""
    sdist = M.eval_cache_dir() / "basicsr-1.4.2.tar.gz"
    assert sdist.is_file(), "run infra/scripts/setup.sh (fetch_niqe_params.sh caches the sdist)"
    root = tmp_path_factory.mktemp("basicsr")
    with tarfile.open(sdist) as t:
        for rel in BASICSR_FILES:
            f = t.extractfile(f"basicsr-1.4.2/basicsr/{rel}")
            assert f is not None
            (root / "basicsr" / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / "basicsr" / rel).write_bytes(f.read())
    (root / "basicsr" / "__init__.py").write_text("")
    (root / "basicsr" / "metrics" / "__init__.py").write_text("")
    (root / "basicsr" / "utils" / "__init__.py").write_text("from .color_util import bgr2ycbcr\n")
    sys.path.insert(0, str(root))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # it imports scipy.ndimage.filters
            mod = importlib.import_module("basicsr.metrics.niqe")
        yield mod
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n == "basicsr" or n.startswith("basicsr.")]:
            del sys.modules[name]


def _photos() -> dict[str, np.ndarray]:
    return {
        "coffee": skdata.coffee()[:288, :384],
        "chelsea": skdata.chelsea()[:192, :384],
        "motorcycle": skdata.stereo_motorcycle()[0][100:388, 200:488],
    }


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_niqe_matches_basicsr_reference(basicsr_niqe):
    mu, cov, win = M.load_niqe_params()
    for name, rgb in _photos().items():
        ours = M.niqe(rgb)
        y = np.round(M.rgb_to_y(M.as_float_rgb(rgb)) * 255.0)
        same_precision = basicsr_niqe.niqe(y, mu[None], cov, win)
        assert ours == pytest.approx(same_precision, rel=1e-5), name  # its imresize weights are float32
        end_to_end = basicsr_niqe.calculate_niqe(
            rgb[..., ::-1].astype(np.float64), 0, input_order="HWC", convert_to="y"
        )
        assert ours == pytest.approx(float(end_to_end), rel=0.02), name
        assert 1.0 < ours < 20.0


def test_niqe_rises_with_blur_and_needs_a_patch():
    rgb = _photos()["motorcycle"]
    blurred = np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(3)))
    assert M.niqe(blurred) > M.niqe(rgb) + 1.0
    with pytest.raises(ValueError, match="at least 96x96"):
        M.niqe(rgb[:90, :200])
    assert M.niqe(rgb, crop_border=4) != M.niqe(rgb)


def test_niqe_params_missing_or_altered_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(M.NIQE_PARAMS_ENV, str(tmp_path / "nope.npz"))
    with pytest.raises(M.MetricUnavailable, match="setup.sh") as e:
        M.niqe(skdata.coffee())
    assert "\n" not in str(e.value)
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu_pris_param=np.zeros((1, 36)), cov_pris_param=np.eye(36), gaussian_window=np.ones((7, 7)))
    monkeypatch.setenv(M.NIQE_PARAMS_ENV, str(bad))
    with pytest.raises(M.MetricUnavailable, match="sha256"):
        M.niqe(skdata.coffee())
    with pytest.raises(UserError, match="^niqe: .*sha256"):
        load_metrics(["niqe"], required=["niqe"])
    metrics, notices = load_metrics(["niqe", "psnr_y"])
    assert [m.info.name for m in metrics] == ["psnr_y"] and len(notices) == 1 and "\n" not in notices[0]


def test_imresize_half_is_matlab_bicubic_antialiased():
    # a constant stays constant (weights sum to one, symmetric borders); a ramp's mean is kept
    assert np.allclose(M.imresize_half(np.full((10, 14), 7.0)), 7.0)
    ramp = np.tile(np.arange(16, dtype=np.float64), (8, 1))
    out = M.imresize_half(ramp)
    assert out.shape == (4, 8) and out.mean() == pytest.approx(ramp.mean(), abs=0.05)
    # interior samples of a linear ramp land on the midpoints of the pixel pairs they cover
    assert out[0, 3] == pytest.approx(6.5, abs=1e-9)


def _y(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64) / 255
    return 16 / 255 + (65.481 * a[..., 0] + 128.553 * a[..., 1] + 24.966 * a[..., 2]) / 255


def test_psnr_ssim_y_match_independent_numpy_and_skimage():
    hr = skdata.astronaut()[:128, :160]
    sr = np.asarray(Image.fromarray(hr).resize((40, 32), Image.BICUBIC).resize((160, 128), Image.BICUBIC))
    metrics, _ = load_metrics(["psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb"])
    got = score_image(sr, hr, metrics)
    yh, ys = _y(hr), _y(sr)
    assert got["psnr_y"] == pytest.approx(10 * np.log10(1.0 / np.mean((yh - ys) ** 2)), abs=1e-9)
    kw = dict(data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert got["ssim_y"] == pytest.approx(structural_similarity(yh, ys, **kw), abs=2e-3)
    assert got["ssim_rgb"] == pytest.approx(structural_similarity(hr / 255, sr / 255, channel_axis=2, **kw), abs=2e-3)
    cropped, _ = load_metrics(["psnr_y"], crop_border=4)
    assert score_image(sr, hr, cropped)["psnr_y"] == pytest.approx(
        10 * np.log10(1.0 / np.mean((yh[4:-4, 4:-4] - ys[4:-4, 4:-4]) ** 2)), abs=1e-9
    )


def test_brisque_ranks_distortions_and_uses_the_pinned_model():
    rgb = skdata.stereo_motorcycle()[0][:256, :256]
    clean = M.brisque(rgb)
    noisy = np.clip(rgb + np.random.default_rng(0).normal(0, 25, rgb.shape), 0, 255).astype(np.uint8)
    blurred = np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(3)))
    assert clean < M.brisque(noisy) and clean < M.brisque(blurred)
    assert M.brisque(Image.fromarray(rgb)) == clean
    assert isinstance(clean, float) and np.isfinite(clean)


def test_unknown_and_absent_learned_metrics_are_one_line(tmp_path):
    with pytest.raises(UserError, match="unknown metric.*nope"):
        load_metrics(["psnr_y", "nope"])
    metrics, notices = load_metrics(["psnr_y", "lpips", "musiq", "fid"], weights_dir=tmp_path)
    assert [m.info.name for m in metrics] == ["psnr_y"]
    assert len(notices) == 3 and all("\n" not in n and n.startswith("skipped ") for n in notices)
    for name in ("lpips", "dists", "musiq", "maniqa", "clipiqa", "fid"):
        with pytest.raises(UserError, match=f"^{name}: ") as e:
            load_metrics([name], weights_dir=tmp_path, required=[name])
        assert "\n" not in str(e.value)


def test_lpips_runs_from_a_local_weights_folder(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    import torch

    from inference.eval_metrics import TV_BACKBONES

    path = tmp_path / "torch_hub" / "checkpoints" / TV_BACKBONES["lpips"]
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    (m,), notices = load_metrics(["lpips"], weights_dir=tmp_path, required=["lpips"])
    a = skdata.coffee()[:64, :64]
    assert not notices and m.score(a, a) == pytest.approx(0.0, abs=1e-6)
    assert m.score(255 - a, a) > 0
