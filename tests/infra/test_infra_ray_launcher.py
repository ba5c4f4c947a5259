"""The Ray cluster-launcher recipe (infra/ray/cluster.yaml) passes Ray's own validator (prepare_config then
validate_config, with the schema that ships inside the ray package), rendered with the real image, and keeps the
properties the issue asked for: a current host image, commands that find `ray`, nothing pip-installed on the nodes,
boto3 on the head, and only the configs shipped with local state filtered out."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "infra/ray/cluster.yaml"


def _rendered(tmp_path) -> dict:
    """cluster.yaml as `ray up` gets it: rendered by infra/scripts/render_manifests.py."""
    res = subprocess.run(
        [sys.executable, str(ROOT / "infra/scripts/render_manifests.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(tmp_path / "ray/cluster.yaml") in res.stdout
    return yaml.safe_load((tmp_path / "ray/cluster.yaml").read_text())


def _prepared(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_ray_validator_accepts_the_rendered_recipe(tmp_path):
    cfg = _rendered(tmp_path)
    prepared = _prepared(cfg)
    assert prepared["docker"]["image"] == cfg["docker"]["image"] and "${" not in cfg["docker"]["image"]
    # the defaults Ray merges in must not bring back its AWS setup (pip-installing a Ray wheel and boto3)
    for key in ("initialization_commands", "setup_commands", "worker_setup_commands"):
        assert prepared[key] == [], key
    assert not any("pip install" in c for c in prepared["head_setup_commands"])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.update(setup_comands=[]),  # misspelt top-level key
        lambda c: c["docker"].update(imag="x"),  # misspelt docker key
        lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"),  # node type without node_config
        lambda c: c["available_node_types"]["cpu_worker"].update(max_workers="32"),  # wrong type
    ],
)
def test_ray_validator_rejects_broken_variants(tmp_path, mutate):
    """Ray's validator is really applied: each single mistake is refused."""
    bad = _rendered(tmp_path)
    mutate(bad)
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
        _prepared(bad)


def test_host_image_is_current_and_explicit():
    cfg = yaml.safe_load(RECIPE.read_text())
    text = RECIPE.read_text()
    assert "latest_dlami" not in text  # resolves to Ubuntu 18.04 with a Python older than requires-python
    for name, node in cfg["available_node_types"].items():
        image = node["node_config"]["ImageId"]
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}", image) or re.fullmatch(
            r"resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24\.04/latest/ami-id",
            image,
        ), f"{name}: {image}"
    assert "aws ssm get-parameter" in text  # the documented way to pin / update the AMI


def test_commands_find_ray_and_the_head_checks_boto3():
    cfg = yaml.safe_load(RECIPE.read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in cfg[key]:
            for m in re.finditer(r"(\S*)\bray (start|stop)\b", cmd):
                assert m.group(1) == "/opt/venv/bin/", f"{key}: `{cmd}` relies on PATH for ray"
    dockerfile = (ROOT / "infra/docker/Dockerfile").read_text()
    assert "VIRTUAL_ENV=/opt/venv" in dockerfile and "python3 -m venv /opt/venv" in dockerfile
    assert any("import boto3" in c for c in cfg["head_setup_commands"])  # the AWS autoscaler runs on the head
    assert "--dashboard-host=0.0.0.0" in " ".join(cfg["head_start_ray_commands"])


def test_only_configs_are_shipped_and_local_state_is_filtered():
    cfg = yaml.safe_load(RECIPE.read_text())
    for local in cfg["file_mounts"].values():
        assert local not in (".", "./", str(ROOT)), "file_mounts must not ship the whole work tree"
        assert (ROOT / local).is_dir(), local
    for must in (".venv", "runs", "mlruns", "mlartifacts", ".git"):
        assert must in cfg["rsync_exclude"], must
    assert ".gitignore" in cfg["rsync_filter"]


def test_max_workers_holds_every_node_type_at_its_max():
    cfg = yaml.safe_load(RECIPE.read_text())
    total = sum(n.get("max_workers", 0) for k, n in cfg["available_node_types"].items() if k != cfg["head_node_type"])
    assert cfg["max_workers"] >= total
    gpus_per_instance = {
        "p5.48xlarge": 8,
        "p5e.48xlarge": 8,
        "p5en.48xlarge": 8,
        "p4d.24xlarge": 8,
        "p4de.24xlarge": 8,
        "p6-b200.48xlarge": 8,
    }
    gpu = cfg["available_node_types"]["gpu_worker"]
    capacity = gpu["max_workers"] * gpus_per_instance[gpu["node_config"]["InstanceType"]]
    for path in sorted((ROOT / "configs/train").glob("*cluster*.yaml")):
        r = yaml.safe_load(path.read_text())["ray"]
        assert capacity >= r["num_workers"] * r["gpus_per_worker"], path.name
