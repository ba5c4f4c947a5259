"""Where a training step's wall time goes: ``data``, ``tokenise``, ``forward``, ``backward``, ``optimizer`` seconds
(the ``time/..._s`` metrics, docs/BENCHMARKS.md), measured beside the step's algorithm rather than inside it.

``with timer("forward"):`` adds the block's seconds to its phase. Phases nest exclusively: the tokeniser's forward
pass, timed by :class:`TimedTokenizer` while ``compute_loss`` runs inside ``forward``, counts as ``tokenise`` and not
also as ``forward``. On CUDA each timed block synchronises the device before and after (``sync=False`` skips it,
for host-only work such as pulling the next batch), so asynchronous kernels are charged to the phase that launched
them.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

PHASES = ("data", "tokenise", "forward", "backward", "optimizer")


def device_sync(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class StepTimer:
    """Seconds per phase of one optimiser step (``seconds``: phase -> seconds, every phase of :data:`PHASES`)."""

    def __init__(self, sync: Callable[[], None] = lambda: None):
        self.sync = sync
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._nested: list[float] = []  # per open phase: seconds already charged to phases inside it

    @classmethod
    def on(cls, device: torch.device) -> StepTimer:
        return cls(device_sync(device))

    @contextmanager
    def __call__(self, phase: str, sync: bool = True) -> Iterator[None]:
        if sync:
            self.sync()
        self._nested.append(0.0)
        t = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                self.sync()
            elapsed = time.perf_counter() - t
            inner = self._nested.pop()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed - inner
            if self._nested:
                self._nested[-1] += elapsed


class TimedTokenizer:
    """Proxy for the frozen VQVAE whose tokenising calls (``img_to_idxBl``, ``idxBl_to_var_input``) are timed as the
    ``tokenise`` phase. ``timer``: a :class:`StepTimer`, or a device-sync function for a timer of its own;
    ``seconds``: the tokenising seconds so far."""

    TIMED = ("img_to_idxBl", "idxBl_to_var_input")

    def __init__(self, vqvae, timer: StepTimer | Callable[[], None]):
        self._vq = vqvae
        self.timer = timer if isinstance(timer, StepTimer) else StepTimer(timer)

    @property
    def seconds(self) -> float:
        return self.timer.seconds["tokenise"]

    def __getattr__(self, name):
        attr = getattr(self._vq, name)
        if name not in self.TIMED:
            return attr

        def timed(*a, **kw):
            with self.timer("tokenise"):
                return attr(*a, **kw)

        return timed


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``: the wall time of a block (a whole step, a run)."""

    seconds: float = 0.0

    def start(self) -> Stopwatch:
        self._t = time.perf_counter()
        return self

    def __enter__(self) -> Stopwatch:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t

    @property
    def elapsed(self) -> float:
        """Seconds since the block started (while it runs)."""
        return time.perf_counter() - self._t


# ---- throughput: the MFU estimate of a step ------------------------------------------------------------------------
# dense peak FLOP/s for the MFU estimate (bf16 tensor-core numbers; fp32 uses TF32 where it applies)
GPU_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "V100": 125e12}
CPU_PEAK_PER_CORE = 50e9  # rough fp32 AVX2/AVX-512 FMA throughput per core; an estimate, not a measurement


def peak_flops(device: torch.device) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for k, v in GPU_PEAK.items():
            if k in name:
                return v
        return 100e12
    return (os.cpu_count() or 1) * CPU_PEAK_PER_CORE


def step_flops(mcfg, n_params: int, samples: int) -> float:
    """6·params·tokens (fwd+bwd of the dense layers) + 12·depth·C·S² per sample (attention scores and values)."""
    S = mcfg.seq_len
    return 6.0 * n_params * S * samples + 12.0 * mcfg.depth * mcfg.C * S * S * samples
