"""Typed configuration of the data pipeline: dataclasses loaded by the platform's config system (``infra.core.config``).

One :class:`BuildConfig` holds every knob of score -> select -> shard; the sections are what each step reads. Every
Real-ESRGAN degradation parameter lives in :class:`DegradationConfig` (docs/MODEL.md §5.7), nothing is hidden in code.
Presets are YAML files in ``configs/data/`` (``varsr-mild``, ``realesrgan-x4plus``, ``tiny``), loaded by name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

from infra.core.config import build, load_config, save_config, to_dict

PIPELINE_VERSION = "0.1.0"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "data"

Range = tuple[float, float]


@dataclass
class SourceConfig:
    """Which files count as inputs and how manifests are read."""

    extensions: list[str] = field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"]
    )
    all_files: bool = False  # folders/globs: take every file, not only image extensions
    manifest_column: str | None = None  # path/URL column of a manifest; default: first of path/url/uri/file


@dataclass
class DecodeConfig:
    """Safe decoding limits (decompression bombs) and colour handling."""

    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 80_000_000
    min_side: int = 8  # below this the file is rejected at decode ("too_small_decode")
    background: tuple[int, int, int] = (255, 255, 255)  # alpha is composited on this colour


@dataclass
class IQAPluginConfig:
    """A learned IQA scorer run when its TorchScript weights exist in the cache (else skipped with a notice)."""

    name: str
    file: str | None = None  # default: {weights_dir}/{name}.pt
    input_size: int = 224  # centre crop/resize fed to the model, (B,3,S,S) float in [0,1]


@dataclass
class ScoreConfig:
    thumb_size: int = 512  # built-in scorers run on a copy whose long side is at most this
    batch_size: int = 16
    num_workers: int | None = None  # actors; default: number of CPUs in the Ray cluster
    weights_dir: str = "~/.cache/varsr/iqa"
    iqa: list[IQAPluginConfig] = field(
        default_factory=lambda: [
            IQAPluginConfig(name="musiq", input_size=384),
            IQAPluginConfig(name="clipiqa"),
            IQAPluginConfig(name="maniqa"),
            IQAPluginConfig(name="aesthetic"),
        ]
    )
    embedder: str = "builtin"  # or "module:function" mapping list[uint8 HWC] -> (N, D) float array
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them and an IQA plug-in is loaded


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    phash_max_distance: int = 4  # Hamming distance on the 64-bit DCT hash


@dataclass
class ClusterConfig:
    """Semantic classes for stage-1 C2I pretraining (paper: ~4,000 clusters, <=1,200 images each)."""

    enabled: bool = True
    k: int = 4000
    max_per_class: int = 1200
    seed: int = 0


@dataclass
class NegativesConfig:
    """Low-quality negatives (label 1) for image-based CFG (docs/MODEL.md §5.6)."""

    rule: Literal["none", "minmax", "percentile"] = "minmax"
    score: str = "quality"  # column; lower = worse
    f: float = 0.4  # minmax: score < min + f * max
    percentile: float = 5.0  # percentile: score <= P-th percentile
    max_fraction: float = 0.1  # never more than this share of the kept pool (paper: ~1 % negatives)


@dataclass
class SelectConfig:
    min_short_side: int | None = None  # default: the crop size
    max_aspect: float = 3.0
    score_min: dict[str, float] = field(default_factory=dict)
    score_max: dict[str, float] = field(default_factory=dict)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)


@dataclass
class KernelConfig:
    """Blur-kernel sampling of one degradation stage (BasicSR `random_mixed_kernels` + circular sinc)."""

    sizes: list[int] = field(default_factory=lambda: [7, 9, 11, 13, 15, 17, 19, 21])
    kernel_list: list[str] = field(
        default_factory=lambda: ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
    )
    kernel_prob: list[float] = field(default_factory=lambda: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03])
    sinc_prob: float = 0.1
    sinc_omega_small: Range = (1.0471975511965976, 3.141592653589793)  # omega_c ~ U[pi/3, pi] if size < 13
    sinc_omega_large: Range = (0.6283185307179586, 3.141592653589793)  # omega_c ~ U[pi/5, pi] otherwise
    sinc_small_below: int = 13
    sigma_x: Range = (0.2, 3.0)
    sigma_y: Range = (0.2, 3.0)
    rotation: Range = (-3.141592653589793, 3.141592653589793)
    betag_range: Range = (0.5, 4.0)
    betap_range: Range = (1.0, 2.0)


@dataclass
class DegradationConfig:
    """Real-ESRGAN second-order degradation (docs/MODEL.md §5.7). Defaults = the paper's `varsr-mild` preset."""

    preset: str = "varsr-mild"
    scale: int = 4
    kernel1: KernelConfig = field(default_factory=KernelConfig)
    kernel2: KernelConfig = field(default_factory=lambda: KernelConfig(sigma_x=(0.2, 1.5), sigma_y=(0.2, 1.5)))
    final_sinc_prob: float = 0.8
    final_sinc_sizes: list[int] = field(default_factory=lambda: [7, 9, 11, 13, 15, 17, 19, 21])
    final_sinc_omega: Range = (1.0471975511965976, 3.141592653589793)
    resize_modes: list[str] = field(default_factory=lambda: ["area", "bilinear", "bicubic"])
    # first order
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up / down / keep
    resize_range: Range = (0.3, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: Range = (1.0, 15.0)  # sigma in 8-bit units
    poisson_scale_range: Range = (0.05, 2.0)
    gray_noise_prob: float = 0.4
    jpeg_range: Range = (60.0, 95.0)
    # second order
    second_blur_prob: float = 0.5
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: Range = (0.6, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: Range = (1.0, 12.0)
    poisson_scale_range2: Range = (0.05, 1.0)
    gray_noise_prob2: float = 0.4
    jpeg_range2: Range = (60.0, 100.0)
    final_order_resize_first_prob: float = 0.5  # [resize -> sinc -> JPEG] with this p, else [JPEG -> resize -> sinc]
    # operators: torch = F.interpolate semantics (scale-factor pixel mapping, area = adaptive average pooling);
    # opencv = cv2.resize. diffjpeg = the reference's tensor JPEG at a float quality; libjpeg = real JPEG, int quality
    resize_backend: Literal["torch", "opencv"] = "torch"
    jpeg_backend: Literal["diffjpeg", "libjpeg"] = "diffjpeg"
    # training reader: the LR is resized back to the HR size with one of these modes, drawn per sample
    resize_back_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")
    # the first ``clean_variants`` LR variants of each crop are the plain x``scale`` bicubic downsample (PIL, the
    # benchmark protocol's LR) instead of the chain above: a model trained on a small corpus then also learns to
    # follow an undamaged LR closely (docs/MODEL.md §5.7); 0 = every variant degraded (the paper)
    clean_variants: int = 0


@dataclass
class ShardConfig:
    """Materialisation: crop, degrade, write WebDataset shards (the shard contract, data_pipeline/shards/format.py)."""

    crop_size: int = 512
    resize_short_factor: float = 1.25  # positives: short side -> round(1.25 * crop), LANCZOS
    resize_short_factor_neg: float = 1.0  # negatives: short side -> crop
    crop: Literal["center", "random"] = "center"
    flip_prob: float = 0.5
    # LR variants (independent degradations) per HR; 0 = HR-only shards (no LR stored: the training reader degrades
    # each HR afresh every epoch, data.degrade in the training config; docs/USAGE.md)
    lr_variants: int = 1
    hr_png_compression: int = 1  # 0..9 (zlib level); deterministic
    lr_png_compression: int = 3
    png_strategy: Literal["default", "filtered", "huffman_only", "rle", "fixed"] = "rle"  # zlib strategy
    png_filter: Literal["none", "sub", "up", "avg", "paeth", "fast", "all"] = "paeth"  # PNG row filter
    max_samples_per_shard: int = 1000
    max_shard_bytes: int = 1_000_000_000  # target; converted to a sample count from an estimate
    prefix: str = "shard"
    num_workers: int | None = None  # concurrent shard tasks; default: Ray cluster CPUs


@dataclass
class RayConfig:
    address: str | None = None  # None: local ray.init(); "ray://head:10001" or "auto" at scale
    num_cpus: int | None = None  # only for a local ray.init()


@dataclass
class BuildConfig:
    """score -> select -> shard in one go."""

    seed: int = 0
    source: SourceConfig = field(default_factory=SourceConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def config_hash(self) -> str:
        """Hash of everything that determines shard content (Ray and worker-count settings excluded)."""
        d = self.content_dict()
        del d["shard"]["num_workers"], d["score"]["num_workers"]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def content_dict(self) -> dict:
        """The config as plain JSON-able data, without the Ray connection settings (recorded in the manifest)."""
        d = to_dict(self)
        del d["ray"]
        return d

    def to_json(self) -> str:
        return json.dumps(to_dict(self))

    @classmethod
    def from_json(cls, text: str) -> "BuildConfig":
        return build(cls, json.loads(text))


def load_build_config(source: str | Path | BuildConfig | None = None, overrides: Iterable[str] = ()) -> BuildConfig:
    """defaults <- ``source`` (a YAML path, a preset name in configs/data/, or a BuildConfig) <- ``key=value``
    overrides. A file may hold a full BuildConfig or only some sections (the degradation presets hold only
    ``degradation:``)."""
    if isinstance(source, BuildConfig):
        return load_config(BuildConfig, None, overrides, base=source)
    return load_config(BuildConfig, source, overrides, preset_dir=CONFIG_DIR)


__all__ = ["BuildConfig", "DegradationConfig", "KernelConfig", "PIPELINE_VERSION", "load_build_config", "save_config"]
