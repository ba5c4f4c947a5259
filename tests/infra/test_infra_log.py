"""The platform's one logging style (infra/core/log.py): user-facing lines reach the terminal as written, on the
stream their kind names, whether or not the entry point set logging up; diagnostics get the entry point's format; the
redaction of infra/core/redact.py applies to both."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_say_goes_to_stderr_and_summary_to_stdout_as_written(capsys):
    from infra.core.log import say, summary

    say("[train] step 3/4 loss 5.1234")
    summary("[3/7] vqvae: ok in 12.0 s")
    out, err = capsys.readouterr()
    assert err == "[train] step 3/4 loss 5.1234\n"
    assert out == "[3/7] vqvae: ok in 12.0 s\n"


def test_a_process_shows_both_kinds_in_their_format_and_redacts_them():
    """In a fresh interpreter, as the `varsr` entry point sets it up: a diagnostic carries time, level and logger;
    a user-facing line does not, appears once (not again through the root handler), and a password in either is
    masked."""
    code = (
        "import logging\n"
        "from infra.core import redact\n"
        "from infra.core.log import say, setup_logging, summary\n"
        "redact.install()\n"
        "setup_logging()\n"
        "setup_logging()\n"  # idempotent: still one handler
        "logging.getLogger('training.trainer').info('diag http://u:pw123@host:5000')\n"
        "logging.getLogger('training.trainer').debug('hidden at INFO')\n"
        "say('[train] MLflow run at http://u:pw123@host:5000')\n"
        "summary('[1/7] corpus: ok in 1.0 s')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    err = p.stderr.splitlines()
    diag = [ln for ln in err if "diag" in ln]
    assert len(diag) == 1 and " INFO training.trainer: diag http://***@host:5000" in diag[0]
    assert not any("hidden" in ln for ln in err)
    assert err.count("[train] MLflow run at http://***@host:5000") == 1
    assert p.stdout.splitlines() == ["[1/7] corpus: ok in 1.0 s"]
    assert "pw123" not in p.stdout + p.stderr


def test_lines_are_shown_without_any_logging_setup():
    """A torchrun or Ray Train worker never runs the entry point: its `say` lines must still appear."""
    code = "from infra.core.log import say\nsay('[train] resumed from x at step 2')\n"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stderr == "[train] resumed from x at step 2\n"
