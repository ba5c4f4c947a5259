"""Typed configuration of the data pipeline (pydantic v2), loadable from YAML with dotted overrides.

One :class:`BuildConfig` holds every knob of score -> select -> shard; the sub-models are what each step reads.
Every Real-ESRGAN degradation parameter lives in :class:`DegradationConfig` (spec §5.7), nothing is hidden in code.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

PIPELINE_VERSION = "0.1.0"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "data"

Range = tuple[float, float]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceConfig(_Model):
    """Which files count as inputs and how manifests are read."""
    extensions: list[str] = Field(default_factory=lambda: [
        ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"])
    all_files: bool = False          # folders/globs: take every file, not only image extensions
    manifest_column: str | None = None  # path/URL column of a manifest; default: first of path/url/uri/file


class DecodeConfig(_Model):
    """Safe decoding limits (decompression bombs) and colour handling."""
    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 80_000_000
    min_side: int = 8               # below this the file is rejected at decode ("too_small_decode")
    background: tuple[int, int, int] = (255, 255, 255)  # alpha is composited on this colour


class IQAPluginConfig(_Model):
    """A learned IQA scorer run when its TorchScript weights exist in the cache (else skipped with a notice)."""
    name: str
    file: str | None = None          # default: {weights_dir}/{name}.pt
    input_size: int = 224            # centre crop/resize fed to the model, (B,3,S,S) float in [0,1]


class ScoreConfig(_Model):
    thumb_size: int = 512            # built-in scorers run on a copy whose long side is at most this
    batch_size: int = 16
    num_workers: int | None = None   # actors; default: number of CPUs in the Ray cluster
    weights_dir: str = "~/.cache/varsr/iqa"
    iqa: list[IQAPluginConfig] = Field(default_factory=lambda: [
        IQAPluginConfig(name="musiq", input_size=384), IQAPluginConfig(name="clipiqa"),
        IQAPluginConfig(name="maniqa"), IQAPluginConfig(name="aesthetic")])
    embedder: str = "builtin"        # or "module:function" mapping list[uint8 HWC] -> (N, D) float array
    use_gpu: bool | None = None      # None: use GPUs when the cluster has them and an IQA plug-in is loaded


class DedupConfig(_Model):
    exact: bool = True
    near: bool = True
    phash_max_distance: int = 4      # Hamming distance on the 64-bit DCT hash


class ClusterConfig(_Model):
    """Semantic classes for stage-1 C2I pretraining (paper: ~4,000 clusters, <=1,200 images each)."""
    enabled: bool = True
    k: int = 4000
    max_per_class: int = 1200
    seed: int = 0


class NegativesConfig(_Model):
    """Low-quality negatives (label 1) for image-based CFG (spec §5.6)."""
    rule: Literal["none", "minmax", "percentile"] = "minmax"
    score: str = "quality"           # column; lower = worse
    f: float = 0.4                   # minmax: score < min + f * max
    percentile: float = 5.0          # percentile: score <= P-th percentile
    max_fraction: float = 0.1        # never more than this share of the kept pool (paper: ~1 % negatives)


class SelectConfig(_Model):
    min_short_side: int | None = None  # default: the crop size
    max_aspect: float = 3.0
    score_min: dict[str, float] = Field(default_factory=dict)
    score_max: dict[str, float] = Field(default_factory=dict)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    negatives: NegativesConfig = Field(default_factory=NegativesConfig)


class KernelConfig(_Model):
    """Blur-kernel sampling of one degradation stage (BasicSR `random_mixed_kernels` + circular sinc)."""
    sizes: list[int] = Field(default_factory=lambda: [7, 9, 11, 13, 15, 17, 19, 21])
    kernel_list: list[str] = Field(default_factory=lambda: [
        "iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"])
    kernel_prob: list[float] = Field(default_factory=lambda: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03])
    sinc_prob: float = 0.1
    sinc_omega_small: Range = (1.0471975511965976, 3.141592653589793)   # omega_c ~ U[pi/3, pi] if size < 13
    sinc_omega_large: Range = (0.6283185307179586, 3.141592653589793)   # omega_c ~ U[pi/5, pi] otherwise
    sinc_small_below: int = 13
    sigma_x: Range = (0.2, 3.0)
    sigma_y: Range = (0.2, 3.0)
    rotation: Range = (-3.141592653589793, 3.141592653589793)
    betag_range: Range = (0.5, 4.0)
    betap_range: Range = (1.0, 2.0)


class DegradationConfig(_Model):
    """Real-ESRGAN second-order degradation (spec §5.7). Defaults = the paper's `varsr-mild` preset."""
    preset: str = "varsr-mild"
    scale: int = 4
    kernel1: KernelConfig = Field(default_factory=KernelConfig)
    kernel2: KernelConfig = Field(default_factory=lambda: KernelConfig(sigma_x=(0.2, 1.5), sigma_y=(0.2, 1.5)))
    final_sinc_prob: float = 0.8
    final_sinc_sizes: list[int] = Field(default_factory=lambda: [7, 9, 11, 13, 15, 17, 19, 21])
    final_sinc_omega: Range = (1.0471975511965976, 3.141592653589793)
    resize_modes: list[str] = Field(default_factory=lambda: ["area", "bilinear", "bicubic"])
    # first order
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)   # up / down / keep
    resize_range: Range = (0.3, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: Range = (1.0, 15.0)                              # sigma in 8-bit units
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
    final_order_resize_first_prob: float = 0.5   # [resize -> sinc -> JPEG] with this p, else [JPEG -> resize -> sinc]
    # operators: torch = F.interpolate semantics (scale-factor pixel mapping, area = adaptive average pooling);
    # opencv = cv2.resize. diffjpeg = the reference's tensor JPEG at a float quality; libjpeg = real JPEG, int quality
    resize_backend: Literal["torch", "opencv"] = "torch"
    jpeg_backend: Literal["diffjpeg", "libjpeg"] = "diffjpeg"
    # training reader: the LR is resized back to the HR size with one of these modes, drawn per sample
    resize_back_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")


class ShardConfig(_Model):
    """Materialisation: crop, degrade, write WebDataset shards (DESIGN.md shard contract)."""
    crop_size: int = 512
    resize_short_factor: float = 1.25        # positives: short side -> round(1.25 * crop), LANCZOS
    resize_short_factor_neg: float = 1.0     # negatives: short side -> crop
    crop: Literal["center", "random"] = "center"
    flip_prob: float = 0.5
    lr_variants: int = 1                     # LR variants (independent degradations) per HR
    hr_png_compression: int = 1              # 0..9 (zlib level); deterministic
    lr_png_compression: int = 3
    png_strategy: Literal["default", "filtered", "huffman_only", "rle", "fixed"] = "rle"   # zlib strategy
    png_filter: Literal["none", "sub", "up", "avg", "paeth", "fast", "all"] = "paeth"      # PNG row filter
    max_samples_per_shard: int = 1000
    max_shard_bytes: int = 1_000_000_000     # target; converted to a sample count from an estimate
    prefix: str = "shard"
    num_workers: int | None = None           # concurrent shard tasks; default: Ray cluster CPUs


class RayConfig(_Model):
    address: str | None = None               # None: local ray.init(); "ray://head:10001" or "auto" at scale
    num_cpus: int | None = None              # only for a local ray.init()


class BuildConfig(_Model):
    """score -> select -> shard in one go."""
    seed: int = 0
    source: SourceConfig = Field(default_factory=SourceConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    degradation: DegradationConfig = Field(default_factory=DegradationConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    def config_hash(self) -> str:
        """Hash of everything that determines shard content (ray settings excluded)."""
        d = self.model_dump(mode="json", exclude={"ray": True, "shard": {"num_workers"}, "score": {"num_workers"}})
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key.path=value")
        path, value = item.split("=", 1)
        node = data
        parts = path.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = _parse_value(value)
    return data


def resolve_config_path(path: str | Path) -> Path:
    """A path, or a preset name in configs/data/ (e.g. `varsr-mild`)."""
    p = Path(path)
    if p.exists():
        return p
    for cand in (CONFIG_DIR / f"{path}.yaml", CONFIG_DIR / str(path)):
        if cand.exists():
            return cand
    raise FileNotFoundError(f"config {path!r} is neither a file nor a preset in {CONFIG_DIR}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls: type[BaseModel] = BuildConfig) -> Any:
    """Load a config from YAML (or defaults when path is None), then apply dotted overrides.

    A file may hold a full BuildConfig or only a `degradation:` section (degradation presets).
    """
    if isinstance(path, cls):
        data = path.model_dump(mode="json")
    elif isinstance(path, dict):
        data = dict(path)
    elif path is None:
        data = {}
    else:
        data = yaml.safe_load(resolve_config_path(path).read_text()) or {}
    data = apply_overrides(data, overrides)
    return cls.model_validate(data)


def save_config(cfg: BaseModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
