"""Do the generate tests catch real faults? Applies each deliberate fault below to a scratch copy of the tree (one at a
time), runs ``tests/model/test_model_generate.py`` there and prints one JSON object: which fault failed which test.

The faults are the ones a wrong port of the released sampler makes (docs/MODEL.md §4.2 and §3.4): the level
embedding of the wrong scale, the start position embedding dropped, the C2I schedule used for ISR guidance, the
negative branch built with label 0, and a refiner that ignores the negative branch. Every fault must be caught.

    .venv/bin/python infra/scripts/fault_check.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGET = "model/varsr.py"
FAULTS = {
    "level embedding of the wrong scale": ("self.lvl_embed.weight[si + 1]", "self.lvl_embed.weight[si]"),
    "pos_start dropped": ("x = sos + self.pos_start + self.lvl_embed.weight[0]", "x = sos + self.lvl_embed.weight[0]"),
    "ISR guidance on the quadratic schedule": (
        "        return cfg * si / (K - 1)\n",
        "        return cfg * (si / (K - 1)) ** 2\n",
    ),
    "negative branch with label 0": (
        'neg = torch.full_like(labels, self.num_classes - 1 if self.cfg.variant == "isr" else self.num_classes)',
        "neg = torch.zeros_like(labels)",
    ),
    "unguided refiner": ("self.diffloss.sample(z[b], z[B + b], cfg,", "self.diffloss.sample(z[b], None, cfg,"),
}
SKIP = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", "varsr-demo", "outputs", "mlruns")


def run_tests(tree: Path) -> tuple[int, list[str]]:
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/model/test_model_generate.py"],
        cwd=tree,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "HOME": str(tree)},
    )
    return r.returncode, [
        ln.split(" ", 1)[1].split(" - ")[0] for ln in r.stdout.splitlines() if ln.startswith("FAILED")
    ]


def main() -> int:
    results = {}
    with tempfile.TemporaryDirectory(prefix="varsr-faults-") as d:
        tree = Path(d) / "tree"
        shutil.copytree(ROOT, tree, ignore=SKIP)
        clean = (tree / TARGET).read_text()
        rc, failed = run_tests(tree)
        results["(no fault)"] = {"returncode": rc, "failed": failed}
        for name, (old, new) in FAULTS.items():
            if clean.count(old) != 1:
                raise SystemExit(f"fault {name!r}: the code it changes is not in {TARGET} once (update this script)")
            (tree / TARGET).write_text(clean.replace(old, new))
            rc, failed = run_tests(tree)
            results[name] = {"caught": rc != 0, "failed": failed}
        (tree / TARGET).write_text(clean)
    ok = results["(no fault)"]["returncode"] == 0 and all(v["caught"] for k, v in results.items() if k != "(no fault)")
    print(json.dumps({"all_caught": ok, "tests": "tests/model/test_model_generate.py", "faults": results}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
