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

from training.config import TrainConfig
from training.param_groups import param_groups, torch_groups
from training.schedule import Schedule


def _merge(base: dict, upd: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in upd.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for ``cfg``: batch sizes, ZeRO stage, precision, clipping (+ ``cfg.deepspeed`` merged)."""
    micro, accum = cfg.data.batch_size, cfg.optim.grad_accum
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.zero_stage >= 2:
        ds["zero_optimization"].update({"overlap_comm": False, "contiguous_gradients": True})
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        # spec §5.4: GradScaler init 2^11, growth interval 1000
        ds["fp16"] = {"enabled": True, "initial_scale_power": 11, "loss_scale_window": 1000, "min_loss_scale": 1}
    return _merge(ds, cfg.deepspeed)


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("device=cuda but no CUDA device is visible")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if cfg.precision == "fp16":
        raise UserError("precision=fp16 needs a CUDA device (fp16 autocast + loss scaling); on CPU use "
                        "precision=bf16 or fp32")
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


def init_distributed(device: torch.device) -> None:
    """Create the process group (nccl on GPU, gloo on CPU) once."""
    import deepspeed
    import torch.distributed as dist

    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
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
        torch_groups(groups), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    ds_cfg = deepspeed_config(cfg, dist.get_world_size())
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg, dist_init_required=False,
    )
    return engine, optimizer, lr_scheduler, ds_cfg


def shutdown() -> None:
    """Barrier + destroy the process group (STACK.md: avoids rare aborts at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
