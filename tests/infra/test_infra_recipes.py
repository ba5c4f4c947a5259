"""Every recipe and preset parses and loads into the project's typed config classes, and every `varsr` command and
config path a recipe names parses against the real CLI and exists. These are static checks: the recipes are run for
real by other tests (the MLflow server script in test_infra_mlflow_server.py, the cluster commands in tests/cluster,
the launcher YAML through Ray's validator in test_infra_ray_launcher.py); a KubeRay apply needs a Kubernetes cluster,
which no test here has."""

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


# `varsr` followed by a subcommand, up to the end of the shell word run (a quote, `;`, `&&`, `|`, `#` or the line end):
# finds it after `cd DIR &&`, inside `ray job submit -- "..."`, at the start of a line or after a path such as
# `.venv/bin/varsr`; `name: varsr` (a YAML value at the end of a line) is not a command
_VARSR = re.compile(r"(?:^|[\s/\"'])varsr[ \t]+([a-z][^\"'\n;&|#`]*)")


def _varsr_commands(text: str) -> list[list[str]]:
    """`varsr ...` command lines in a recipe or doc (entrypoints, commands, comments), line continuations joined."""
    text = re.sub(r"\\\n\s*#?\s*", " ", text)
    return [shlex.split(m.group(1).strip()) for m in _VARSR.finditer(text)]


def _recipe_texts() -> list[tuple[Path, str]]:
    """Every recipe under infra/: raw text plus its loaded YAML strings, so folded entrypoints count as one line."""
    out = []
    for path in YAMLS:
        if not path.is_relative_to(ROOT / "infra"):
            continue
        strings = []

        def walk(o, strings=strings):
            if isinstance(o, dict):
                for v in o.values():
                    walk(v)
            elif isinstance(o, list):
                for v in o:
                    walk(v)
            elif isinstance(o, str):
                strings.append(o)

        text = path.read_text()
        for d in yaml.safe_load_all(text):
            walk(d)
        out.append((path, text + "\n" + "\n".join(strings)))
    return out


def test_there_are_recipes():
    names = {p.relative_to(ROOT).as_posix() for p in YAMLS}
    for must in (
        "infra/ray/cluster.yaml",
        "infra/kuberay/raycluster.yaml",
        "infra/kuberay/rayjob-data.yaml",
        "infra/kuberay/rayjob-train.yaml",
        "infra/kuberay/storage.yaml",
        "infra/kuberay/secrets.example.yaml",
        "infra/mlflow/docker-compose.yaml",
    ):
        assert must in names
    for must in (
        "infra/docker/Dockerfile",
        "infra/docker/image.env",
        "infra/mlflow/start_server.sh",
        "infra/scripts/render_manifests.py",
        "docs/CLUSTER.md",
    ):
        assert (ROOT / must).is_file(), must


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
    for path, text in _recipe_texts():
        for cmd in _varsr_commands(text):
            args = parser.parse_args(cmd)  # SystemExit (test failure) on an unknown command or flag
            assert getattr(args, "func", None), f"{path}: `varsr {' '.join(cmd)}` selects no command"
            seen += 1
            for tok in cmd:
                if tok.startswith("configs/") or tok.startswith("infra/"):
                    assert (ROOT / tok).exists(), f"{path}: `varsr {' '.join(cmd)}` names missing file {tok}"
    assert seen >= 5


def test_cluster_guide_commands_parse_and_name_existing_files():
    """docs/CLUSTER.md (with its "The commands" block, once in the README): every `varsr` command selects a real
    subcommand with
    its required arguments, and every repository path it names exists. Options are written in the `--set KEY=VALUE`
    form every command is moving to; until a command takes `--set`, that is the only option allowed to be unknown."""
    parser = _varsr_parser()
    text = (ROOT / "docs/CLUSTER.md").read_text()
    cmds = _varsr_commands(text)
    assert len(cmds) >= 3
    for cmd in cmds:
        cmd = [t.replace("$PORT", "5001") for t in cmd]  # shell variables that must parse as numbers get examples
        args, unknown = parser.parse_known_args(cmd)
        assert getattr(args, "func", None), f"`varsr {' '.join(cmd)}` selects no command"
        assert all(u == "--set" or "=" in u for u in unknown), f"`varsr {' '.join(cmd)}`: unknown {unknown}"
    for ref in set(re.findall(r"\b((?:infra|configs|tests|docs)/[\w./-]*\w)", text)):
        if not ref.startswith(("build/",)):
            assert (ROOT / ref).exists(), f"docs/CLUSTER.md names missing {ref}"


def test_command_finder_sees_commands_in_every_form():
    text = (
        "entrypoint: cd /opt/varsr && varsr data build --input a --output b\n"
        'ray job submit -- "cd /opt/varsr && varsr train isr --config x.yaml --ray-address auto"\n'
        "  name: varsr\n.venv/bin/varsr data inspect out  # comment\n"
        "varsr train isr --config c.yaml \\\n   --resume auto\n"
    )
    assert _varsr_commands(text) == [
        ["data", "build", "--input", "a", "--output", "b"],
        ["train", "isr", "--config", "x.yaml", "--ray-address", "auto"],
        ["data", "inspect", "out"],
        ["train", "isr", "--config", "c.yaml", "--resume", "auto"],
    ]


def test_shell_paths_in_recipes_exist():
    for path in YAMLS:
        if not path.is_relative_to(ROOT / "infra"):
            continue
        for ref in re.findall(r"\b((?:infra|configs)/[\w./-]+\.(?:sh|ya?ml|json))", path.read_text()):
            assert (ROOT / ref).exists(), f"{path} references missing {ref}"


def test_no_credentials_in_recipes():
    pat = re.compile(r"(password|secret|token|access_key)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{6,}", re.I)
    extra = [ROOT / "infra/docker/Dockerfile", ROOT / "infra/docker/image.env", ROOT / "docs/CLUSTER.md"]
    for path in YAMLS + JSONS + sorted((ROOT / "infra").rglob("*.sh")) + extra:
        for line in path.read_text().splitlines():
            if "${" in line or "secretRef" in line or line.strip().startswith("#"):
                continue
            assert not pat.search(line), f"{path}: looks like a credential: {line.strip()}"


def test_services_bind_loopback_by_default():
    compose = yaml.safe_load((ROOT / "infra/mlflow/docker-compose.yaml").read_text())
    for name, svc in compose["services"].items():
        for p in svc.get("ports", []):
            assert str(p).startswith("127.0.0.1:"), f"{name} publishes {p} beyond loopback"
    assert 'env.get("MLFLOW_HOST", "127.0.0.1")' in (ROOT / "infra/mlflow/serve.py").read_text()


def test_data_configs_load_into_typed_config():
    from data_pipeline.config import load_build_config as load_config

    for p in sorted((ROOT / "configs/data").glob("*.yaml")) + [ROOT / "configs/demo/data.yaml"]:
        cfg = load_config(p)
        assert cfg.shard.crop_size > 0, p


def test_train_configs_load_into_typed_config():
    from infra.core.config import load_config
    from model.config import VARSRConfig
    from training.config import TrainConfig, load_train_config
    from training.stage0_vqvae import VQVAETrainConfig

    paths = sorted((ROOT / "configs/train").glob("*.yaml")) + sorted((ROOT / "configs/demo").glob("stage*.yaml"))
    assert paths
    for p in paths:
        cfg = load_train_config(p)
        assert isinstance(cfg, TrainConfig)
        VARSRConfig.preset(cfg.model_preset, **cfg.model.overrides)  # the model it names builds a valid config
    vq = load_config(VQVAETrainConfig, ROOT / "configs/demo/vqvae.yaml")
    stage2 = load_train_config(ROOT / "configs/demo/stage2.yaml")
    assert vq.model.preset == stage2.model.preset  # the demo's tokenizer fits the demo's model
    VARSRConfig.preset(vq.model.preset, **vq.model.overrides)


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
