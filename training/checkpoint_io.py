"""The low-level reads and writes of training checkpoint files, shared by ``training/checkpointing.py`` (the format's
owner) and ``training/reshard.py``: allow-listed loads and the per-rank RNG states.

Resuming never unpickles code: DeepSpeed's own loader reads its files with ``torch.load(weights_only=False)`` and has
no option for anything else, so every ``.pt`` file of a checkpoint is first checked against an allow-list
(:func:`check_checkpoint_files`; :func:`safe_load`: tensors, plain containers and the few DeepSpeed types of
:func:`deepspeed_safe_globals`), and DeepSpeed's reads are routed through the same ``weights_only=True`` loader
(:class:`_SafeReads`). A file holding anything else is refused with one line naming it (docs/SECURITY.md).
"""

from __future__ import annotations

import pickle
import random
import re
from pathlib import Path
from typing import cast

import numpy as np
import torch

from infra.core.errors import UserError


def rng_state(generator: torch.Generator | None) -> dict:
    np_state = cast(tuple, np.random.get_state())  # the legacy MT19937 tuple (numpy types it dict | tuple)
    st: dict = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        st["generator"] = generator.get_state()
    return st


def set_rng_state(st: dict, generator: torch.Generator | None) -> None:
    random.setstate((st["python_version"], tuple(st["python"]), st["python_gauss"]))
    np.random.set_state(
        (
            "MT19937",
            st["numpy_keys"].numpy().astype(np.uint32),
            st["numpy_pos"],
            st["numpy_gauss"][0],
            st["numpy_gauss"][1],
        )
    )
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])
    if generator is not None and "generator" in st:
        generator.set_state(st["generator"])


def deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed writes into the checkpoints this platform makes (ZeRO 0-3, fp32 / bf16 / fp16):
    the loss scalers, the ZeRO stage enum and the fragment addresses of ZeRO's flat partitions. Allowing them lets
    ``torch.load(weights_only=True)`` rebuild them from their field values; none runs code when unpickled."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _refusal(path, why: str) -> UserError:
    return UserError(
        f"checkpoint file {path} holds {why}, not only tensors and DeepSpeed's training state; refusing "
        f"to load it (unpickling it could run code): resume only from checkpoints this platform wrote"
    )


def safe_load(path, map_location=None):
    """``torch.load(path, weights_only=True)`` with :func:`deepspeed_safe_globals` allowed; UserError naming the file
    when it holds anything else (e.g. a planted object whose ``__reduce__`` would run code)."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"(Unsupported global: GLOBAL \S+|Unsupported operand \S+)", str(e))
        raise _refusal(path, m.group(1).rstrip(".,") if m else "objects outside the allow-list") from None


def check_checkpoint_files(ckpt: Path) -> None:
    """Refuse a checkpoint folder any of whose ``.pt`` files names a type outside the allow-list, before anything
    is loaded (every rank checks the whole folder, so all ranks refuse alike instead of one failing inside a
    collective). Zip-format files are read statically (``torch.serialization.get_unsafe_globals_in_checkpoint``: no
    tensor is loaded); legacy-format files are loaded with :func:`safe_load`."""
    for f in sorted(ckpt.rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(f)
        except ValueError:  # not a zip checkpoint (legacy torch.save format): a full weights_only load checks it
            safe_load(f, map_location="cpu")
            continue
        except Exception as e:  # noqa: BLE001 - unreadable / corrupt: not a checkpoint this platform wrote
            raise UserError(
                f"checkpoint file {f} is not readable as a torch checkpoint ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''})"
            ) from None
        if unsafe:
            raise _refusal(f, f"the global(s) {', '.join(unsafe[:3])}")


class _SafeReads:
    """For the duration of a ``with``: every file DeepSpeed's checkpoint engine reads goes through :func:`safe_load`
    (DeepSpeed's ``TorchCheckpointEngine.load`` passes ``weights_only=False``)."""

    def __init__(self, engine):
        self.ce = engine.checkpoint_engine

    def __enter__(self):
        self.ce.load = lambda path, map_location=None: safe_load(path, map_location)
        return self

    def __exit__(self, *exc):
        del self.ce.load  # the instance attribute shadowed the class's method
