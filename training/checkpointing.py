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
import shutil
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.shards import DataPosition
from infra.core.errors import UserError
from training import reshard
from training.checkpoint_io import (  # noqa: F401 - re-exported: checkpointing.safe_load etc.
    _SafeReads,
    check_checkpoint_files,
    deepspeed_safe_globals,
    rng_state,
    safe_load,
    set_rng_state,
)
from training.run_dir import RunDir

log = logging.getLogger(__name__)
MARKER = "COMPLETE"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


CKPTS = "checkpoints"


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


class _Background:
    """A thread that runs ``fn`` and keeps its error (reported by every rank at the next :func:`flush`, never lost)."""

    def __init__(self, name: str, fn):
        self.fn = fn
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=False)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.fn()
        except Exception as e:  # noqa: BLE001 - any failure of an upload or commit is reported, see flush
            self.error = f"{type(e).__name__}: {e}"

    def join(self) -> str | None:
        self.thread.join()
        return self.error


class _Upload(_Background):
    """One rank's background upload of the files it wrote for one checkpoint (an object-store output with
    ``checkpoint_async``); rank 0 commits it (trainer state + ``COMPLETE``) once every rank's upload is done."""

    def __init__(self, run: RunDir, step: int, files: list[Path], state: dict | None, keep: int, launch: str | None):
        self.run, self.step, self.state, self.keep, self.launch = run, step, state, keep, launch
        self.files = files
        super().__init__(f"checkpoint-upload-{step}", self._publish)

    def _publish(self) -> None:
        for f in self.files:
            self.run.publish(f)

    def commit(self) -> None:
        rel = f"{CKPTS}/{_tag(self.step)}"
        (self.run / rel / "trainer_state.json").write_text(json.dumps(self.state, indent=2) + "\n")
        self.run.publish(f"{rel}/trainer_state.json")
        _commit(self.run, self.step, self.keep, self.launch)
        log.info("checkpoint saved: %s", self.run.url_of(rel))


_PENDING: _Upload | None = None  # this process's checkpoint whose upload runs in the background
_COMMITTING: tuple[_Upload, _Background] | None = None  # rank 0: a checkpoint and the thread committing it
STALLS: list[float] = []  # seconds each save() held the step loop (benchmarks/cluster_bench.py reads them)


def flush(wait: bool = True) -> None:
    """Collective: finish this process's background checkpoint upload, if any, and commit it: once every rank's
    files are uploaded, rank 0 writes the trainer state and the ``COMPLETE`` marker (still the commit point) — in
    the background too unless ``wait``. Called by :func:`save` (``wait=False``) and, waiting, by the launchers
    before the process group goes (``deepspeed_engine.shutdown``, ``launch._ray_worker``). A failed upload or commit
    on any rank raises on every rank; the checkpoint is then not committed."""
    global _PENDING, _COMMITTING
    p, _PENDING = _PENDING, None
    c, _COMMITTING = _COMMITTING, None
    if p is None and c is None:
        return
    mine = [f"checkpoint step {c[0].step} (commit): {err}"] if c is not None and (err := c[1].join()) else []
    if p is not None and (err := p.join()):
        mine.append(f"checkpoint step {p.step} (upload): {err}")
    errors: list[list[str] | None] = [None] * _world()
    if dist.is_initialized():
        dist.all_gather_object(errors, mine)
    else:
        errors[0] = mine
    bad = [f"rank {r}, {e}" for r, errs in enumerate(errors) for e in errs or []]
    if bad:
        run = p.run if p is not None else c[0].run if c is not None else None
        raise UserError(
            f"uploading a checkpoint to {run.url if run else 'the output'} failed ({bad[0]}); it was not "
            f"committed, the previous complete checkpoint stays the resume point"
        )
    if p is not None and p.state is not None:  # rank 0
        if wait:
            p.commit()
        else:
            _COMMITTING = (p, _Background(f"checkpoint-commit-{p.step}", p.commit))
    if wait:
        _barrier()


def save(
    engine,
    run: RunDir,
    step: int,
    position: DataPosition,
    generator,
    fingerprint: dict,
    keep: int,
    launch: str | None = None,
    asynchronous: bool = False,
) -> str:
    """Collective: every rank calls it. Returns the checkpoint's location (path or URL).

    ``launch`` (a Ray Train launch's id, ``training/launch.py``) goes into the ``COMPLETE`` marker, so workers that
    Ray restarts after a failure find the checkpoints of their own launch (``find_resume``).

    ``asynchronous`` with an object-store output: the step loop waits only for the local save; each rank uploads its
    files in a background thread and the checkpoint is committed (``COMPLETE``) by the next ``save`` or :func:`flush`
    once every rank's upload has finished. Until then ``--resume auto`` takes the previous complete checkpoint."""
    global _PENDING
    t0 = time.perf_counter()
    flush(wait=False)
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
    state = {"step": step, "world_size": _world(), "positions": dict(enumerate(positions)), **fingerprint}
    if run.remote and asynchronous:
        files = [f.relative_to(run.local) for f in sorted(d.rglob("*")) if f.is_file()]
        _PENDING = _Upload(run, step, files, state if rank == 0 else None, keep, launch)
        STALLS.append(time.perf_counter() - t0)
        return run.url_of(rel)
    if run.remote:  # every rank publishes what it wrote (its own optimiser shard, its RNG state)
        for f in sorted(d.rglob("*")):
            if f.is_file():
                run.publish(f.relative_to(run.local))
    _barrier()
    if rank == 0:
        (d / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        run.publish(f"{rel}/trainer_state.json")
        _commit(run, step, keep, launch)
        log.info("checkpoint saved: %s", run.url_of(rel))
    _barrier()
    STALLS.append(time.perf_counter() - t0)
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


def _bring(run: RunDir, step: int) -> Path:
    rel = f"{CKPTS}/{_tag(step)}"
    return run.fetch_tree(rel) if run.remote else run / rel


def load(
    engine, ckpt: Path, generator, fingerprint: dict, split: str = "global_batch", workers: int = 0
) -> tuple[int, DataPosition]:
    """Restore engine + RNG + data position; UserError if the checkpoint is from another config.

    A checkpoint of another number of ranks resumes through :func:`training.reshard.load_resized` (DeepSpeed's
    universal checkpoint for ZeRO's partitioned optimiser state); ``split`` and ``workers`` (the run's ``data.split``
    and ``data.workers``) say how its data position is regrouped (``regroup_position``)."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    diff = _fingerprint_mismatch(state, fingerprint)
    if diff:
        raise UserError(
            f"checkpoint {ckpt} was written by another config ({diff}); use a fresh output_dir or the matching config"
        )
    if engine.load_universal_checkpoint():  # DeepSpeed reads universal checkpoints with weights_only=False loads
        raise UserError(
            "resuming from a DeepSpeed universal checkpoint (checkpoint.load_universal) is not supported: "
            "its loader unpickles without an allow-list"
        )
    check_checkpoint_files(ckpt)
    if state["world_size"] != _world():
        return reshard.load_resized(engine, ckpt, state, generator, split, workers)
    with _SafeReads(engine):
        path, client = engine.load_checkpoint(
            str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if path is None:
        raise UserError(f"DeepSpeed could not load checkpoint {ckpt}")
    st = safe_load(ckpt / f"rng_rank{_rank()}.pt")
    set_rng_state(st["rng"], generator)
    return int(client["step"]), DataPosition(**state["positions"][str(_rank())])
