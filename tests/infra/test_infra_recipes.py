"""Every recipe and preset parses, loads into the project's typed config classes, and every `varsr` command and
config path it names exists (so cluster recipes cannot rot silently)."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
YAMLS = sorted(p for d in ("infra", "configs") for p in (ROOT / d).rglob("*.y*ml"))
JSONS = sorted((ROOT / "configs").rglob("*.json"))


def _varsr_parser():
    from infra.cli import build_parser

    parser = build_parser()
    return parser


def _varsr_commands(text: str) -> list[list[str]]:
    """`varsr ...` command lines in a recipe (entrypoints, setup commands and comments), line continuations joined."""
    text = re.sub(r"\\\n\s*#?\s*", " ", text)
    cmds = []
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip().lstrip("-").strip()
        m = re.search(r"(?:^|[\s/])varsr\s+(.*)$", line)
        if m and not line.startswith(("name:", "cluster_name", "ray.io/cluster")):
            tail = m.group(1).split("#")[0].strip().rstrip("\\").strip()
            if tail and re.match(r"[a-z]", tail):
                cmds.append(shlex.split(tail))
    return cmds


def test_there_are_recipes():
    names = {p.relative_to(ROOT).as_posix() for p in YAMLS}
    for must in ("infra/ray/cluster.yaml", "infra/kuberay/raycluster.yaml", "infra/kuberay/rayjob-data.yaml",
                 "infra/kuberay/rayjob-train.yaml", "infra/mlflow/docker-compose.yaml"):
        assert must in names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_yaml_parses(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(d is not None for d in docs), f"{path} is empty"


@pytest.mark.parametrize("path", JSONS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_json_parses(path):
    assert isinstance(json.loads(path.read_text()), dict)


def test_every_varsr_command_in_recipes_parses_and_its_files_exist():
    parser = _varsr_parser()
    seen = 0
    for path in YAMLS:
        if not path.is_relative_to(ROOT / "infra"):
            continue
        text = path.read_text()
        # entrypoints folded with YAML '>-' are one logical line once loaded: use the loaded strings too
        strings = []

        def walk(o):
            if isinstance(o, dict):
                for v in o.values():
                    walk(v)
            elif isinstance(o, list):
                for v in o:
                    walk(v)
            elif isinstance(o, str):
                strings.append(o)

        for d in yaml.safe_load_all(text):
            walk(d)
        for cmd in _varsr_commands(text + "\n" + "\n".join(strings)):
            args = parser.parse_args(cmd)  # SystemExit (test failure) on an unknown command or flag
            assert getattr(args, "func", None), f"{path}: `varsr {' '.join(cmd)}` selects no command"
            seen += 1
            for tok in cmd:
                if tok.startswith("configs/") or tok.startswith("infra/"):
                    assert (ROOT / tok).exists(), f"{path}: `varsr {' '.join(cmd)}` names missing file {tok}"
    assert seen >= 4


def test_shell_paths_in_recipes_exist():
    for path in YAMLS:
        if not path.is_relative_to(ROOT / "infra"):
            continue
        for ref in re.findall(r"\b((?:infra|configs)/[\w./-]+\.(?:sh|ya?ml|json))", path.read_text()):
            assert (ROOT / ref).exists(), f"{path} references missing {ref}"


def test_no_credentials_in_recipes():
    pat = re.compile(r"(password|secret|token|access_key)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{6,}", re.I)
    for path in YAMLS + JSONS + sorted((ROOT / "infra").rglob("*.sh")):
        for line in path.read_text().splitlines():
            if "${" in line or "secretRef" in line or line.strip().startswith("#"):
                continue
            assert not pat.search(line), f"{path}: looks like a credential: {line.strip()}"


def test_services_bind_loopback_by_default():
    compose = yaml.safe_load((ROOT / "infra/mlflow/docker-compose.yaml").read_text())
    for name, svc in compose["services"].items():
        for p in svc.get("ports", []):
            assert str(p).startswith("127.0.0.1:"), f"{name} publishes {p} beyond loopback"
    assert "127.0.0.1" in (ROOT / "infra/mlflow/start_server.sh").read_text()


def test_data_configs_load_into_typed_config():
    from data_pipeline.config import load_build_config as load_config

    for p in sorted((ROOT / "configs/data").glob("*.yaml")) + [ROOT / "configs/demo/data.yaml"]:
        cfg = load_config(p)
        assert cfg.shard.crop_size > 0, p


def test_train_configs_load_into_typed_config():
    from model.config import VARSRConfig
    from training.config import TrainConfig, load_train_config
    from training.stage0_vqvae import VQVAETrainConfig
    from infra.core.config import load_config

    paths = sorted((ROOT / "configs/train").glob("*.yaml")) + sorted((ROOT / "configs/demo").glob("stage*.yaml"))
    assert paths
    for p in paths:
        cfg = load_train_config(p)
        assert isinstance(cfg, TrainConfig)
        VARSRConfig.preset(cfg.model_preset, **cfg.model.overrides)  # the model it names builds a valid config
    vq = load_config(VQVAETrainConfig, ROOT / "configs/demo/vqvae.yaml")
    assert vq.model.preset == "tiny"


def test_inference_config_loads():
    from inference.config import load_inference_config

    for p in sorted((ROOT / "configs/inference").glob("*.yaml")):
        load_inference_config(p)


def test_unknown_config_key_is_refused(tmp_path):
    from infra.core.config import ConfigError, load_config
    from training.config import TrainConfig

    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: isr\noptim: {lr: 1.0e-4, lrr: 2}\n")
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(TrainConfig, bad)
