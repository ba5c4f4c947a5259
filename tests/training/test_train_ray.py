"""The Ray Train launcher for real: `varsr train isr --ray-address local` runs DeepSpeed inside a Ray Train
TorchTrainer worker (local Ray runtime), with relative paths resolved for the worker, and exports + tracks the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ray_train_launcher_runs_deepspeed_in_a_worker(shards, tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "RAY_ADDRESS", "MLFLOW_TRACKING_URI")
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    # relative paths on purpose: the Ray worker runs elsewhere and must still find the shards and the output folder
    rel_shards = os.path.relpath(shards, tmp_path)
    overrides = [
        f"data.shards={rel_shards}",
        "output_dir=runs/ray",
        "max_steps=3",
        "data.batch_size=4",
        "data.workers=0",
        "validation.num_images=1",
        "validation.batches=1",
        "ray.num_workers=1",
        "ray.cpus_per_worker=1",
    ]
    cmd = [sys.executable, "-m", "infra.cli", "train", "isr", "--ray-address", "local"]
    cmd += [a for o in overrides for a in ("--set", o)]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "runs" / "ray"
    final = out / "final"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    hist = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist if "loss/total" in h][:3] == [1, 2, 3]
    # tracked in the platform default store of the launching folder (resolved before the worker started)
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert any(r.data.tags.get("varsr.stage") == "isr" for r in runs)
    assert mlflow.get_tracking_uri() != f"sqlite:///{tmp_path / 'mlflow.db'}"
