"""Resume a training checkpoint on another number of ranks (a preempted node that does not come back, a cluster that
grows): DeepSpeed's own universal checkpoint re-partitions ZeRO's optimiser state, the data position is regrouped
(``data_pipeline.shards.reader.regroup_position``); the step count and the LR schedule come back from the checkpoint
as on a same-size resume. See docs/ELASTIC.md for what is guaranteed.

* Unpartitioned optimiser state (ZeRO stage 0 in fp32: one ``mp_rank_00_model_states.pt`` holds model, AdamW state
  and LR scheduler) loads on any number of ranks with DeepSpeed's ordinary loader.
* Partitioned state (ZeRO 1-3: one ``*optim_states.pt`` per rank) is first converted, beside the checkpoint, into
  DeepSpeed's universal layout (``deepspeed.checkpoint.ds_to_universal``: one folder per parameter with its fp32
  master weights and Adam moments), which every optimiser partitioning reads (``checkpoint.load_universal``).
* ZeRO stage 0 in bf16 / fp16 (DeepSpeed's 16-bit optimiser wrappers, a path not tried here) is refused with one
  line.
* ZeRO-3 is refused with one line: DeepSpeed 0.19.8 converts a ZeRO-3 checkpoint and loads its partitions, but the
  parameters ZeRO-3 keeps whole on every rank (``ds_persist``) stay empty afterwards (tried on CPU/gloo, 2 -> 1), so
  the model cannot run. A partitioned checkpoint whose universal conversion fails is refused the same way, naming the
  ZeRO stage and what to do.

DeepSpeed's converter and universal loader read with ``torch.load(weights_only=False)``. The checkpoint's files have
passed :func:`training.checkpoint_io.check_checkpoint_files` (allow-list, no tensor loaded) before the conversion, the
converted files pass it again, and every ``torch.load`` of the modules involved is routed through
:func:`training.checkpoint_io.safe_load` (``weights_only=True`` with the same allow-list) while they run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.shards.reader import DataPosition, regroup_position
from infra.core.errors import UserError
from training.checkpoint_io import _SafeReads, check_checkpoint_files, safe_load, set_rng_state

log = logging.getLogger(__name__)

UNIVERSAL = "universal"  # the converted copy's folder (and DeepSpeed tag) inside the checkpoint's folder
DONE = "CONVERTED"  # written last into it: a complete conversion
# the DeepSpeed modules whose torch.load calls run during a conversion and a universal load
_DS_MODULES = (
    "deepspeed.checkpoint.ds_to_universal",
    "deepspeed.checkpoint.deepspeed_checkpoint",
    "deepspeed.checkpoint.zero_checkpoint",
    "deepspeed.checkpoint.universal_checkpoint",
    "deepspeed.runtime.base_optimizer",
    "deepspeed.runtime.zero.stage3",
)


class _SafeTorch:
    """Stands in for the ``torch`` module inside DeepSpeed's checkpoint modules: ``load`` is the allow-listed
    ``weights_only=True`` loader, everything else is torch's."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, weights_only=None, **_):  # weights_only: DeepSpeed passes False, ignored
        return safe_load(f, map_location)


@contextlib.contextmanager
def safe_deepspeed_reads():
    """While inside: DeepSpeed's checkpoint conversion and universal loader read through ``safe_load``."""
    import importlib

    mods: list[Any] = [importlib.import_module(m) for m in _DS_MODULES]
    saved = [m.torch for m in mods]  # each module's own `import torch`
    try:
        for m in mods:
            m.torch = _SafeTorch()
        yield
    finally:
        for m, t in zip(mods, saved):
            m.torch = t


def partitioned(ckpt: Path) -> bool:
    """Whether the checkpoint's optimiser state is split over its ranks (ZeRO 1-3 write one file per rank)."""
    return any(ckpt.glob("*optim_states.pt"))


def _zero_stage(ckpt: Path) -> int:
    files = sorted(ckpt.glob("*optim_states.pt"))
    if not files:
        return 0
    sd = safe_load(files[0], map_location="cpu")
    return int(sd.get("optimizer_state_dict", {}).get("zero_stage", 0))


def convert(ckpt: Path) -> Path:
    """``ckpt/universal``: the checkpoint in DeepSpeed's universal layout (converted once; ``CONVERTED`` marks a
    complete conversion, a torn one is redone). UserError naming the ZeRO stage when DeepSpeed cannot convert it."""
    from deepspeed.checkpoint import ds_to_universal

    out = ckpt / UNIVERSAL
    if (out / DONE).is_file():
        return out
    if out.exists():
        shutil.rmtree(out)
    args = argparse.Namespace(
        input_folder=str(ckpt),
        output_folder=str(out),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    chatter = io.StringIO()
    try:
        with safe_deepspeed_reads(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - DeepSpeed's converter asserts / raises on what it cannot re-partition
        shutil.rmtree(out, ignore_errors=True)
        stage = _zero_stage(ckpt)
        raise UserError(
            f"checkpoint {ckpt} (ZeRO stage {stage}) cannot be re-partitioned for another number of "
            f"ranks: DeepSpeed's universal conversion failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); resume it on the number of ranks that wrote "
            f"it"
        ) from None
    log.debug("ds_to_universal: %s", chatter.getvalue()[-2000:])
    (ckpt / "latest_universal").unlink(missing_ok=True)  # the converter's pointer; tags are always given here
    check_checkpoint_files(out)
    (out / DONE).write_text(json.dumps({"from": ckpt.name}) + "\n")
    return out


def _derived_seed(seed: int, step: int, rank: int) -> int:
    digest = hashlib.sha256(f"{seed}/{step}/{rank}/resized".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def _restore_rng(ckpt: Path, state: dict, generator, rank: int, step: int) -> None:
    """A rank the checkpoint had gets its own saved RNG states back; a new rank gets fresh ones derived from
    (run seed, step, rank), so a run resumed at a given size draws alike every time."""
    own = ckpt / f"rng_rank{rank}.pt"
    if own.is_file():
        set_rng_state(safe_load(own)["rng"], generator)
        return
    s = _derived_seed(int(state.get("seed", 0)), step, rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    if generator is not None:
        generator.manual_seed(s)


def load_resized(engine, ckpt: Path, state: dict, generator, split: str, workers: int) -> tuple[int, DataPosition]:
    """Collective: restore a checkpoint written by ``state["world_size"]`` ranks on this run's ranks. Returns the
    step and this rank's data position."""
    written, world = int(state["world_size"]), dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    positions = [DataPosition(**state["positions"][str(r)]) for r in range(written)]
    position, note = regroup_position(positions, world, rank, split, workers)  # bad input: refused before any load
    if engine.zero_optimization_partition_weights():
        raise UserError(
            f"checkpoint {ckpt} was written by {written} rank(s) with ZeRO stage 3 and this run has "
            f"{world}: DeepSpeed's universal loader restores ZeRO-3 partitions but leaves the parameters "
            f"ZeRO-3 keeps whole empty, so a ZeRO-3 checkpoint resumes only on {written} rank(s); resume "
            f"it there, or train with zero_stage 0-2 to resume on any number of ranks"
        )
    if engine.zero_optimization_stage() == 0 and (engine.bfloat16_enabled() or engine.fp16_enabled()):
        raise UserError(
            f"checkpoint {ckpt} was written by {written} rank(s) with ZeRO stage 0 in 16-bit precision "
            f"(DeepSpeed's BF16/FP16 optimiser) and this run has {world}: that combination is not "
            f"re-partitioned here; resume it on {written} rank(s), or train with zero_stage 1-2 to resume "
            f"on any number of ranks"
        )
    if partitioned(ckpt):
        error: UserError | None = None
        if rank == 0:
            try:
                convert(ckpt)
            except UserError as e:
                error = e
        flag = [str(error) if error else ""]
        if dist.is_initialized():
            dist.broadcast_object_list(flag, src=0)
        if flag[0]:
            raise UserError(flag[0])
        univ = convert(ckpt)  # no-op where rank 0 converted it; a rank on another disk converts its own copy
        engine._config.load_universal_checkpoint = True  # DeepSpeed's switch (config checkpoint.load_universal)
        try:
            with _SafeReads(engine), safe_deepspeed_reads():
                path, client = engine.load_checkpoint(
                    str(ckpt), tag=univ.name, load_optimizer_states=True, load_lr_scheduler_states=True
                )
        finally:
            engine._config.load_universal_checkpoint = False
    else:
        with _SafeReads(engine):
            path, client = engine.load_checkpoint(
                str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
    if path is None:
        raise UserError(f"DeepSpeed could not load checkpoint {ckpt}")
    step = int(client["step"])
    _restore_rng(ckpt, state, generator, rank, step)
    if rank == 0:
        log.warning(
            "checkpoint %s was written by %d rank(s); resumed on %d at step %d (%s)", ckpt, written, world, step, note
        )
    return step, position
