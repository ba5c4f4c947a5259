"""Checkpoints: DeepSpeed engine state (model, optimiser, LR schedule) + our own trainer state, with a COMPLETE marker.

Layout: ``{output_dir}/checkpoints/step_{N:08d}/`` holds DeepSpeed's files, ``trainer_state.json`` (step, data
position per rank, config hashes) and ``rng_rank{r}.pt`` (python / numpy / torch / CUDA / step-generator states).
``COMPLETE`` is written by rank 0 after every rank has finished, so ``--resume auto`` never picks a torn checkpoint.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from infra.core.errors import UserError
from data_pipeline.shards import DataPosition

log = logging.getLogger(__name__)
MARKER = "COMPLETE"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state(generator: torch.Generator | None) -> dict:
    np_state = np.random.get_state()
    st = {
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
    np.random.set_state(("MT19937", st["numpy_keys"].numpy().astype(np.uint32), st["numpy_pos"],
                         st["numpy_gauss"][0], st["numpy_gauss"][1]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])
    if generator is not None and "generator" in st:
        generator.set_state(st["generator"])


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save(engine, output_dir, step: int, position: DataPosition, generator, fingerprint: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    root = checkpoint_root(output_dir)
    tag = f"step_{step:08d}"
    d = root / tag
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    rank = _rank()
    torch.save({"rng": rng_state(generator), "position": asdict(position)}, d / f"rng_rank{rank}.pt")
    _barrier()
    if rank == 0:
        positions = {}
        world = dist.get_world_size() if dist.is_initialized() else 1
        for r in range(world):
            positions[r] = torch.load(d / f"rng_rank{r}.pt", weights_only=True)["position"]
        (d / "trainer_state.json").write_text(json.dumps(
            {"step": step, "world_size": world, "positions": positions, **fingerprint}, indent=2) + "\n")
        (d / MARKER).write_text(json.dumps({"step": step}) + "\n")
        for old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint saved: %s", d)
    _barrier()
    return d


def complete_checkpoints(output_dir) -> list[Path]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def find_resume(output_dir, resume: str | None) -> Path | None:
    """``auto`` -> latest complete checkpoint under output_dir (None if there is none); a path -> that checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    p = Path(resume)
    if not (p / MARKER).is_file():
        raise UserError(f"--resume {resume}: not a complete checkpoint (no {MARKER} marker in it)")
    return p


def load(engine, ckpt: Path, generator, fingerprint: dict) -> tuple[int, DataPosition]:
    """Restore engine + RNG + data position; UserError if the checkpoint is from another config."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    for k, v in fingerprint.items():
        if state.get(k) != v:
            raise UserError(
                f"checkpoint {ckpt} was written by another config ({k}: checkpoint {state.get(k)!r}, "
                f"this run {v!r}); use a fresh output_dir or the matching config")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if state["world_size"] != world:
        raise UserError(f"checkpoint {ckpt} was written by {state['world_size']} rank(s), this run has {world}")
    path, client = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"DeepSpeed could not load checkpoint {ckpt}")
    st = torch.load(ckpt / f"rng_rank{_rank()}.pt", weights_only=True)
    set_rng_state(st["rng"], generator)
    return int(client["step"]), DataPosition(**st["position"])
