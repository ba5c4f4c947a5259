"""VARSR model package: config + presets, multi-scale VQVAE, VARSR transformer, diffusion refiner, sampling,
losses and checkpoint I/O (native safetensors and the official-checkpoint importer).

    from model import VARSRConfig, build, compute_loss, save_pretrained, from_pretrained
    vqvae, varsr = build(VARSRConfig.preset("tiny"))
    images = varsr.generate(lr_images, generator=torch.Generator().manual_seed(0))
"""
from .config import VARSRConfig
from .vqvae import VQVAE
from .refiner import DiffLoss
from .varsr import VARSR
from .build import build
from .sampling import sample_top_k_top_p
from .losses import LossOutput, compute_loss
from .checkpoint import from_pretrained, save_pretrained
from .official import import_official, load_stage_weights

__all__ = [
    "VARSRConfig", "VQVAE", "VARSR", "DiffLoss", "build", "save_pretrained", "from_pretrained", "import_official",
    "load_stage_weights", "compute_loss", "LossOutput", "sample_top_k_top_p",
]
