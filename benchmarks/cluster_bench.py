"""Object storage and failure recovery, measured: prints ONE JSON object with the config it ran.

1. ``data_build``: ``varsr data build`` samples/s writing shards to an S3-compatible endpoint on loopback (moto's
   server, started here) against a local folder, on the same input, after one discarded warm-up run, in runs
   interleaved A/B, B/A in one process; target: S3 at least 90 % of local.
2. ``train``: training tokens/s reading ``s3://`` shards against local ones (the same shards), interleaved;
   target: at least 95 %.
3. ``recovery``: seconds from killing a worker node of a multi-node Ray cluster (``ray.cluster_utils.Cluster``,
   head with 0 CPUs, two 1-CPU workers) in the middle of a 2-worker Ray Train run until training has resumed from its
   last checkpoint, and the extra wall time of the whole run against an uninterrupted one.
4. ``checkpoint_stall``: seconds each checkpoint holds the step loop (``training.checkpointing.STALLS``: from the
   call to ``save`` until it returns), a checkpoint every N steps of a tiny run, for a local output folder (the local
   save alone), an ``s3://`` output uploading in the loop (before) and with ``checkpoint_async`` (after: the upload
   runs in the background, the commit of the previous checkpoint happens at the next save).

    python benchmarks/cluster_bench.py [--images 96] [--rounds 3] [--train-steps 12] [--skip-recovery]
    python benchmarks/cluster_bench.py --only-checkpoint-stall [--rounds 2] [--train-steps 6] [--checkpoint-every 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
for k, v in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DS_ACCELERATOR": "cpu",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "OMP_WAIT_POLICY": "PASSIVE",
}.items():
    os.environ.setdefault(k, v)


def start_moto(log_dir: Path) -> tuple[subprocess.Popen, dict]:
    import requests

    from infra.core.net import free_port

    port = free_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=open(log_dir / "moto.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    for _ in range(300):
        try:
            requests.get(f"{env['AWS_ENDPOINT_URL']}/moto-api/", timeout=1)
            break
        except requests.RequestException:
            time.sleep(0.2)
    os.environ.update(env)
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    return proc, env


def corpus(d: Path, n: int) -> Path:
    """``n`` distinct real-photo crops (bundled photos, shifted windows) as PNG files."""
    import numpy as np
    import skimage.data as sd
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    photos = [sd.astronaut(), sd.coffee(), sd.chelsea(), sd.rocket(), sd.immunohistochemistry()]
    for i in range(n):
        img = photos[i % len(photos)]
        off = (i // len(photos)) * 7
        crop = np.ascontiguousarray(img[off : off + 320, off : off + 320])
        Image.fromarray(crop).save(d / f"img{i:04d}.png")
    return d


def bench_data(tmp: Path, n_images: int, rounds: int) -> dict:
    import ray

    import data_pipeline as dp
    from infra.core import storage

    src = corpus(tmp / "corpus", n_images)
    cfg = dp.load_build_config(
        None,
        [
            "shard.crop_size=256",
            "shard.max_samples_per_shard=8",
            "select.cluster.k=4",
            f"score.weights_dir={tmp / 'no-iqa'}",
            "select.dedup.near=false",
        ],
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    dp.score(str(src), str(tmp / "sel"), cfg)
    dp.select(str(tmp / "sel" / "scores.parquet"), str(tmp / "sel"), cfg)
    selection = str(tmp / "sel" / "selection.parquet")
    dp.shard(selection, str(tmp / "out-warmup"), cfg)  # discarded: the first run pays for worker start-up and imports
    runs: dict[str, list[float]] = {"local": [], "s3": []}
    images = 0
    for r in range(rounds):
        for kind in ("local", "s3") if r % 2 == 0 else ("s3", "local"):
            out = str(tmp / f"out-{kind}-{r}") if kind == "local" else f"s3://bench/out-{r}"
            res = dp.shard(selection, out, cfg)
            images = res["images_written"]
            runs[kind].append(images / res["seconds"])
            if kind == "s3":
                storage.remove(out, recursive=True)
    ray.shutdown()
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "images": images,
        "samples_per_s_local": round(med["local"], 2),
        "samples_per_s_s3": round(med["s3"], 2),
        "s3_over_local": round(med["s3"] / med["local"], 3),
        "runs": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "target_ratio": 0.9,
    }


def _train_once(shards: str, out: str, steps: int, warmup: int = 2) -> float:
    """Median training tokens/s of one run after ``warmup`` steps (the step time includes fetching its batch)."""
    from infra.core.config import load_config
    from training.config import TrainConfig
    from training.trainer import train

    cfg = load_config(
        TrainConfig,
        None,
        [
            "stage=isr",
            f"data.shards={shards}",
            f"output_dir={out}",
            f"max_steps={steps}",
            "data.batch_size=8",
            "data.workers=1",
            "tracking.enabled=false",
            "validation.num_images=1",
            "validation.batches=1",
            "seed=0",
            "checkpoint_every=0",
        ],
    )
    train(cfg)
    hist = [json.loads(x) for x in Path(out, "history.jsonl").read_text().splitlines()]
    steps = [h for h in hist if "throughput/tokens_per_s" in h]  # training rows (validation rows hold val/...)
    return statistics.median(h["throughput/tokens_per_s"] for h in steps[warmup:])


def bench_train(tmp: Path, steps: int, rounds: int) -> dict:
    """Tokens/s of the training loop reading local vs s3:// shards (same shards, interleaved, in this process)."""
    import ray

    import data_pipeline as dp
    from infra.core import storage
    from infra.core.net import free_port
    from training.trainer import train  # noqa: F401 - import cost outside the timed runs

    src = corpus(tmp / "tcorpus", 32)
    cfg = dp.load_build_config(
        None,
        [
            "shard.crop_size=64",
            "shard.max_samples_per_shard=8",
            "select.cluster.k=2",
            f"score.weights_dir={tmp / 'no-iqa'}",
            "select.dedup.near=false",
            "shard.lr_variants=2",
        ],
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    dp.build(str(src), str(tmp / "tshards"), cfg, print_summary=False)
    ray.shutdown()
    for p in sorted((tmp / "tshards").iterdir()):
        if p.suffix == ".tar" or p.name.endswith(".json"):
            storage.write_bytes(f"s3://bench/tshards/{p.name}", p.read_bytes())
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    import torch

    torch.set_num_threads(1)
    rates: dict[str, list[float]] = {"local": [], "s3": []}
    for r in range(rounds):
        for kind in ("local", "s3") if r % 2 == 0 else ("s3", "local"):
            shards = str(tmp / "tshards") if kind == "local" else "s3://bench/tshards"
            rates[kind].append(_train_once(shards, str(tmp / f"train-{kind}-{r}"), steps))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "steps": steps,
        "batch": 8,
        "tokens_per_s_local": round(med["local"], 1),
        "tokens_per_s_s3": round(med["s3"], 1),
        "s3_over_local": round(med["s3"] / med["local"], 3),
        "runs_tokens_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "target_ratio": 0.95,
    }


def bench_checkpoint_stall(tmp: Path, steps: int, rounds: int, every: int = 1) -> dict:
    """Median seconds a checkpoint holds the step loop: local output, s3 output uploading in the loop, s3 output
    uploading in the background (interleaved arms, in this process)."""
    import ray

    import data_pipeline as dp
    from infra.core.config import load_config
    from infra.core.net import free_port
    from training import checkpointing
    from training.config import TrainConfig
    from training.trainer import train

    src = corpus(tmp / "ccorpus", 16)
    cfg = dp.load_build_config(
        None,
        [
            "shard.crop_size=64",
            "shard.max_samples_per_shard=8",
            "select.cluster.k=2",
            f"score.weights_dir={tmp / 'no-iqa'}",
            "select.dedup.near=false",
        ],
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    dp.build(str(src), str(tmp / "cshards"), cfg, print_summary=False)
    ray.shutdown()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    arms = {
        "local": (str(tmp / "ckpt-local"), False),
        "s3_sync": ("s3://bench/ckpt-sync", False),
        "s3_async": ("s3://bench/ckpt-async", True),
    }
    stalls: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(rounds):
        for name in list(arms) if r % 2 == 0 else list(arms)[::-1]:
            out, asynchronous = arms[name]
            checkpointing.STALLS.clear()
            train(
                load_config(
                    TrainConfig,
                    None,
                    [
                        "stage=isr",
                        f"data.shards={tmp / 'cshards'}",
                        f"output_dir={out}-{r}",
                        f"max_steps={steps}",
                        "data.batch_size=4",
                        "data.workers=0",
                        "tracking.enabled=false",
                        "validation.num_images=1",
                        "validation.batches=1",
                        "seed=0",
                        f"checkpoint_every={every}",
                        "keep_checkpoints=2",
                        f"checkpoint_async={str(asynchronous).lower()}",
                    ],
                )
            )
            checkpointing.flush()  # the run's last checkpoint is committed before the next arm
            stalls[name] += checkpointing.STALLS[:-1]  # the in-loop checkpoints (the final one ends the run)
    med = {k: statistics.median(v) for k, v in stalls.items()}
    return {
        "steps": steps,
        "rounds": rounds,
        "checkpoint_every": every,
        "checkpoints_per_arm": {k: len(v) for k, v in stalls.items()},
        "median_stall_s": {k: round(v, 3) for k, v in med.items()},
        "max_stall_s": {k: round(max(v), 3) for k, v in stalls.items()},
        "async_over_local": round(med["s3_async"] / med["local"], 2),
        "sync_over_local": round(med["s3_sync"] / med["local"], 2),
    }


def bench_recovery(tmp: Path, steps: int) -> dict:
    """Kill a worker node during a 2-worker Ray Train run; seconds until training resumed, and extra wall time."""
    from ray.cluster_utils import Cluster

    from infra.core import storage

    c = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    )
    nodes = [c.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(2)]
    c.wait_for_nodes()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    base = [
        sys.executable,
        "-m",
        "infra.cli",
        "train",
        "isr",
        "--ray-address",
        c.address,
        "--set",
        "data.shards=s3://bench/tshards",
        "--set",
        f"max_steps={steps}",
        "--set",
        "checkpoint_every=2",
        "--set",
        "data.workers=0",
        "--set",
        "tracking.enabled=false",
        "--set",
        "validation.num_images=1",
        "--set",
        "validation.batches=1",
        "--set",
        "ray.num_workers=2",
        "--set",
        "ray.cpus_per_worker=1",
    ]
    t0 = time.monotonic()
    subprocess.run(
        base + ["--set", "output_dir=s3://bench/runs/plain"],
        env=env,
        check=True,
        stdout=open(tmp / "plain.log", "w"),
        stderr=subprocess.STDOUT,
    )
    plain = time.monotonic() - t0
    log = tmp / "killed.log"
    t0 = time.monotonic()
    proc = subprocess.Popen(
        base + ["--set", "output_dir=s3://bench/runs/killed"], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT
    )
    marker = "s3://bench/runs/killed/checkpoints/step_00000002/COMPLETE"
    while not storage.exists(marker):
        if proc.poll() is not None:
            raise RuntimeError(log.read_text()[-3000:])
        time.sleep(0.2)
    c.remove_node(nodes[0], allow_graceful=False)
    killed_at = time.monotonic()
    c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    resumed_at = None
    while proc.poll() is None:
        if resumed_at is None and re.search(r"resumed from", log.read_text()):
            resumed_at = time.monotonic()
        time.sleep(0.2)
    total = time.monotonic() - t0
    if resumed_at is None and re.search(r"resumed from", log.read_text()):
        resumed_at = time.monotonic()
    c.shutdown()
    return {
        "returncode": proc.returncode,
        "steps": steps,
        "uninterrupted_run_s": round(plain, 1),
        "killed_run_s": round(total, 1),
        "extra_wall_s": round(total - plain, 1),
        "seconds_to_resume_after_kill": None if resumed_at is None else round(resumed_at - killed_at, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=12)
    ap.add_argument("--skip-recovery", action="store_true")
    ap.add_argument("--only-checkpoint-stall", action="store_true")
    # a checkpoint every step is the worst case for the async arm: each save first waits for the previous upload
    ap.add_argument("--checkpoint-every", type=int, default=1, help="steps between checkpoints (checkpoint_stall)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="varsr-cluster-bench-") as d:
        tmp = Path(d)
        moto, _ = start_moto(tmp)
        try:
            if args.only_checkpoint_stall:  # start_moto made the bucket
                print(
                    json.dumps(
                        {
                            "benchmark": "checkpoint stall of the step loop, loopback S3 (moto)",
                            "config": {
                                "train": "tiny preset, batch 4, fp32, ZeRO-0",
                                "checkpoint_every": args.checkpoint_every,
                                "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()[0]},
                            },
                            "checkpoint_stall": bench_checkpoint_stall(
                                tmp, args.train_steps, args.rounds, args.checkpoint_every
                            ),
                        }
                    )
                )
                return
            out = {
                "benchmark": "object storage (loopback S3) vs local, and node-failure recovery",
                "config": {
                    "images": args.images,
                    "rounds": args.rounds,
                    "train_steps": args.train_steps,
                    "data": "256-px crops, varsr-mild, 8 samples/shard, 2 local Ray CPUs",
                    "train": "tiny preset, batch 8, 1 loader worker, fp32, 1 thread",
                    "s3": "moto server on 127.0.0.1",
                    "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()[0]},
                },
                "data_build": bench_data(tmp, args.images, args.rounds),
                "train": bench_train(tmp, args.train_steps, args.rounds),
            }
            if not args.skip_recovery:
                out["recovery"] = bench_recovery(tmp, max(6, args.train_steps // 2))
        finally:
            moto.terminate()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
