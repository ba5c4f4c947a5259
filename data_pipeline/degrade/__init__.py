"""Real-ESRGAN second-order degradation (spec §5.7): kernels (`kernels`) and the LR synthesis (`realesrgan`)."""
from .realesrgan import apply_degradation, degrade, sample_degradation

__all__ = ["apply_degradation", "degrade", "sample_degradation"]
