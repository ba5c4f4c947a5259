"""Training checkpoints: DeepSpeed engine state (model, optimiser, LR schedule) + our trainer state, with a COMPLETE
marker; the output folder may be local or an object-store URL (``training/run_dir.py``).

Layout: ``{output_dir}/checkpoints/step_{N:08d}/`` holds DeepSpeed's files, ``trainer_state.json`` (step, data
position per rank, config hashes) and ``rng_rank{r}.pt`` (python / numpy / torch / CUDA / step-generator states).
Every rank writes (and, for a URL, publishes) its own files; ``COMPLETE`` is written by rank 0 after every rank has
finished, so ``--resume auto`` never picks a torn checkpoint. Resuming from a URL brings the checkpoint into each
rank's local folder first (no shared disk between nodes is assumed).

Resuming never unpickles code: DeepSpeed's own loader reads its files with ``torch.load(weights_only=False)`` and has
no option for anything else, so :func:`load` first checks every ``.pt`` file of the checkpoint against an allow-list
(:func:`safe_load`: tensors, plain containers and the few DeepSpeed types of :func:`deepspeed_safe_globals`), then
routes DeepSpeed's reads through the same ``weights_only=True`` loader. A file holding anything else is refused with one
line naming it (docs/SECURITY.md).
"""
from __future__ import annotations

import json
import logging
import pickle
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.shards import DataPosition
from infra.core.errors import UserError
from training.run_dir import RunDir

log = logging.getLogger(__name__)
MARKER = "COMPLETE"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state(generator: torch.Generator | None) -> dict:
    np_state = np.random.get_state()
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
    np.random.set_state(("MT19937", st["numpy_keys"].numpy().astype(np.uint32), st["numpy_pos"],
                         st["numpy_gauss"][0], st["numpy_gauss"][1]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])
    if generator is not None and "generator" in st:
        generator.set_state(st["generator"])


CKPTS = "checkpoints"


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def save(engine, run: RunDir, step: int, position: DataPosition, generator, fingerprint: dict, keep: int,
         launch: str | None = None) -> str:
    """Collective: every rank calls it. Returns the checkpoint's location (path or URL).

    ``launch`` (a Ray Train launch's id, ``training/launch.py``) goes into the ``COMPLETE`` marker, so workers that
    Ray restarts after a failure find the checkpoints of their own launch (``find_resume``)."""
    tag = _tag(step)
    rel = f"{CKPTS}/{tag}"
    d = run / rel
    if run.remote and d.exists():
        shutil.rmtree(d)  # a stale local copy (e.g. from a download for resume) must not be re-published
    engine.save_checkpoint(str(run / CKPTS), tag=tag, client_state={"step": step}, save_latest=False)
    rank = _rank()
    torch.save({"rng": rng_state(generator)}, d / f"rng_rank{rank}.pt")
    positions: list[dict | None] = [None] * _world()
    if dist.is_initialized():
        dist.all_gather_object(positions, asdict(position))
    else:
        positions[0] = asdict(position)
    if run.remote:  # every rank publishes what it wrote (its own optimiser shard, its RNG state)
        for f in sorted(d.rglob("*")):
            if f.is_file():
                run.publish(f.relative_to(run.local))
    _barrier()
    if rank == 0:
        state = {"step": step, "world_size": _world(), "positions": dict(enumerate(positions)), **fingerprint}
        (d / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        run.publish(f"{rel}/trainer_state.json")
        _commit(run, step, keep, launch)
        log.info("checkpoint saved: %s", run.url_of(rel))
    _barrier()
    return run.url_of(rel)


def _commit(run: RunDir, step: int, keep: int, launch: str | None = None) -> None:
    """Write and publish the ``COMPLETE`` marker of a checkpoint whose files are all published (its commit point),
    then remove the complete checkpoints beyond the newest ``keep``."""
    rel = f"{CKPTS}/{_tag(step)}/{MARKER}"
    (run / rel).write_text(json.dumps({"step": step, "launch": launch}) + "\n")
    run.publish(rel)
    for old in complete_checkpoints(run)[:-keep] if keep > 0 else []:
        run.remove_tree(f"{CKPTS}/{_tag(old)}")


def complete_checkpoints(run: RunDir) -> list[int]:
    """Steps of the complete checkpoints of a run (at its output URL), oldest first."""
    steps = []
    for name in run.list(CKPTS):
        if name.startswith("step_") and name[5:].isdigit() and run.exists(f"{CKPTS}/{name}/{MARKER}"):
            steps.append(int(name[5:]))
    return sorted(steps)


def launch_of(run: RunDir, step: int) -> str | None:
    """The launch id recorded in a complete checkpoint's marker (None for checkpoints written outside Ray Train)."""
    rel = f"{CKPTS}/{_tag(step)}/{MARKER}"
    if not run.fetch(rel):
        return None
    try:
        return json.loads((run / rel).read_text()).get("launch")
    except (ValueError, AttributeError):  # a marker from before launches were recorded holds no JSON object
        return None


def find_resume(run: RunDir, resume: str | None, launch: str | None = None) -> Path | None:
    """Which checkpoint this rank starts from (None: from scratch).

    * ``launch`` given and the run holds complete checkpoints of that launch: the latest of them. This is a worker
      restarted by Ray Train after a failure; it must not depend on Ray having registered the reported checkpoint
      before the failure (a node can die between the upload and the controller's poll).
    * ``auto`` -> the latest complete checkpoint of the run (None if there is none); a path -> that checkpoint.

    For a URL output the checkpoint is brought into this rank's local folder."""
    if launch is not None:
        own = next((s for s in reversed(complete_checkpoints(run)) if launch_of(run, s) == launch), None)
        if own is not None:  # newest first: only the markers newer than it are read
            return _bring(run, own)
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(run)
        return _bring(run, found[-1]) if found else None
    p = Path(resume)
    if not (p / MARKER).is_file():
        raise UserError(f"--resume {resume}: not a complete checkpoint (no {MARKER} marker in it)")
    return p


def save_module_state(run: RunDir, step: int, state: dict, keep: int) -> str:
    """A single-process checkpoint without DeepSpeed (stage 0: the tokenizer's plain torch model and optimiser).

    ``state.pt`` holds ``state`` (tensors, numbers, strings, lists and dicts only, so it loads with
    ``weights_only=True``) plus this process's RNG states; ``COMPLETE`` is written after it, the commit point that
    ``find_resume`` looks for. Older checkpoints beyond ``keep`` are removed. Returns the checkpoint's location."""
    rel = f"{CKPTS}/{_tag(step)}"
    d = run / rel
    d.mkdir(parents=True, exist_ok=True)
    torch.save({**state, "step": step, "rng": rng_state(None)}, d / "state.pt")
    run.publish(f"{rel}/state.pt")
    _commit(run, step, keep)
    return run.url_of(rel)


# fingerprint keys that a run writes only when the setting is on (so checkpoints from before the setting existed still
# resume): a checkpoint that has one must not be resumed by a run without it
OPTIONAL_FINGERPRINT_KEYS = ("augment", "lr_schedule")


def _fingerprint_mismatch(written: dict, fingerprint: dict) -> str | None:
    """The first setting where a checkpoint's ``written`` fingerprint and this run's differ, as text; None if equal."""
    keys = list(fingerprint) + [k for k in OPTIONAL_FINGERPRINT_KEYS if k in written and k not in fingerprint]
    for k in keys:
        if written.get(k) != fingerprint.get(k):
            return f"{k}: checkpoint {written.get(k)!r}, this run {fingerprint.get(k)!r}"
    return None


def load_module_state(ckpt: Path, fingerprint: dict) -> dict:
    """The state saved by :func:`save_module_state`, with this process's RNG states restored from it; UserError when
    it was written by another configuration (``fingerprint`` keys differ)."""
    st = safe_load(ckpt / "state.pt")
    diff = _fingerprint_mismatch(st.get("fingerprint", {}), fingerprint)
    if diff:
        raise UserError(f"checkpoint {ckpt} was written by another config ({diff}); use a fresh output_dir")
    set_rng_state(st.pop("rng"), None)
    return st


def deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed writes into the checkpoints this platform makes (ZeRO 0-3, fp32 / bf16 / fp16):
    the loss scalers, the ZeRO stage enum and the fragment addresses of ZeRO's flat partitions. Allowing them lets
    ``torch.load(weights_only=True)`` rebuild them from their field values; none runs code when unpickled."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _refusal(path, why: str) -> UserError:
    return UserError(f"checkpoint file {path} holds {why}, not only tensors and DeepSpeed's training state; refusing "
                     f"to load it (unpickling it could run code): resume only from checkpoints this platform wrote")


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
            raise UserError(f"checkpoint file {f} is not readable as a torch checkpoint ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
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


def _bring(run: RunDir, step: int) -> Path:
    rel = f"{CKPTS}/{_tag(step)}"
    return run.fetch_tree(rel) if run.remote else run / rel


def load(engine, ckpt: Path, generator, fingerprint: dict) -> tuple[int, DataPosition]:
    """Restore engine + RNG + data position; UserError if the checkpoint is from another config."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    diff = _fingerprint_mismatch(state, fingerprint)
    if diff:
        raise UserError(f"checkpoint {ckpt} was written by another config ({diff}); use a fresh output_dir or the "
                        f"matching config")
    if state["world_size"] != _world():
        raise UserError(f"checkpoint {ckpt} was written by {state['world_size']} rank(s), this run has {_world()}")
    if engine.load_universal_checkpoint():  # DeepSpeed reads universal checkpoints with weights_only=False loads
        raise UserError("resuming from a DeepSpeed universal checkpoint (checkpoint.load_universal) is not supported: "
                        "its loader unpickles without an allow-list")
    check_checkpoint_files(ckpt)
    with _SafeReads(engine):
        path, client = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"DeepSpeed could not load checkpoint {ckpt}")
    st = safe_load(ckpt / f"rng_rank{_rank()}.pt")
    set_rng_state(st["rng"], generator)
    return int(client["step"]), DataPosition(**state["positions"][str(_rank())])
