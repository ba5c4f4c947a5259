"""Factory: the frozen VQVAE and the VARSR transformer (which holds the VQVAE by reference) for a config."""

from __future__ import annotations

import torch

from .config import VARSRConfig
from .varsr import VARSR
from .vqvae import VQVAE


def build(config: VARSRConfig, device=None) -> tuple[VQVAE, VARSR]:
    """(vqvae, varsr) for ``config``; the VQVAE is frozen (eval, no grad). ``device="meta"`` builds shapes only."""
    if not isinstance(config, VARSRConfig):
        raise TypeError(f"build expects a VARSRConfig, got {type(config).__name__} (use VARSRConfig.preset(name))")
    config.validate()
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device(device):
        vqvae = VQVAE(config).freeze()
        varsr = VARSR(config, vqvae)
    return vqvae, varsr
