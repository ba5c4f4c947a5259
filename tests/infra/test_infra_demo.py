"""`varsr demo` end to end in a reduced form (few steps): every stage's output exists and is valid, and a re-run
resumes (skips finished steps)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def _demo(workdir: Path, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "infra.cli", "demo", "--workdir", str(workdir), "--vqvae-steps", "4",
         "--stage1-steps", "3", "--stage2-steps", "3", "--batch-size", "4", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_demo_end_to_end_reduced(tmp_path):
    w = tmp_path / "demo"
    res = _demo(w)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "VARSR demo summary" in res.stdout
    st = json.loads((w / "state.json").read_text())
    assert all(st[s]["done"] for s in ("corpus", "data", "vqvae", "stage1", "stage2", "serve", "upscale"))

    # shards: manifest accounts for every input, tars readable by plain webdataset
    import webdataset as wds

    m = json.loads((w / "shards" / "manifest.json").read_text())
    c = m["counts"]
    assert c["kept"] + c["rejected"] + c["failed"] == c["inputs"]
    assert st["data"]["info"]["failed"] == {"truncated": 1}
    n = 0
    for sample in wds.WebDataset([str(w / "shards" / s["name"]) for s in m["shards"]], shardshuffle=False):
        assert {"hr.png", "lr.png", "json"} <= set(sample)
        hr = Image.open(io.BytesIO(sample["hr.png"]))
        assert hr.size == (64, 64)
        n += 1
    assert n == c["samples"]

    # MLflow: stage-1 and stage-2 runs, a registered version under @champion carrying lineage
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{w / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps)
    stages = {r.data.tags.get("varsr.stage") for r in runs}
    assert {"c2i", "isr"} <= stages, stages
    mv = client.get_model_version_by_alias("varsr-demo", "champion")
    assert mv.tags.get("varsr.data.manifest_sha256") == _sha256(w / "shards" / "manifest.json")

    # serving answered a real HTTP request with an image of the right size, and refused a bad one with a 4xx
    serve = st["serve"]["info"]
    lr = Image.open(st["corpus"]["info"]["holdout_lr"])
    assert serve["status"] == 200 and serve["size"] == [lr.width * 4, lr.height * 4]
    assert 400 <= serve["bad_request_status"] < 500
    assert Image.open(serve["response_image"]).size == (lr.width * 4, lr.height * 4)

    # upscale: SR + bicubic + comparison written and valid
    up = st["upscale"]["info"]
    for key in ("sr", "bicubic", "comparison"):
        Image.open(up[key]).verify()
    assert Image.open(up["sr"]).size == (lr.width * 4, lr.height * 4)

    # a re-run resumes: every step is skipped
    again = _demo(w, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("done in an earlier run, skipped") == 7


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()
