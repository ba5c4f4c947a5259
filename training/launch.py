"""Launchers: one process (default), several local processes via torchrun (``--nproc``), or a Ray cluster through
Ray Train's ``TorchTrainer`` (``--ray-address``) with DeepSpeed inside each worker.

The multi-process launchers first write the resolved config to ``{output_dir}/config.yaml``; the workers load that
file, so every rank trains exactly the same config. The file shows a tracking URI without its credentials
(infra/core/redact.py); torchrun workers get the full URI in ``$MLFLOW_TRACKING_URI`` beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from infra.core.config import load_config, save_config, to_dict
from infra.core.errors import UserError
from infra.core.log import say
from infra.core.redact import install as redact_output
from infra.core.redact import redact, restore
from infra.core.tracking import default_tracking_uri
from training.config import RaySection, TrainConfig


def run_local(cfg: TrainConfig, resume: str | None = None):
    """One process in this interpreter (RANK/WORLD_SIZE/... set here unless a launcher already did)."""
    from training.trainer import train

    return train(cfg, resume, shutdown=True)


def run_torchrun(cfg: TrainConfig, nproc: int, resume: str | None = None, port: int | None = None) -> int:
    """Re-exec ``torchrun --nproc_per_node N -m training.launch`` on the resolved config; returns its exit code."""
    from training.deepspeed_engine import ensure_dist_env
    from training.run_dir import RunDir

    resolved = save_config(cfg, RunDir(cfg.output_dir).local / "config.yaml")  # local, whatever output_dir is
    exe = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    if not os.path.exists(exe):
        raise UserError("torchrun not found on PATH (put the venv's bin on PATH)")
    if port is None:
        env_backup = {k: os.environ.pop(k, None) for k in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
        ensure_dist_env()
        port = int(os.environ["MASTER_PORT"])
        for k, v in env_backup.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    cmd = [
        exe,
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "-m",
        "training.launch",
        "--config",
        str(resolved),
    ]
    if resume:
        cmd += ["--resume", resume]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.setdefault("DS_ACCELERATOR", "cpu" if cfg.device == "cpu" else env.get("DS_ACCELERATOR", ""))
    if not env["DS_ACCELERATOR"]:
        env.pop("DS_ACCELERATOR")
    env.setdefault("OMP_NUM_THREADS", "1")
    if cfg.tracking.tracking_uri and redact(cfg.tracking.tracking_uri) != cfg.tracking.tracking_uri:
        env["MLFLOW_TRACKING_URI"] = cfg.tracking.tracking_uri  # config.yaml shows it masked; main() restores it
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(cmd, env=env, cwd=os.getcwd()).returncode


def _ray_worker(config: dict) -> None:
    """Ray Train worker: Ray has set up torch.distributed and the rank env vars; DeepSpeed wraps that group.

    Ray Train's failure handling restarts every worker when one dies (up to ``ray.max_failures`` times). A
    restarted worker resumes from the latest complete checkpoint of its own launch: every checkpoint's marker
    records the launch id the driver drew (``checkpointing.find_resume``). Each checkpoint is also reported to Ray
    Train as a small pointer (``ray.train.get_checkpoint()``), but a node can die after the upload and before the
    controller registers the report, so the pointer alone is not relied on. With an elastic ``ray.num_workers``
    range Ray also restarts every worker to shrink or grow the group; the checkpoint then resumes on the new number
    of ranks (``checkpointing.load`` -> training/reshard.py; docs/ELASTIC.md).
    """
    import json
    import tempfile

    import ray.train

    from training.trainer import train

    redact_output()  # this worker's prints and logs (forwarded to the driver, kept in Ray's log files)
    cfg = load_config(TrainConfig, base=config["train_config"])
    resume = "auto" if ray.train.get_checkpoint() is not None else config.get("resume")

    def report(step: int, location: str) -> None:
        rank = ray.train.get_context().get_world_rank()
        if rank != 0:
            ray.train.report({"step": step})
            return
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "varsr_checkpoint.json"), "w") as f:
                json.dump({"step": step, "location": location}, f)
            ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(d))

    train(cfg, resume, shutdown=False, on_checkpoint=report, launch=config["launch"])  # Ray owns the process group
    from training import checkpointing

    checkpointing.flush()  # a checkpoint still uploading (checkpoint_async) is committed before the worker ends


def scaling_config(r: RaySection):
    """Ray Train's ``ScalingConfig`` for ``cfg.ray``: a fixed number of workers, or for a ``[min, max]`` range an
    elastic one (``num_workers=(min, max)``), which only Ray Train v2 honours: with v1 selected
    (``RAY_TRAIN_V2_ENABLED=0``) or a Ray without elastic training, a range is refused in one line rather than
    trained at a size nobody asked for. docs/ELASTIC.md, "Elastic Ray Train"."""
    from ray.train import ScalingConfig

    errs = r.errors()
    if errs:
        raise UserError("; ".join(errs))
    resources = {"CPU": r.cpus_per_worker}
    if r.use_gpu:
        resources["GPU"] = r.gpus_per_worker
    kw: dict = dict(use_gpu=r.use_gpu, resources_per_worker=resources)
    if not r.elastic:
        return ScalingConfig(num_workers=r.workers_range[0], **kw)
    import ray

    lo, hi = r.workers_range
    no_elastic = UserError(
        f"ray.num_workers range [{lo}, {hi}]: the installed Ray {ray.__version__} has no elastic "
        f"Ray Train; give ray.num_workers a single number"
    )
    try:
        from ray.train.v2._internal.constants import V2_ENABLED_ENV_VAR, is_v2_enabled
        from ray.train.v2.api.config import ScalingConfig as V2ScalingConfig  # what ray.train exports with v2 on
    except ImportError:
        raise no_elastic from None
    if not is_v2_enabled():
        raise UserError(
            f"ray.num_workers range [{lo}, {hi}] needs Ray Train v2 (elastic training), but this "
            f"environment selects v1 ({V2_ENABLED_ENV_VAR}={os.environ.get(V2_ENABLED_ENV_VAR)}); "
            f"unset it or give ray.num_workers a single number"
        )
    if "elastic_resize_monitor_interval_s" not in {f.name for f in dataclasses.fields(V2ScalingConfig)}:
        raise no_elastic
    return V2ScalingConfig(num_workers=(lo, hi), elastic_resize_monitor_interval_s=r.resize_check_s, **kw)


def run_ray(cfg: TrainConfig, address: str, resume: str | None = None):
    """Ray Train ``TorchTrainer`` with ``cfg.ray.num_workers`` workers, a number or an elastic ``[min, max]`` range
    (:func:`scaling_config`; GPUs per worker from config); Ray's run state goes to ``{output_dir}/ray_results`` (a
    local path or the same object store)."""
    import ray
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from infra.core import storage

    scaling = scaling_config(cfg.ray)  # a range Ray cannot honour is refused before connecting
    if not ray.is_initialized():
        if address == "local":  # a local runtime, bound to loopback
            ray.init(address="local", include_dashboard=False, log_to_driver=True, _node_ip_address="127.0.0.1")
        else:
            ray.init(address=address, log_to_driver=True)
    cfg = _absolute_paths(cfg)
    r = cfg.ray
    results = storage.join(cfg.output_dir, "ray_results")
    fs_kw = {}
    if not storage.is_local(results):
        fs_kw["storage_filesystem"], results = storage.pyarrow_filesystem(results)
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"train_config": to_dict(cfg), "resume": resume, "launch": uuid.uuid4().hex},
        scaling_config=scaling,
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        run_config=RunConfig(
            name="varsr-train",
            storage_path=results,
            **fs_kw,
            failure_config=FailureConfig(max_failures=r.max_failures),
            worker_runtime_env={"env_vars": storage.forwarded_env()},
        ),
    )
    return trainer.fit()


def _absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Ray workers do not run in the driver's folder: make every local path (and the default MLflow store) absolute."""
    from infra.core import storage
    from infra.core.tracking import EXPERIMENT_ENV, default_parent_run_id, default_tracking_uri

    d = to_dict(cfg)

    def local_abs(p):
        return storage.absolute(p) if p and not any(c in p for c in "*?{,") else p

    d["output_dir"] = local_abs(d["output_dir"])
    for sec, key in (
        ("data", "shards"),
        ("data", "val_shards"),
        ("model", "init_from"),
        ("model", "official_vae"),
        ("model", "vqvae_checkpoint"),
    ):
        d[sec][key] = local_abs(d[sec][key])
    t = d["tracking"]  # the tracking defaults of this environment, resolved for workers started elsewhere
    t["tracking_uri"] = t["tracking_uri"] or default_tracking_uri()
    t["experiment"] = t["experiment"] or os.environ.get(EXPERIMENT_ENV, "").strip() or None
    t["parent_run_id"] = t["parent_run_id"] or default_parent_run_id()
    return load_config(TrainConfig, base=d)


def main(argv: list[str] | None = None) -> int:
    """torchrun entry point: ``python -m training.launch --config resolved.yaml [--resume auto]``."""
    ap = argparse.ArgumentParser(prog="training.launch")
    ap.add_argument("--config", required=True)
    ap.add_argument("--resume", default=None)
    args = ap.parse_args(argv)
    redact_output()
    cfg = load_config(TrainConfig, args.config)
    try:
        cfg.tracking.tracking_uri = restore(cfg.tracking.tracking_uri, default_tracking_uri())
        run_local(cfg, args.resume)
    except UserError as e:
        say(f"varsr: error: {redact(str(e))}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
