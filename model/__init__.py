"""VARSR model package: config + presets, multi-scale VQVAE, VARSR transformer, diffusion refiner, sampling,
losses and checkpoint I/O (native safetensors and the official-checkpoint importer).

    from model import VARSRConfig, build, compute_loss, image_generators, save_pretrained, from_pretrained
    vqvae, varsr = build(VARSRConfig.preset("tiny"))
    images = varsr.generate(lr_images, generator=image_generators(seed=0, count=len(lr_images)))
"""

from .build import build
from .checkpoint import from_pretrained, save_pretrained
from .config import VARSRConfig
from .losses import LossOutput, compute_loss
from .official import import_official, load_stage_weights
from .precision import default_inference_dtype
from .refiner import DiffLoss
from .sampling import image_generators, sample_top_k_top_p, stream_generator
from .varsr import VARSR, GenerationInfo
from .vqvae import VQVAE

__all__ = [
    "VARSRConfig",
    "VQVAE",
    "VARSR",
    "DiffLoss",
    "build",
    "save_pretrained",
    "from_pretrained",
    "import_official",
    "load_stage_weights",
    "compute_loss",
    "LossOutput",
    "sample_top_k_top_p",
    "GenerationInfo",
    "image_generators",
    "stream_generator",
    "default_inference_dtype",
]
