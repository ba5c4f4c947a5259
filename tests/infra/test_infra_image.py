"""The platform image: one reference (infra/docker/image.env) used by every manifest through the render script,
and a Dockerfile whose pins are pyproject's. There is no Docker engine here, so the image is not built; what can be
checked without one is: the pins, the requirement list the Dockerfile derives from pyproject.toml, the build context
filter, and the rendered manifests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "infra/docker/Dockerfile"
RENDER = ROOT / "infra/scripts/render_manifests.py"
PLACEHOLDER = "${VARSR_IMAGE}"
THIRD_PARTY = {"postgres:16"}  # docker compose's database: not our image


def _pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {}
    for req in project["dependencies"] + project["optional-dependencies"]["cluster"]:
        name, _, version = req.partition("==")
        out[re.sub(r"\[.*\]", "", name).lower()] = version
    return out


def _image_env() -> str:
    lines = [
        line for line in (ROOT / "infra/docker/image.env").read_text().splitlines() if line.startswith("VARSR_IMAGE=")
    ]
    assert len(lines) == 1
    return lines[0].split("=", 1)[1]


def _image_fields(doc, path=""):
    """(path, value) of every `image`-like field (image, head_image, worker_image) in a loaded YAML document."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k in ("image", "head_image", "worker_image") and isinstance(v, str):
                yield f"{path}.{k}", v
            else:
                yield from _image_fields(v, f"{path}.{k}")
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _image_fields(v, f"{path}[{i}]")


def test_dockerfile_pins_equal_pyproject():
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    pins = _pins()
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["RAY_VERSION"] == pins["ray"]
    # CUDA major of the base = the CUDA build of the pinned torch wheel on PyPI (13.0 for torch 2.13.0)
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-(base|runtime|cudnn-runtime)-ubuntu24\.04", args["CUDA_BASE"])
    assert 'pip install "torch==${TORCH_VERSION}"' in text
    assert "pip install --no-deps ." in text and "pip check" in text


def test_dockerfile_installs_exactly_pyprojects_requirements(tmp_path):
    """Run the Dockerfile's own requirement-extraction command on pyproject.toml: it must list every dependency
    and the cluster extra, pinned (so the image cannot drift from what the tests ran)."""
    text = DOCKERFILE.read_text().replace("\\\n", "")
    m = re.search(r'python -c "(import tomllib;.*?)" > /tmp/requirements\.txt', text)
    assert m, "requirement extraction step not found"
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    out = subprocess.run(
        [sys.executable, "-c", m.group(1)], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.split()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert out == project["dependencies"] + project["optional-dependencies"]["cluster"]
    assert all("==" in r for r in out)
    assert any(r.startswith("s3fs==") for r in out) and any(r.startswith("psycopg[binary]==") for r in out)


def test_build_context_excludes_local_state():
    ignore = (ROOT / "infra/docker/Dockerfile.dockerignore").read_text().split()
    for must in (".git", ".venv", "runs", "mlruns", "mlartifacts", "mlflow.db", "build"):
        assert must in ignore, must


def test_image_reference_is_pinned_and_in_one_place():
    image = _image_env()
    assert re.fullmatch(r"[a-z0-9.-]+(/[a-z0-9._-]+)+:[A-Za-z0-9_][A-Za-z0-9_.-]*", image), image
    assert not image.endswith(":latest")
    manifests = sorted((ROOT / "infra").rglob("*.yaml"))
    seen = 0
    for path in manifests:
        for doc in yaml.safe_load_all(path.read_text()):
            for where, value in _image_fields(doc):
                if value in THIRD_PARTY:
                    continue
                seen += 1
                assert value == PLACEHOLDER or value.startswith(PLACEHOLDER[:-1] + ":?"), (
                    f"{path.relative_to(ROOT)}{where} names the image itself ({value}); use {PLACEHOLDER}"
                )
    assert seen >= 6  # RayCluster head + 2 worker groups, 2 submitters, launcher docker, compose mlflow
    # and no file anywhere else spells out the reference except image.env
    for path in [p for p in (ROOT / "infra").rglob("*") if p.is_file() and p.suffix in (".yaml", ".sh", ".py")]:
        assert image not in path.read_text(), f"{path.relative_to(ROOT)} repeats the image reference"


def test_render_fills_in_the_image_everywhere(tmp_path):
    res = subprocess.run(
        [sys.executable, str(RENDER), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "VARSR_IMAGE"},
    )
    written = [Path(p) for p in res.stdout.split()]
    names = {p.relative_to(tmp_path).as_posix() for p in written}
    assert {
        "kuberay/raycluster.yaml",
        "kuberay/rayjob-data.yaml",
        "kuberay/rayjob-train.yaml",
        "kuberay/storage.yaml",
        "ray/cluster.yaml",
        "k8s/serve.yaml",
    } == names  # templates are not rendered
    image = _image_env()
    count = 0
    for p in written:
        text = p.read_text()
        assert PLACEHOLDER not in text
        for doc in yaml.safe_load_all(text):
            for _, value in _image_fields(doc):
                assert value == image
                count += 1
    assert count >= 5
    # shell variables for the nodes are left alone
    assert "$RAY_HEAD_IP" in (tmp_path / "ray/cluster.yaml").read_text()


def test_render_takes_the_environment_override_and_refuses_unpinned(tmp_path):
    env = {**os.environ, "VARSR_IMAGE": "registry.example.com/team/varsr:2026.11.30"}
    subprocess.run([sys.executable, str(RENDER), "--out", str(tmp_path)], env=env, check=True, capture_output=True)
    assert "image: registry.example.com/team/varsr:2026.11.30" in (tmp_path / "kuberay/raycluster.yaml").read_text()
    for bad in ("registry.example.com/team/varsr", "Registry/Bad Name:1"):
        res = subprocess.run(
            [sys.executable, str(RENDER), "--out", str(tmp_path / "x"), "--image", bad], capture_output=True, text=True
        )
        assert res.returncode != 0 and "not a pinned image reference" in res.stderr


def test_compose_takes_the_image_from_the_environment():
    compose = yaml.safe_load((ROOT / "infra/mlflow/docker-compose.yaml").read_text())
    assert compose["services"]["mlflow"]["image"].startswith("${VARSR_IMAGE:?")
