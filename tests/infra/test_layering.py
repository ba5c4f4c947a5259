"""Layers only point down (README, "Layout"), checked on the import graph read from the source.

  infra.core      the bottom (errors, config, tracking, storage, net, metrics, imports): imports no component
  model           imports only infra.core
  data_pipeline   imports only infra.core
  inference       imports model and infra.core
  training        imports model, the shard reader (data_pipeline.shards) and infra.core
  infra.cli / infra.demo   the only modules that compose components; nothing else imports them
and there is no import cycle anywhere. The rule checker is itself tested on a small tree that breaks each rule.
"""

from __future__ import annotations

from pathlib import Path

from infra.core.imports import cycles, import_graph

ROOT = Path(__file__).resolve().parents[2]
ROOF = ("infra.cli", "infra.demo")
ALLOWED = {  # component -> what it may import besides itself
    "model": ("infra.core",),
    "data_pipeline": ("infra.core",),
    "inference": ("model", "infra.core"),
    "training": ("model", "data_pipeline.shards", "infra.core"),
    "infra.core": (),
}


def _owner(module: str) -> str | None:
    """The layer a module belongs to (longest matching key of ALLOWED, or a roof module)."""
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(graph: dict[str, set[str]]) -> list[str]:
    problems = [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    for m, targets in sorted(graph.items()):
        layer = _owner(m)
        for t in sorted(targets):
            if any(_under(t, r) for r in ROOF) and not any(_under(m, r) for r in ROOF):
                problems.append(f"{m} imports the composing module {t}")
            if layer is None or _under(t, layer):
                continue
            if not any(_under(t, ok) for ok in ALLOWED[layer]):
                problems.append(
                    f"{m} ({layer}) imports {t}: {layer} may import only "
                    f"{', '.join(ALLOWED[layer]) or 'nothing of ours'}"
                )
    return problems


def test_the_project_imports_only_point_down():
    graph = import_graph(ROOT)
    assert len(graph) > 60 and "infra.cli" in graph and "data_pipeline.shards.reader" in graph
    assert violations(graph) == []


def test_only_the_cli_and_the_demo_compose_components():
    graph = import_graph(ROOT)
    components = ("model", "data_pipeline", "training", "inference")
    composers = {
        m
        for m, ts in graph.items()
        if len({c for c in components for t in ts if _under(t, c)} - {m.split(".")[0]}) >= 3
    }
    assert composers and composers <= {"infra.cli"} | {m for m in graph if _under(m, "infra.demo")}, composers
    # a composing module is the top of the graph: only the `varsr` entry point may import one (a recipe that grew
    # a third component once became one while the demo's CLI glue still imported it)
    importers = {c: sorted(m for m, ts in graph.items() if c in ts and m != "infra.cli") for c in composers}
    assert all(not v for v in importers.values()), importers


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for d in ("model", "data_pipeline", "training", "inference", "infra", "infra/core"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
        (tmp_path / d / "__init__.py").touch()
    return tmp_path


def test_the_checker_catches_each_kind_of_broken_rule(tmp_path):
    root = _tree(
        tmp_path,
        {
            "infra/core/errors.py": "import training.trainer\n",  # bottom reaching up
            "model/net.py": "from inference import pipeline\n",  # model importing a component
            "inference/pipeline.py": "from . import registry\n",  # cycle inside inference
            "inference/registry.py": "def f():\n    from inference.pipeline import x\n",
            "training/trainer.py": "from infra.cli import main\nfrom data_pipeline import jobs\n",
            "data_pipeline/jobs.py": "import torch\n",
            "infra/cli.py": "import training.trainer\n",
        },
    )
    found = "\n".join(violations(import_graph(root)))
    assert "infra.core.errors (infra.core) imports training.trainer" in found
    assert "model.net (model) imports inference.pipeline" in found
    assert "import cycle: inference.pipeline -> inference.registry" in found
    assert "training.trainer imports the composing module infra.cli" in found
    assert "training.trainer (training) imports data_pipeline.jobs" in found  # only the shard reader is allowed
    assert not any(line.startswith("infra.cli ") for line in found.splitlines())  # the roof may import anything
