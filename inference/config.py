"""Typed inference configuration: sampling defaults, tiling, precision and the safety limits of every entry point.

Loaded from ``configs/inference/default.yaml`` (or any YAML) with ``infra.core.config.load_config``; the same object is
logged next to the MLflow model so the served endpoint enforces exactly the limits it was registered with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from infra.core.config import load_config

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "inference" / "default.yaml"

ColorFix = Literal["adain", "wavelet", "none"]


@dataclass
class SamplingConfig:
    """Defaults of one upscale call (spec §4.2); every one can be overridden per call / request."""

    scale: float = 4.0
    cfg: float = 6.0
    top_k: int = 1
    top_p: float = 0.75
    color_fix: ColorFix = "adain"


@dataclass
class TilingConfig:
    """Latent tiling for targets larger than one model tile (spec §4.5, symmetric weights)."""

    overlap: int | None = None  # latent cells shared by neighbouring tiles; None -> pn_last // 4
    weight: Literal["gaussian", "cosine"] = "gaussian"
    sigma: float = 0.25  # Gaussian std in units of the tile side (0.25: edges weigh ~e^-2 of the centre)
    batch_size: int = 8  # tiles (or small images) per generate() call


@dataclass
class LimitsConfig:
    """Hard limits: requests beyond them are rejected with a clear message before any heavy work."""

    max_input_pixels: int = 4096 * 4096
    max_output_pixels: int = 8192 * 8192
    max_payload_bytes: int = 32 * 1024 * 1024  # encoded (base64) image size, per image, served endpoint
    max_batch_images: int = 16  # rows per /invocations request
    max_scale: float = 8.0
    min_scale: float = 1.0


@dataclass
class RuntimeConfig:
    """Where and in which precision the model runs."""

    device: str = "auto"  # auto -> cuda if available else cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto -> bf16 autocast where the device has bf16 matrix units, else fp32
    cpu_threads: int | None = None  # torch intra-op threads when running on CPU (None: torch's default)


@dataclass
class InferenceConfig:
    """Everything an upscale call needs besides the model weights."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def load_inference_config(path: str | Path | None = None,
                          overrides: list[str] | tuple[str, ...] = ()) -> InferenceConfig:
    """defaults <- ``path`` (default: configs/inference/default.yaml when present) <- ``key=value`` overrides."""
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    return load_config(InferenceConfig, path, overrides)
