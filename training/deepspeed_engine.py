"""TrainConfig -> DeepSpeed config dict, process-group setup and ``deepspeed.initialize`` with a torch AdamW.

A torch AdamW is passed to ``initialize`` (no config ``optimizer`` section: that would JIT-compile fused_adam), with a
``LambdaLR`` carrying the warm-up + ``lin0`` schedule; DeepSpeed steps both at gradient-accumulation boundaries and
saves/restores both in its checkpoints. gloo on CPU, nccl on GPU.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from infra.core.errors import UserError
from infra.core.log import say
from training.config import TrainConfig
from training.param_groups import param_groups, torch_groups
from training.schedule import Schedule


def _merge(base: dict, upd: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in upd.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# keys the trainer derives from TrainConfig and the world size; a DeepSpeed file's values for them are placeholders
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def load_deepspeed_file(ref: str) -> dict[str, Any]:
    """A DeepSpeed JSON file: a path (as given, else relative to the repository root, like configs/...) or a URL."""
    import json

    from infra.core import storage

    url = ref if (not storage.is_local(ref) or os.path.exists(ref)) else os.path.join(REPO_ROOT, ref)
    if storage.is_local(url) and not os.path.exists(url):
        raise UserError(f"deepspeed config {ref} does not exist")
    try:
        data = json.loads(storage.read_text(url))
    except json.JSONDecodeError as e:
        raise UserError(f"deepspeed config {ref} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"deepspeed config {ref} must hold a JSON object")
    return data


def _get(d: dict, dotted: str):
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of a run: ``cfg.deepspeed`` (a JSON file or a mapping: ZeRO tuning, communication,
    anything DeepSpeed reads) merged with what the trainer derives. Batch sizes always come from the TrainConfig
    and the world size (a file's batch keys are placeholders, so the file alone still parses with DeepSpeed's own
    config class); ZeRO stage, precision and gradient clipping are the TrainConfig's toggles, and a file that
    says otherwise is refused with the conflicting key named."""
    user = load_deepspeed_file(cfg.deepspeed) if isinstance(cfg.deepspeed, str) else dict(cfg.deepspeed or {})
    micro, accum = cfg.data.batch_size, cfg.optim.grad_accum
    defaults: dict[str, Any] = {  # what a file may change
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.zero_stage >= 2:  # safe on gloo/CPU; GPU files turn overlap_comm on
        defaults["zero_optimization"] = {"overlap_comm": False, "contiguous_gradients": True}
    derived: dict[str, Any] = {  # what the TrainConfig decides
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
    }
    if cfg.precision == "bf16":
        derived["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        # the paper's loss scaling (docs/MODEL.md §5.4): initial scale 2^11, growth interval 1000
        derived["fp16"] = {"enabled": True, "initial_scale_power": 11, "loss_scale_window": 1000, "min_loss_scale": 1}
    owned = {
        "zero_optimization.stage": cfg.zero_stage,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16.enabled": cfg.precision == "bf16",
        "fp16.enabled": cfg.precision == "fp16",
    }
    for key, mine in owned.items():
        theirs = _get(user, key)
        if theirs is not None and theirs != mine:
            where = cfg.deepspeed if isinstance(cfg.deepspeed, str) else "deepspeed"
            raise UserError(
                f"{where} sets {key}={theirs!r} but this run has {key}={mine!r} (from zero_stage / "
                f"precision / optim.grad_clip); change one so they agree"
            )
    return _merge(_merge(defaults, {k: v for k, v in user.items() if k not in BATCH_KEYS}), derived)


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("device=cuda but no CUDA device is visible")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if cfg.precision == "fp16":
        raise UserError(
            "precision=fp16 needs a CUDA device (fp16 autocast + loss scaling); on CPU use precision=bf16 or fp32"
        )
    return torch.device("cpu")


def ensure_dist_env(port: int | None = None) -> None:
    """Single-process default: set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT if a launcher did not."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        return
    if port is None:
        from infra.core.net import free_port

        port = free_port()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


# A JIT build of a torch extension holds ``<extensions dir>/<op>/lock`` while it compiles (about a minute for
# DeepSpeed's CPU communication op); a process killed meanwhile leaves the file behind, and every later build of that op
# then waits on it forever, silently. A lock older than this is taken to be such a leftover.
STALE_BUILD_LOCK_S = 300.0


def extensions_dir() -> str:
    """Where this Python environment's JIT-built ops go: torch's default root, one folder per ``sys.prefix``. Two
    environments on one machine (a checkout and a CI clone) would otherwise rebuild the shared op over each other's
    build, each one waiting on the other's lock."""
    import hashlib
    import sys

    from torch.utils.cpp_extension import get_default_build_root

    return os.path.join(get_default_build_root(), "varsr-" + hashlib.sha256(sys.prefix.encode()).hexdigest()[:12])


def clear_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S, poll_s: float = 5.0) -> list[str]:
    """Wait while a torch-extension build lock is younger than ``max_age_s`` (another process is building the op),
    then remove any lock older than that (left by a killed build), saying so on stderr. Returns the removed paths."""
    import time
    from pathlib import Path

    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    removed, said = [], False
    while True:
        young = False
        for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
            try:
                age = time.time() - lock.stat().st_mtime
                if age > max_age_s:
                    lock.unlink()
                    removed.append(str(lock))
                    say(
                        f"[train] removed a stale torch-extension build lock {lock} ({age:.0f} s old, left by a "
                        f"killed build); the op is rebuilt"
                    )
                else:
                    young = True
                    if not said:
                        say(
                            f"[train] waiting for a torch-extension build to release {lock} (another process is "
                            f"compiling the op; a lock older than {max_age_s:.0f} s is removed)"
                        )
                        said = True
            except FileNotFoundError:  # the build finished, or another process cleared it, meanwhile
                continue
        if not young:
            return removed
        time.sleep(poll_s)


def init_distributed(device: torch.device) -> None:
    """Create the process group (nccl on GPU, gloo on CPU) once."""
    import deepspeed
    import torch.distributed as dist

    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
        clear_stale_build_locks()
    if not dist.is_initialized():
        import atexit

        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False)
        atexit.register(shutdown)
    else:  # e.g. Ray Train created the torch group: let DeepSpeed wrap it
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False)


def initialize(cfg: TrainConfig, model: torch.nn.Module, schedule: Schedule):
    """``deepspeed.initialize`` with AdamW over the decay/no-decay groups and the LR schedule.

    Returns (engine, optimizer, lr_scheduler, ds_config).
    """
    import deepspeed
    import torch.distributed as dist

    groups = param_groups(model, cfg.optim.weight_decay)
    opt = torch.optim.AdamW(
        torch_groups(groups),
        lr=cfg.optim.lr,
        betas=(cfg.optim.betas[0], cfg.optim.betas[1]),  # validate() checks there are two
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    ds_cfg = deepspeed_config(cfg, dist.get_world_size())
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model,
        optimizer=opt,
        lr_scheduler=sched,
        config=ds_cfg,
        dist_init_required=False,
    )
    return engine, optimizer, lr_scheduler, ds_cfg


def shutdown() -> None:
    """Commit a checkpoint still uploading in the background (``checkpointing.flush``), then barrier + destroy the
    process group (avoids rare gloo aborts at interpreter exit)."""
    import torch.distributed as dist

    from training import checkpointing

    if dist.is_available() and dist.is_initialized():
        checkpointing.flush()
        dist.barrier()
        dist.destroy_process_group()
