"""Stage 1 (c2i) then stage 2 (isr) on real shards: losses fall, stage 2 starts from stage 1's weights, MLflow run
holds params / metrics / image artifacts / lineage, bad samples are skipped and counted, clear config errors."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import sha256  # tests/training/conftest.py
from safetensors.torch import load_file

from infra.core.config import load_config
from infra.core.errors import UserError
from training.config import TrainConfig
from training.model_setup import build_models
from training.trainer import train

COMMON = [
    "data.batch_size=4",
    "data.workers=0",
    "optim.lr=2e-3",
    "validation.num_images=2",
    "validation.batches=1",
    "validation.top_k=5",
    "checkpoint_every=0",
    "log_every=1",
]


def _bad_shard(path: Path) -> Path:
    """A tar with one sample whose HR PNG is truncated garbage (must be skipped and counted, not fatal)."""
    with tarfile.open(path, "w") as t:
        for name, data in (
            ("bad0.hr.png", b"\x89PNG\r\n\x1a\n-truncated"),
            ("bad0.lr.png", b"nope"),
            ("bad0.json", b'{"label": 0, "class_id": 1}'),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def _cfg(tmp_path, name, stage, shards, extra=()):
    return load_config(
        TrainConfig,
        None,
        [
            f"stage={stage}",
            f"output_dir={tmp_path / name}",
            f"data.shards={shards}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.experiment=test-train",
            *COMMON,
            *extra,
        ],
    )


def _falls(xs, k=3):
    return float(np.mean(xs[-k:])) < float(np.mean(xs[:k]))


def test_stage1_then_stage2_with_mlflow_lineage(shards, tmp_path, dist_port, monkeypatch):
    import mlflow

    tars = sorted(str(p) for p in shards.glob("*.tar"))
    bad = _bad_shard(tmp_path / "zz-bad.tar")
    c1 = _cfg(tmp_path, "s1", "c2i", ",".join(tars + [str(bad)]), ["max_steps=14", "validation.every=7"])
    r1 = train(c1)
    assert r1.steps == 14 and len(r1.losses) == 14
    assert r1.bad_samples == 2, "the truncated sample is skipped and counted (once per epoch, 2 epochs)"
    h1 = [__import__("json").loads(x) for x in (tmp_path / "s1" / "history.jsonl").read_text().splitlines()]
    assert _falls([h["loss/ce"] for h in h1 if "loss/ce" in h]), h1

    monkeypatch.setenv("MASTER_PORT", str(dist_port + 1))
    c2 = _cfg(tmp_path, "s2", "isr", str(shards), ["max_steps=14", f"model.init_from={tmp_path / 's1' / 'final'}"])
    # the weights stage 2 starts from: exactly stage 1's exported tensors for every loaded key
    _, varsr2, report, parent = build_models(c2)
    s1 = load_file(str(tmp_path / "s1" / "final" / "model.safetensors"))
    assert len(report["loaded"]) > 10 and any(k.startswith("blocks.0.") for k in report["loaded"])
    assert any(k.startswith("con_embedding") for k in report["new"]), "the LR prefix encoder is new in stage 2"
    sd2 = varsr2.state_dict()
    for k in report["loaded"]:
        src = s1[f"varsr.{k}"]
        if k in report["resized"]:  # docs/MODEL.md §5.2 (a): class_emb truncated to the first rows
            src = src[: sd2[k].shape[0]]
        assert torch.equal(sd2[k], src), k
    assert "class_emb.weight" in report["resized"]
    assert parent["run_id"] == r1.run_id
    r2 = train(c2)
    assert r2.init_report == report
    h2 = [__import__("json").loads(x) for x in (tmp_path / "s2" / "history.jsonl").read_text().splitlines()]
    assert _falls([h["loss/ce"] for h in h2 if "loss/ce" in h]), h2

    # MLflow: params, metrics, image artifacts, lineage tags
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    run = client.get_run(r2.run_id)
    p, m, tags = run.data.params, run.data.metrics, run.data.tags
    assert p["stage"] == "isr" and float(p["optim.lr"]) == 2e-3 and p["zero_stage"] == "0"
    assert p["optim.betas"] == "[0.9, 0.95]" and p["resolved.total_steps"] == "14"
    for key in (
        "loss/total",
        "loss/ce",
        "loss/refiner",
        "acc/total",
        "acc/scale_0",
        "acc/scale_2",
        "ce/scale_0",
        "lr",
        "optim/grad_norm",
        "optim/loss_scale",
        "throughput/tokens_per_s",
        "throughput/samples_per_s",
        "throughput/mfu",
        "val/loss",
        "val/psnr_y",
        "val/ssim_y",
        "val/psnr_rgb",
        "init/loaded",
    ):
        assert key in m, key
    assert len(client.get_metric_history(r2.run_id, "loss/total")) == 14
    assert m["optim/grad_norm"] > 0 and 0 < m["throughput/mfu"] < 1
    arts = {a.path for d in ("", "plots", "samples", "config") for a in client.list_artifacts(r2.run_id, d)}
    assert "plots/loss_curve.png" in arts and "config/resolved_config.json" in arts
    assert any(a.startswith("samples/") and a.endswith(".png") for a in arts)
    local = Path(client.download_artifacts(r2.run_id, "plots/loss_curve.png", str(tmp_path / "dl")))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tags["varsr.data.manifest_sha256"] == sha256(shards / "manifest.json")
    # local paths are recorded relative to the run's output folder
    assert tags["varsr.data.location"] == os.path.relpath(shards.resolve(), tmp_path / "s2")
    assert tags["varsr.parent.run_id"] == r1.run_id
    assert tags["varsr.parent.checkpoint"] == "../s1/final"
    assert len(tags["varsr.git_commit"]) >= 7 and len(tags["varsr.config_hash"]) == 16
    assert client.get_run(r1.run_id).data.tags["varsr.stage"] == "c2i"


def test_clear_errors(shards, tmp_path, dist_port):
    with pytest.raises(UserError, match="does not exist"):
        train(_cfg(tmp_path, "e1", "isr", str(tmp_path / "missing"), ["max_steps=1", "tracking.enabled=false"]))
    with pytest.raises(UserError, match="64px HR crops but model preset"):
        train(
            _cfg(
                tmp_path,
                "e2",
                "isr",
                str(shards),
                ["max_steps=1", "tracking.enabled=false", "model.overrides.patch_nums=[1,2,4,8]"],
            )
        )
    with pytest.raises(UserError, match="class id .* >= model num_classes 2"):
        train(
            _cfg(
                tmp_path,
                "e3",
                "c2i",
                str(shards),
                ["max_steps=1", "tracking.enabled=false", "model.overrides.num_classes=2"],
            )
        )
