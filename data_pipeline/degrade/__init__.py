"""Real-ESRGAN second-order degradation (the VARSR training LR synthesis): kernels (`kernels`), resize operators
and the reader's resize-back (`resize`), JPEG operators (`jpeg`) and the LR synthesis (`realesrgan`)."""

from .realesrgan import apply_degradation, degrade, sample_degradation
from .resize import RESIZE_BACK_MODES, pick_resize_back_mode, random_resize_back, resize_back, torch_resize

__all__ = [
    "RESIZE_BACK_MODES",
    "apply_degradation",
    "degrade",
    "pick_resize_back_mode",
    "random_resize_back",
    "resize_back",
    "sample_degradation",
    "torch_resize",
]
