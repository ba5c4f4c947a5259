"""Learning-rate multiplier: linear warm-up from ``wp0`` then the ``lin0`` plateau-and-decay (docs/MODEL.md §5.4).

``lr(it) = peak · multiplier(it)``; ``it`` counts optimiser steps from 0. Pure functions, so the schedule is the
same whether driven by a torch ``LambdaLR`` inside DeepSpeed or evaluated for a plot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    total_steps: int  # max_it
    warmup_steps: int  # wp_it = round(warmup_epochs · iters_per_epoch)
    warmup_start: float = 0.005  # wp0
    kind: str = "lin0"
    plateau: float = 0.3
    end_factor: float = 0.01  # wpe

    def __call__(self, it: int) -> float:
        if it < self.warmup_steps:
            return self.warmup_start + (1.0 - self.warmup_start) * it / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - 1 - self.warmup_steps)
        p = min(1.0, max(0.0, (it - self.warmup_steps) / span))
        if self.kind == "lin0":
            if p < self.plateau:
                return 1.0
            return self.end_factor + (1.0 - self.end_factor) * (1.0 - p) / (1.0 - self.plateau)
        if self.kind == "cosine":
            return self.end_factor + (1.0 - self.end_factor) * 0.5 * (1.0 + math.cos(math.pi * p))
        raise ValueError(f"unknown schedule {self.kind!r} (lin0 | constant | cosine)")


def build_schedule(optim_cfg, total_steps: int, iters_per_epoch: int) -> Schedule:
    """Schedule from an :class:`~training.config.OptimSection` and the run length."""
    wp = int(round(optim_cfg.warmup_epochs * iters_per_epoch))
    wp = min(wp, max(0, total_steps - 1))
    return Schedule(
        total_steps=total_steps,
        warmup_steps=wp,
        warmup_start=optim_cfg.warmup_start,
        kind=optim_cfg.schedule,
        plateau=optim_cfg.plateau,
        end_factor=optim_cfg.end_factor,
    )
