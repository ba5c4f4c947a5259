"""`varsr demo` end to end in a reduced form (a few finetuning steps from the shipped base): every stage's output
exists and is valid, the held-out figures are printed and logged, and a re-run resumes (skips finished steps)."""
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
        [sys.executable, "-m", "infra.cli", "demo", "--workdir", str(workdir), "--stage2-steps", "2",
         "--batch-size", "2", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_demo_end_to_end_reduced(tmp_path):
    w = tmp_path / "demo"
    res = _demo(w)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "VARSR demo summary" in res.stdout
    st = json.loads((w / "state.json").read_text())
    assert all(st[s]["done"] for s in ("corpus", "data", "vqvae", "stage1", "stage2", "serve", "upscale"))
    # tokenizer and stage 1 come from the shipped base; stage 2 finetunes it
    base = ROOT / "model" / "pretrained" / "small-base"
    assert st["vqvae"]["info"]["from_base"] and st["stage1"]["info"]["from_base"]
    assert Path(st["stage2"]["info"]["init"]) == base

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
        assert hr.size == (128, 128)
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
    assert "isr" in stages, stages
    init = [r for r in runs if r.data.tags.get("varsr.stage") == "isr"][0]
    assert init.data.tags.get("varsr.parent.checkpoint") == "<repo>/model/pretrained/small-base"  # no absolute path
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
    # the held-out figures, VARSR beside bicubic, are printed and logged to MLflow
    for k in ("psnr_y", "ssim_y", "hf_energy"):
        assert isinstance(up[f"{k}_varsr"], float) and isinstance(up[f"{k}_bicubic"], float)
    assert "HF energy" in res.stdout
    demo_runs = [r for r in runs if r.info.run_name == "demo-upscale"]
    assert demo_runs and {"psnr_y_varsr", "psnr_y_bicubic", "hf_energy_varsr", "hf_energy_bicubic"} <= set(
        demo_runs[0].data.metrics)

    # a re-run resumes: every step is skipped
    again = _demo(w, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("done in an earlier run, skipped") == 7


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()
