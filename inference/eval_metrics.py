"""The metrics of ``varsr eval --suite`` by name: the research code's Table 1 set (PSNR-Y, SSIM-Y, LPIPS, DISTS, FID,
NIQE, CLIP-IQA, MUSIQ, MANIQA) plus RGB PSNR/SSIM and BRISQUE (docs/EVALUATION.md).

* Offline metrics are plain functions of ``infra/core/metrics.py``: PSNR/SSIM on the BT.601 Y channel and on RGB
  (no border crop unless ``crop_border`` is set), NIQE and BRISQUE (parameters installed by the set-up).
* Learned metrics are plug-ins around the packages that ship them (torchmetrics for LPIPS/DISTS/FID, pyiqa for MUSIQ,
  MANIQA, CLIP-IQA): each takes a local weights folder, never downloads (hub / Hugging Face offline), and when its
  package or weights are absent says in one line what is missing; the suite then skips it, or, when the metric was
  asked for explicitly, stops with that line.

Every metric scores uint8 RGB arrays (HxWx3): ``score(sr, hr)`` for per-image metrics (``hr`` unused by the
no-reference ones); ``score_set(srs, hrs)`` for distribution metrics (FID).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from infra.core import metrics as M
from infra.core.errors import UserError
from infra.core.metrics import MetricUnavailable

Scorer = Callable[[np.ndarray, "np.ndarray | None"], float]


@dataclass(frozen=True)
class MetricInfo:
    """What a metric is: ``kind`` fr (needs the HR) | nr (no reference) | set (a distribution over the set)."""

    name: str
    kind: str
    higher_better: bool
    learned: bool
    source: str  # what implements it (recorded in docs/EVALUATION.md and the suite's summary)


@dataclass
class Metric:
    """A loaded metric: per-image ``fn(sr, hr)`` or set-level ``set_fn(srs, hrs)``."""

    info: MetricInfo
    fn: Scorer | None = None
    set_fn: Callable[[list[np.ndarray], list[np.ndarray]], float] | None = None

    def score(self, sr: np.ndarray, hr: np.ndarray | None) -> float:
        if self.fn is None:
            raise TypeError(f"{self.info.name} is a set metric; use score_set")
        if self.info.kind == "fr" and hr is None:
            raise ValueError(f"{self.info.name} needs the HR reference")
        return float(self.fn(sr, hr))

    def score_set(self, srs: list[np.ndarray], hrs: list[np.ndarray]) -> float:
        if self.set_fn is None:
            raise TypeError(f"{self.info.name} is a per-image metric; use score")
        return float(self.set_fn(srs, hrs))


# ---- offline ------------------------------------------------------------------------------------------------------
def _y(a: np.ndarray, crop: int) -> np.ndarray:
    y = M.rgb_to_y(M.as_float_rgb(a))
    return y[crop:-crop, crop:-crop] if crop else y


def _rgb(a: np.ndarray, crop: int) -> np.ndarray:
    x = M.as_float_rgb(a)
    return x[crop:-crop, crop:-crop] if crop else x


def _offline(crop_border: int) -> dict[str, tuple[MetricInfo, Scorer]]:
    c = crop_border
    core = "infra/core/metrics.py"
    return {
        "psnr_y": (MetricInfo("psnr_y", "fr", True, False, core), lambda s, h: M.psnr(_y(s, c), _y(h, c))),
        "ssim_y": (MetricInfo("ssim_y", "fr", True, False, core), lambda s, h: M.ssim(_y(s, c), _y(h, c))),
        "psnr_rgb": (MetricInfo("psnr_rgb", "fr", True, False, core), lambda s, h: M.psnr(_rgb(s, c), _rgb(h, c))),
        "ssim_rgb": (MetricInfo("ssim_rgb", "fr", True, False, core), lambda s, h: M.ssim(_rgb(s, c), _rgb(h, c))),
        "niqe": (
            MetricInfo("niqe", "nr", False, False, f"{core} (BasicSR 1.4.2 pristine params)"),
            lambda s, h: M.niqe(s, crop_border=c),
        ),
        "brisque": (
            MetricInfo("brisque", "nr", False, False, "brisque==0.2.0 (features + shipped SVR)"),
            lambda s, h: M.brisque(s),
        ),
    }


OFFLINE = tuple(_offline(0))


# ---- learned plug-ins ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _offline_hubs(weights_dir: Path) -> Iterator[None]:
    """Point torch hub and Hugging Face at ``weights_dir`` and forbid downloads while a plug-in loads."""
    import torch

    keep = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME")}
    hub = torch.hub.get_dir()
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(weights_dir / "huggingface"))
    torch.hub.set_dir(str(weights_dir / "torch_hub"))
    try:
        yield
    finally:
        torch.hub.set_dir(hub)
        for k, v in keep.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _need_modules(name: str, *modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MetricUnavailable(
            f"{name}: needs the {', '.join(missing)} package(s), which are not installed "
            f"(docs/EVALUATION.md, 'Learned metrics')"
        )


def _need_file(name: str, path: Path, what: str) -> None:
    if not path.is_file():
        raise MetricUnavailable(f"{name}: weights missing: {path} ({what})")


def _to_tensor(a: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float() / 255.0


def _pairwise(module) -> Scorer:
    """A full-reference scorer from a torchmetrics module called as ``module(sr, hr)`` on [0, 1] tensors."""

    def run(sr: np.ndarray, hr: np.ndarray | None) -> float:
        assert hr is not None  # Metric.score checks full-reference inputs
        return float(module(_to_tensor(sr), _to_tensor(hr)))

    return run


# torchvision backbone files torchmetrics' LPIPS / DISTS load from the torch hub cache (the linear / alpha-beta layers
# ship inside torchmetrics itself)
TV_BACKBONES = {"lpips": "alexnet-owt-7be5be79.pth", "dists": "vgg16-397923af.pth"}


def _lpips(weights_dir: Path) -> Metric:
    _need_modules("lpips", "torchvision")
    _need_file(
        "lpips",
        weights_dir / "torch_hub" / "checkpoints" / TV_BACKBONES["lpips"],
        "torchvision's AlexNet, the backbone of torchmetrics' LPIPS",
    )
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    with _offline_hubs(weights_dir):
        m = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).eval()
    return Metric(MetricInfo("lpips", "fr", False, True, "torchmetrics LPIPS (alex)"), fn=_pairwise(m))


def _dists(weights_dir: Path) -> Metric:
    _need_modules("dists", "torchvision")
    _need_file(
        "dists",
        weights_dir / "torch_hub" / "checkpoints" / TV_BACKBONES["dists"],
        "torchvision's VGG16, the backbone of torchmetrics' DISTS",
    )
    from torchmetrics.image.dists import DeepImageStructureAndTextureSimilarity

    with _offline_hubs(weights_dir):
        m = DeepImageStructureAndTextureSimilarity().eval()
    return Metric(MetricInfo("dists", "fr", False, True, "torchmetrics DISTS"), fn=_pairwise(m))


FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"


def _fid(weights_dir: Path) -> Metric:
    _need_modules("fid", "torch_fidelity", "torchvision")
    path = weights_dir / FID_WEIGHTS
    _need_file("fid", path, "torch-fidelity's InceptionV3 (FID's feature extractor)")
    from torchmetrics.image.fid import FrechetInceptionDistance

    def run(srs: list[np.ndarray], hrs: list[np.ndarray]) -> float:
        if len(srs) < 2:
            return float("nan")  # a covariance needs two images
        fid = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(path))
        for s, h in zip(srs, hrs):
            fid.update(_to_tensor(h), real=True)
            fid.update(_to_tensor(s), real=False)
        return float(fid.compute())

    return Metric(MetricInfo("fid", "set", False, True, "torchmetrics FID (torch-fidelity InceptionV3)"), set_fn=run)


# pyiqa metric names; the MANIQA variant changes numbers (the authors' note), so it is part of the metric's name
PYIQA = {
    "musiq": ("musiq", True),
    "maniqa": ("maniqa", True),
    "maniqa-koniq": ("maniqa-koniq", True),
    "maniqa-kadid": ("maniqa-kadid", True),
    "clipiqa": ("clipiqa", True),
}


def _pyiqa(name: str, weights_dir: Path) -> Metric:
    _need_modules(name, "pyiqa")
    import pyiqa  # optional: not installed by the set-up

    pyiqa_name, higher = PYIQA[name]
    try:
        with _offline_hubs(weights_dir):
            m = pyiqa.create_metric(pyiqa_name, device="cpu", as_loss=False)
    except Exception as e:  # noqa: BLE001 - pyiqa raises many kinds when its weights are not in the cache, offline
        raise MetricUnavailable(
            f"{name}: pyiqa could not load its weights offline from {weights_dir / 'torch_hub'} ({type(e).__name__})"
        ) from None
    return Metric(
        MetricInfo(name, "nr", higher, True, f"pyiqa {pyiqa_name}"), fn=lambda s, h: float(m(_to_tensor(s)).item())
    )


LEARNED: dict[str, Callable[[Path], Metric]] = {
    "lpips": _lpips,
    "dists": _dists,
    "fid": _fid,
    **{n: functools.partial(_pyiqa, n) for n in PYIQA},
}
TABLE1 = ("psnr_y", "ssim_y", "lpips", "dists", "fid", "niqe", "clipiqa", "musiq", "maniqa")
ALL = (*OFFLINE, *LEARNED)


def higher_is_better(name: str) -> bool:
    """Which way a metric improves, without loading it."""
    if name in _offline(0):
        return _offline(0)[name][0].higher_better
    return PYIQA[name][1] if name in PYIQA else False  # lpips, dists, fid: distances


def default_weights_dir() -> Path:
    """``$VARSR_EVAL_WEIGHTS``, else ``~/.cache/varsr/eval-weights`` (torch_hub/, huggingface/, FID's file)."""
    return Path(os.environ.get("VARSR_EVAL_WEIGHTS") or Path.home() / ".cache" / "varsr" / "eval-weights")


def load_metrics(
    names: list[str] | tuple[str, ...],
    weights_dir: str | Path | None = None,
    crop_border: int = 0,
    required: tuple[str, ...] | list[str] = (),
) -> tuple[list[Metric], list[str]]:
    """The metrics ``names`` (``all`` = every known one), loaded, and one notice per skipped one.

    Unknown names raise :class:`UserError`. A metric whose package or weights are absent is skipped with its one-line
    notice, unless it is in ``required``: then its line is raised as a :class:`UserError`."""
    wanted = list(ALL) if list(names) == ["all"] else list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in ALL]
    if unknown:
        raise UserError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(ALL)}")
    offline = _offline(crop_border)
    wdir = Path(weights_dir) if weights_dir else default_weights_dir()
    out, notices = [], []
    for n in wanted:
        if n in offline:
            info, fn = offline[n]
            try:
                if n == "niqe":
                    M.load_niqe_params()
                elif n == "brisque":
                    M.brisque_model()
            except MetricUnavailable as e:
                if n in required:
                    raise UserError(str(e)) from None
                notices.append(f"skipped {e}")
                continue
            out.append(Metric(info, fn=fn))
            continue
        try:
            out.append(LEARNED[n](wdir))
        except MetricUnavailable as e:
            if n in required:
                raise UserError(str(e)) from None
            notices.append(f"skipped {e}")
    return out, notices


def score_image(sr: np.ndarray, hr: np.ndarray | None, metrics: list[Metric]) -> dict[str, float]:
    """Every per-image metric of ``metrics`` for one result (the one way the platform scores an image)."""
    return {m.info.name: m.score(sr, hr) for m in metrics if m.fn is not None}
