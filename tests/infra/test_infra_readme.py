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
                    part = part[len(".venv/bin/"):]
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


def test_readme_cluster_commands_are_the_ones_the_cluster_test_runs():
    """The README's "Run on a cluster" commands are, character for character, those tests/cluster runs."""
    from tests.cluster import commands

    section = README.split("## Run on a cluster", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    shown = [line for line in block.splitlines() if line.startswith("varsr ")]
    assert shown == list(commands.README_COMMANDS)
