"""Which precision inference runs in by default: bf16 where the hardware multiplies bf16 matrices natively.

bf16 autocast halves the work of every matmul and conv on such hardware (Ampere-or-newer GPUs; CPUs with AMX or
AVX-512 BF16) and costs little accuracy (a bf16 decode stays above 45 dB PSNR of the fp32 decode, see
tests/model/test_model_precision.py). Elsewhere bf16 is emulated and slower than fp32, so fp32 stays the default.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # Linux /proc/cpuinfo names of the bf16 matrix / dot-product units


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (Linux); empty where /proc/cpuinfo is not available."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_bf16_matmul(device: str | torch.device) -> bool:
    """True where bf16 matrix products run natively: CUDA compute capability >= 8.0, or a CPU with AMX/AVX-512 BF16."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(dev) >= (8, 0)
    if dev.type == "cpu":
        return any(f in cpu_flags() for f in CPU_BF16_FLAGS)
    return False


def default_inference_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 (autocast) where ``has_bf16_matmul``, else float32."""
    return torch.bfloat16 if has_bf16_matmul(device) else torch.float32
