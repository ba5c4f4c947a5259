"""The README is a contract (issue 27): its first command works on a fresh copy of the committed tree, run from that
copy's root exactly as written, and every other command block of README.md, inference/README.md and docs/CLUSTER.md
runs too (tests/readme/doc_blocks.py says how each is run).

The copy is made from ``git ls-files``. It may reuse this checkout's ``.venv`` (hard links, its scripts re-pointed at
the copy); ``infra/scripts/setup.sh`` still runs as the README's command says and installs the copy's project into it.
Placeholders in the blocks are small real inputs made here: ``./photos`` (bundled real photos), ``photo.png``, an
HR/LR test pair folder, and ``checkpoints/VARSR.pth`` + ``VQVAE.pth`` written in the official trainer layout (a
``tiny``-shaped model; the released d24 is 4 GB). The README's port 5001 is replaced by a free port.

Slow (a real demo, trainings, a server): marked ``readme``, run by ``.ci/run`` as its own pytest run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from doc_blocks import read_blocks  # tests/readme/doc_blocks.py

pytestmark = pytest.mark.readme

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "inference/README.md", "docs/CLUSTER.md")
DEMO_STEPS = ("corpus", "data", "vqvae", "stage1", "stage2", "serve", "upscale")
MAX_SKIPPED = 8  # the skip list stays short: each is a Kubernetes cluster, a cloud account, a registry or the suite
FIRST_TIMEOUT_S = 2400
BLOCK_TIMEOUT_S = 900


# ---- the copy -------------------------------------------------------------------------------------------------------
def _copy_tree(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def _link_venv(dst: Path) -> None:
    """This checkout's .venv, hard-linked (no extra disk), with the paths its scripts name re-pointed at the copy.
    Files are rewritten (new inodes), never edited in place, so the original venv is untouched."""
    src = ROOT / ".venv"
    if not (src / "bin" / "python").exists():
        return  # setup.sh builds a fresh one
    subprocess.run(["cp", "-al", str(src), str(dst / ".venv")], check=True)
    old, new = str(src).encode(), str(dst / ".venv").encode()
    for f in (dst / ".venv" / "bin").iterdir():
        if f.is_file() and not f.is_symlink():
            data = f.read_bytes()
            if old in data:
                mode = f.stat().st_mode
                f.unlink()
                f.write_bytes(data.replace(old, new))
                f.chmod(mode)


def _user_env(checkout: Path, activated: bool) -> dict:
    """A new user's shell: no MLflow or parent-run variables of ours, no other venv on PATH; ``activated`` puts the
    copy's .venv first, as ``source .venv/bin/activate`` does."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "VIRTUAL_ENV",
            "PYTHONPATH",
            "MLFLOW_TRACKING_URI",
            "MLFLOW_EXPERIMENT_NAME",
            "VARSR_PARENT_RUN_ID",
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
        )
    }
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and not p.rstrip("/").endswith(".venv/bin")]
    if activated:
        path.insert(0, str(checkout / ".venv" / "bin"))
        env["VIRTUAL_ENV"] = str(checkout / ".venv")
    env["PATH"] = os.pathsep.join(path)
    return env


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("readme") / "varsr"
    dst.mkdir()
    _copy_tree(dst)
    _link_venv(dst)
    return dst


@pytest.fixture(scope="module")
def first_command(checkout):
    """The README's first block, verbatim, from the copy's root; its output is kept for the assertions."""
    block = read_blocks(checkout, "README.md")[0]
    assert block.kind == "first"
    t = time.monotonic()
    p = subprocess.run(
        ["bash", "-c", block.body],
        cwd=checkout,
        env=_user_env(checkout, activated=False),
        capture_output=True,
        text=True,
        timeout=FIRST_TIMEOUT_S,
    )
    log = checkout.parent / "first-command.log"
    log.write_text(p.stdout + "\n---- stderr ----\n" + p.stderr)
    print(f"README first command: rc {p.returncode} in {time.monotonic() - t:.0f} s (log {log})")
    return block, p


# ---- inputs for the placeholders ------------------------------------------------------------------------------------
def _make_inputs(checkout: Path) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from data_pipeline.sample_corpus import write_sample_corpus
    from model.build import build
    from model.config import VARSRConfig

    tmp = checkout.parent / "corpus"
    write_sample_corpus(tmp, with_bad_files=False)
    shutil.copytree(tmp / "photos", checkout / "photos")
    coffee = Image.open(tmp / "photos" / "coffee.jpg").convert("RGB")
    coffee.resize((40, 30), Image.BICUBIC).save(checkout / "photo.png")  # an LR; x4 is 160 x 120
    for d in ("HR", "LR"):
        (checkout / "test" / d).mkdir(parents=True)
    for name in ("astronaut.png", "rocket.jpg"):
        im = Image.open(tmp / "photos" / name).convert("RGB")
        w, h = im.size
        hr = im.crop((w // 2 - 32, h // 2 - 32, w // 2 + 32, h // 2 + 32))
        stem = Path(name).stem
        hr.save(checkout / "test" / "HR" / f"{stem}.png")
        hr.resize((16, 16), Image.BICUBIC).save(checkout / "test" / "LR" / f"{stem}.png")
    # the official files: the authors' trainer checkpoint layout (['trainer']['var_wo_ddp'], ['trainer']['vae_local'])
    torch.manual_seed(0)
    vqvae, varsr = build(VARSRConfig.preset("tiny"))
    var_sd = {k: v.clone() for k, v in varsr.state_dict().items()}
    lvl = varsr.level_ids("cpu")
    n = lvl.numel()
    var_sd["lvl_1L"] = lvl.view(1, n).clone()
    var_sd["attn_bias_for_masking"] = torch.where(lvl[None, :] <= lvl[:, None], 0.0, float("-inf")).view(1, 1, n, n)
    for i in range(len(varsr.blocks)):
        var_sd[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(varsr.C)
    (checkout / "checkpoints").mkdir()
    for name, key, sd in (("VARSR.pth", "var_wo_ddp", var_sd), ("VQVAE.pth", "vae_local", vqvae.state_dict())):
        torch.save({"epoch": 1, "iter": 1, "args": {"depth": 2}, "trainer": {key: sd}}, checkout / "checkpoints" / name)
    assert np.asarray(Image.open(checkout / "photo.png")).shape == (30, 40, 3)


# ---- checks after a block, by what it ran -------------------------------------------------------------------------
def _check_outputs(checkout: Path, body: str, out: str) -> None:
    if "varsr data build --input ./photos --output ./shards" in body:
        manifest = json.loads((checkout / "shards" / "manifest.json").read_text())
        assert manifest["counts"]["inputs"] == len(list((checkout / "photos").iterdir()))
    if "varsr train isr" in body and "--resume auto" in body:
        summary = json.loads((checkout / "runs" / "stage2_isr_tiny" / "summary.json").read_text())
        assert summary["status"] == "FINISHED" and summary["steps"] == 30, summary
    if "varsr upscale photo.png -o ./sr " in body:
        from PIL import Image

        assert Image.open(checkout / "sr" / "photo.png").size == (160, 120)
    if "curl" in body and "/invocations" in body:
        answer = json.loads(out)
        assert answer["predictions"][0]["width"] == 160 and answer["predictions"][0]["height"] == 120, out[:300]
    if "varsr import-checkpoint" in body:
        assert (checkout / "ckpt" / "varsr" / "model.safetensors").exists()


# ---- the tests ------------------------------------------------------------------------------------------------------
def test_the_readme_first_command_runs_on_a_fresh_copy_from_its_root(checkout, first_command):
    block, p = first_command
    assert block.body.strip() == "bash infra/scripts/setup.sh && .venv/bin/varsr demo --workdir varsr-demo"
    assert p.returncode == 0, (
        f"README first command failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    )
    text = p.stdout + p.stderr
    for i, step in enumerate(DEMO_STEPS, 1):
        assert re.search(rf"\[{i}/7\] {step}: ok in", text), f"demo step {i}/7 {step} did not finish"
    work = checkout / "varsr-demo"
    state = json.loads((work / "state.json").read_text())
    assert all(state[s]["done"] for s in DEMO_STEPS)
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{work / 'mlflow.db'}"
    mv = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias("varsr-demo", "champion")
    assert mv.status == "READY" and mv.run_id
    from PIL import Image

    comp = Image.open(work / "outputs" / "comparison.png")
    comp.verify()
    assert comp.size[0] >= 4 * comp.size[1] * 0.9  # four panels side by side: LR | SR | bicubic | HR
    assert not (work / "runs" / "stage2" / "<repo>").exists()  # issue 27's stray store
    # the small real set scored by `varsr eval --suite bundled` (issue 29): the model's row beside bicubic's, with the
    # offline metrics of docs/EVALUATION.md, and the same table on the terminal
    table = (work / "outputs" / "eval-bundled" / "table.md").read_text()
    rows = {ln.split("|")[1].strip(): ln for ln in table.splitlines() if ln.startswith("| ") and "---" not in ln}
    assert {"varsr-demo@champion", "bicubic"} <= set(rows)
    assert all(f"bundled/{m}" in table for m in ("psnr_y", "ssim_y", "niqe", "brisque"))
    assert rows["varsr-demo@champion"] in first_command[1].stdout


def test_every_other_block_of_the_docs_runs(checkout, first_command):
    assert first_command[1].returncode == 0, "the first command must pass before the others can run"
    _make_inputs(checkout)
    from infra.core.net import free_port

    env = _user_env(checkout, activated=True)
    ran, skipped = [], []
    for doc in DOCS:
        port = str(free_port())
        servers: list[subprocess.Popen] = []
        try:
            for block in read_blocks(checkout, doc):
                if block.kind == "first":
                    continue
                if block.kind == "skip":
                    skipped.append(f"{block.id}: {block.arg}")
                    continue
                if block.kind == "cluster":
                    _check_cluster_block(block)
                    ran.append(block.id + " (by tests/cluster)")
                    continue
                body = block.body.replace("5001", port)
                if block.kind == "background":
                    servers.append(
                        subprocess.Popen(
                            ["bash", "-c", body],
                            cwd=checkout,
                            env=env,
                            start_new_session=True,
                            stdout=subprocess.DEVNULL,
                            stderr=open(checkout.parent / f"server-{block.index}.log", "w"),
                        )
                    )
                    _wait_ready(block.arg.replace("5001", port), servers[-1], checkout / f"../server-{block.index}.log")
                    ran.append(block.id)
                    continue
                cmd = (
                    ["bash", "-euo", "pipefail", "-c", body]
                    if block.lang == "bash"
                    else [str(checkout / ".venv" / "bin" / "python"), "-c", body]
                )
                p = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
                assert p.returncode == 0, (
                    f"{block.id} failed (rc {p.returncode}):\n{body}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
                )
                _check_outputs(checkout, body, p.stdout)
                ran.append(block.id)
        finally:
            for s in servers:
                _stop(s)
    print("ran:", *ran, "skipped:", *skipped, sep="\n  ")
    assert len(skipped) <= MAX_SKIPPED, skipped
    assert len(ran) >= 8, ran


def _check_cluster_block(block) -> None:
    from tests.cluster import commands

    shown = [line for line in block.body.splitlines() if line.startswith("varsr ")]
    assert shown == list(commands.README_COMMANDS), f"{block.id} differs from what tests/cluster runs"


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {Path(log).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} not ready after {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-m", "readme", "-v"]))
