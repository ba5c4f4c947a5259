"""Inference precision: bf16 is the default only where the hardware multiplies bf16 natively, and a bf16 decode with
the released decoder architecture stays within 45 dB PSNR of the fp32 decode."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata

from model import VARSRConfig
from model.precision import default_inference_dtype, has_bf16_matmul
from model.vqvae import VQVAE

MIN_PSNR_DB = 45.0


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [0, 1]."""
    return 10 * math.log10(1.0 / float(((a - b) ** 2).mean()))


def test_bf16_is_the_default_exactly_where_the_cpu_has_bf16_units():
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert has_bf16_matmul("cpu") == native
    assert default_inference_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
    assert default_inference_dtype("meta") == torch.float32


@pytest.mark.slow
def test_bf16_decode_stays_within_45_db_of_the_fp32_decode():
    """The released VQVAE architecture (ch 160, ch_mult 1-1-2-2-4, 3 res blocks per up level, attention at the lowest
    level), random weights, decoding the latent of a real photo. The decoder is fully convolutional, so a 128-px
    crop exercises every layer of the 512-px decode at 1/16 of the cost."""
    torch.manual_seed(0)
    vq = VQVAE(VARSRConfig.preset("d24")).eval()
    photo = torch.from_numpy(skdata.astronaut()).permute(2, 0, 1)[None].float() / 255
    photo = F.interpolate(photo, size=(128, 128), mode="area")
    with torch.inference_mode():
        f = vq.encode(photo * 2 - 1)  # (1, 32, 8, 8): a latent with the statistics this decoder produces for photos
        ref = (vq.fhat_to_img(f).float() + 1) / 2
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = (vq.fhat_to_img(f).float() + 1) / 2
    assert ref.std() > 0.1  # a structured image, not a flat one for which any PSNR would be high
    assert not torch.equal(low, ref)  # the autocast path really ran in reduced precision
    psnr = _psnr(low, ref)
    assert psnr >= MIN_PSNR_DB, psnr
