"""The README stays true: it opens with the two commands, the test command is what CI runs, and every `varsr`
command it shows parses against the real CLI with existing config files."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def _commands() -> list[list[str]]:
    out = []
    for block in _blocks():
        block = re.sub(r"\\\n\s*", " ", block)
        for line in block.splitlines():
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith(".venv/bin/varsr "):
                    part = part[len(".venv/bin/") :]
                if part.startswith("varsr "):  # shell variables get example values (the cluster section's)
                    part = part.replace("$PORT", "5001").replace("$RAY", "127.0.0.1:6379")
                    out.append(shlex.split(part)[1:])
    return out


def test_readme_opens_with_setup_demo_and_test_commands():
    blocks = _blocks()
    assert len(blocks) >= 2
    assert blocks[0].strip() == "bash infra/scripts/setup.sh && .venv/bin/varsr demo --workdir varsr-demo"
    assert blocks[1].strip() == "bash infra/scripts/test.sh"
    # the README's test command is exactly what CI runs
    ci = (ROOT / ".ci/run").read_text()
    assert "bash infra/scripts/test.sh" in ci
    test_sh = (ROOT / "infra/scripts/test.sh").read_text()
    assert "infra/scripts/setup.sh" in test_sh and "pytest" in test_sh
    assert "rc -eq 5" in test_sh  # 'no tests collected' is a failure


def test_every_readme_varsr_command_parses():
    from infra.cli import build_parser

    parser = build_parser()
    cmds = _commands()
    assert len(cmds) >= 15
    for cmd in cmds:
        args = parser.parse_args(cmd)  # SystemExit on an unknown subcommand or flag fails the test
        assert getattr(args, "func", None), cmd
        for tok in cmd:
            for path in re.findall(r"(?:^|=)((?:configs|infra)/[\w./-]+)", tok):
                assert (ROOT / path).exists(), f"README command `varsr {' '.join(cmd)}` names missing {path}"


def test_readme_has_no_unfilled_placeholders():
    for marker in ("BENCHMARK_TABLE", "STATUS_SECTION", "TODO", "TBD"):
        assert marker not in README, marker


def test_cluster_commands_are_the_ones_the_cluster_test_runs():
    """docs/CLUSTER.md's "The commands" are, character for character, those tests/cluster runs."""
    from tests.cluster import commands

    doc = (ROOT / "docs" / "CLUSTER.md").read_text()
    section = doc.split("## The commands", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    shown = [line for line in block.splitlines() if line.startswith("varsr ")]
    assert shown == list(commands.README_COMMANDS)


def test_every_command_block_of_the_docs_says_how_the_tests_run_it():
    """Every note above a block parses (a typo would silently skip it), the README's first block is the set-up +
    demo run verbatim by tests/readme, its second the test command, and the skip list stays short."""
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "readme"))
    from doc_blocks import read_blocks

    blocks = read_blocks(ROOT, "README.md")
    assert [b.kind for b in blocks[:2]] == ["first", "skip"] and "infra/scripts/test.sh" in blocks[1].body
    assert all(b.kind != "first" for b in blocks[1:])
    docs = ("README.md", "inference/README.md", "docs/CLUSTER.md")
    every = [b for d in docs for b in read_blocks(ROOT, d)]
    skipped = [b for b in every if b.kind == "skip"]
    assert len(every) - len(skipped) >= 8 and len(skipped) <= 8, [b.id for b in skipped]
    assert [b.kind for b in every].count("cluster") == 1
