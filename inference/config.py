"""Typed inference configuration: sampling defaults, tiling, precision and the safety limits of every entry point.

Loaded from ``configs/inference/default.yaml`` (or any YAML) with ``infra.core.config.load_config``; the same object is
logged next to the MLflow model so the served endpoint enforces exactly the limits it was registered with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from infra.core.config import load_config

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "inference" / "default.yaml"

ColorFix = Literal["adain", "wavelet", "none"]
COLOR_FIXES: tuple[str, ...] = get_args(ColorFix)  # for argparse choices and checks, without importing torch


@dataclass
class SamplingConfig:
    """Defaults of one upscale call (docs/MODEL.md §4.2); every one can be overridden per call / request."""

    scale: float = 4.0
    cfg: float = 6.0
    top_k: int = 1
    top_p: float = 0.75
    color_fix: ColorFix = "adain"


@dataclass
class TilingConfig:
    """Latent tiling for targets larger than one model tile (docs/MODEL.md §4.5, symmetric weights)."""

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
    # auto -> bf16 autocast where the device has bf16 matrix units, else fp32
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    cpu_threads: int | None = None  # torch intra-op threads when running on CPU (None: torch's default)


@dataclass
class ServingConfig:
    """How the served endpoint turns concurrent requests into pipeline calls (``inference/batching.py``).

    Requests that arrive within ``batch_wait_ms`` of each other and share their params (scale, cfg, top_k, top_p,
    seed, color_fix, tile) run as one pipeline call of at most ``max_batch_images`` images; each request still gets
    exactly its own images back, and the same images it gets alone.
    """

    max_batch_images: int = 8  # images per batched pipeline call; <= 1 turns batching off (one request per call)
    batch_wait_ms: float = 5.0  # how long the first request of a batch waits for others to join it
    concurrent_batches: int = 2  # batches in progress at once (one generates while another decodes and encodes)
    # crops per generate() call of a batch, at most tiling.batch_size; 0 = auto: tiling.batch_size on a GPU (where a
    # batch of 8 costs about what one crop does), 1 on a CPU (where a crop's cost barely drops in a batch, and with
    # fixed_batch_shape a lone request would pay for every padding crop)
    generate_batch: int = 0
    # every generate() call runs on exactly generate_batch crops (short ones padded), so a crop's arithmetic never
    # depends on what else is in its batch: results are byte-identical alone and batched. Off: no padding work,
    # but batched kernels may move a pixel by a level or two against the same request alone.
    fixed_batch_shape: bool = True
    # threads the scoring server runs predict() in (MLflow runs each request with asyncio.to_thread on the event
    # loop's default executor: min(32, cpus + 4) threads, which caps the requests a batch can gather); 0 keeps it
    request_threads: int = 16
    log_batches: bool = False  # log one INFO line per batch (requests, images, params) to the server's stderr
    # ---- per-request budgets of the endpoint (inference/README.md, "Limits of the served endpoint"); the work and
    # memory of a request are estimated from its tiling plan before any generation and refused with a 400 past these
    # seconds a request may take from arrival to answer; past it its work is cancelled (between tiles) and it gets a
    # 504. `varsr serve` sets MLflow's MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT a little above it, as a backstop
    request_timeout_s: float = 60.0
    # work of one request in tile-steps: latent tiles x autoregressive steps (len(patch_nums)), summed over its images;
    # size it to what this device does in request_timeout_s (benchmarks/infer_bench.py gives the time per tile)
    max_request_work: int = 4096
    max_request_memory_mb: int = 4096  # estimated peak memory of one request (float copies + decoder activations)
    max_request_bytes: int = 64 * 1024 * 1024  # HTTP body of one /invocations request, refused (413) past it unread
    max_json_depth: int = 32  # nesting of the request JSON (the pyfunc's format needs 4); deeper gets a 400
    max_error_chars: int = 1000  # message of an error reply; never the request's content
    # largest `tile` overlap a request may ask for, in latent cells; -1 = half a tile (pn_last // 2). Larger overlaps
    # multiply the tiles of an image (the work estimate counts them too)
    max_tile_overlap: int = -1
    # when the `varsr serve` process that started this server is gone (even by SIGKILL), the server cancels its
    # requests and kills itself after this many seconds (every uvicorn process of the group watches it)
    orphan_grace_s: float = 5.0
    # ---- operations (inference/serve_metrics.py; inference/README.md, "Metrics and health"). Requests one server
    # process holds at once (waiting or running); more get a 503 with Retry-After, and /health/ready answers 503
    # while the pod holds workers x this many, so a load balancer sends the next ones to another replica
    max_queued_requests: int = 32
    # side in pixels of the square image of the warm-up call each server process makes (sampling defaults) before
    # /health/ready answers 200; it selects the kernels and fills the allocator on the path a request takes
    warmup_side: int = 64
    metrics: bool = True  # /metrics, /health/live and /health/ready on the serving port

    def __post_init__(self):
        for name in (
            "request_timeout_s",
            "max_request_work",
            "max_request_memory_mb",
            "max_request_bytes",
            "max_json_depth",
            "max_error_chars",
            "max_queued_requests",
            "warmup_side",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"serving.{name} must be > 0, got {getattr(self, name)}")
        if self.orphan_grace_s < 0:
            raise ValueError(f"serving.orphan_grace_s must be >= 0, got {self.orphan_grace_s}")


@dataclass
class InferenceConfig:
    """Everything an upscale call needs besides the model weights."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)


def load_inference_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> InferenceConfig:
    """defaults <- ``path`` (default: configs/inference/default.yaml when present) <- ``key=value`` overrides."""
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    return load_config(InferenceConfig, path, overrides)
