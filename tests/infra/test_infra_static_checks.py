"""The static checks CI runs before the suite (infra/scripts/check.sh, issue 31): on a copy of the project's
configuration with a tiny tree in place of the packages, a clean tree passes and each kind of finding fails the
script: a lint finding (an unused import), code that `ruff format` would rewrite, and a type error in a product
package. The real tree passing the same script is what .ci/run checks first."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATHS = ("data_pipeline", "training", "model", "inference", "infra", "tests", "benchmarks")
CLEAN = '"""A module."""\n\n\ndef double(x: int) -> int:\n    return 2 * x\n'


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "infra" / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    shutil.copy(ROOT / "infra/scripts/check.sh", root / "infra/scripts/check.sh")
    for p in PATHS:
        (root / p).mkdir(exist_ok=True)
        (root / p / "__init__.py").write_text("")
        (root / p / "ok.py").write_text(CLEAN)
    return root


def _check(root: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(root)}
    return subprocess.run(["bash", "infra/scripts/check.sh"], cwd=root, env=env, capture_output=True, text=True)


def test_a_clean_tree_passes(tmp_path):
    r = _check(_tree(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "== ruff check" in r.stdout and "== ruff format --check" in r.stdout and "== mypy" in r.stdout


@pytest.mark.parametrize(
    ("path", "text", "finding"),
    [
        ("tests/bad.py", "import os\n", "F401"),  # tests are linted too
        ("benchmarks/bad.py", "x = {'a':1}\n", "1 file would be reformatted"),  # and formatted
        ("model/bad.py", 'def f() -> int:\n    return "x"\n', "Incompatible return value type"),
    ],
)
def test_each_kind_of_finding_fails_the_check(tmp_path, path, text, finding):
    root = _tree(tmp_path)
    (root / path).write_text(text)
    r = _check(root)
    assert r.returncode != 0
    assert finding in r.stdout + r.stderr
