"""One logging style for the platform's product code (README, "Layout"; docs/CONTRACTS.md, "Logging").

* Diagnostics: ``logging.getLogger(__name__)`` in every module. The ``varsr`` entry point (infra/cli.py) calls
  :func:`setup_logging` once: one handler on stderr with :class:`PlatformFormatter` (``HH:MM:SS LEVEL logger:
  message``), INFO by default, DEBUG with ``-v``.
* What a command tells its user — a run's start, its progress lines, its summary, a verdict — goes through
  :func:`say` (stderr: the narration of a running job) or :func:`summary` (stdout: a command's result, such as the
  demo's step lines and summary table). These lines are shown as written, whether or not the process set logging up
  (a torchrun or Ray Train worker, a test, a notebook calling ``train()``), and they are log records of the logger
  ``varsr.terminal``, so the redaction of infra/core/redact.py applies to them as to every record.
* Progress bars: tqdm (data_pipeline/progress.py), periodic log lines when stderr is not a terminal.
"""

from __future__ import annotations

import logging
import sys

TERMINAL_LOGGER = "varsr.terminal"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_DATEFMT = "%H:%M:%S"


class PlatformFormatter(logging.Formatter):
    """``HH:MM:SS LEVEL logger: message``: the one format of the platform's diagnostics."""

    def __init__(self) -> None:
        super().__init__(_FORMAT, datefmt=_DATEFMT)


def setup_logging(verbose: bool = False) -> None:
    """The entry point's logging: records of every logger at INFO (DEBUG when ``verbose``) to stderr, formatted by
    :class:`PlatformFormatter`. Called once by infra/cli.py; a second call changes only the level."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(getattr(h, "_varsr", False) for h in root.handlers):
        handler = logging.StreamHandler()  # sys.stderr at the time of the call
        handler.setFormatter(PlatformFormatter())
        handler._varsr = True  # type: ignore[attr-defined]  # marks the handler as this module's (idempotent setup)
        root.addHandler(handler)


class _TerminalHandler(logging.Handler):
    """Writes a record's message as is to the stream named by the record (looked up at write time, so a replaced
    ``sys.stdout`` / ``sys.stderr`` — pytest's capture, redact.install() — receives it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stdout if getattr(record, "to_stdout", False) else sys.stderr
            stream.write(record.getMessage() + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not stop a run (logging's own policy)
            self.handleError(record)


def _terminal() -> logging.Logger:
    log = logging.getLogger(TERMINAL_LOGGER)
    if not log.handlers:
        log.addHandler(_TerminalHandler())
        log.setLevel(logging.INFO)
        log.propagate = False  # shown once, as written: not again by the root handler's format
    return log


def say(message: str) -> None:
    """A line of a running job's narration for its user (stderr), e.g. ``[train] step 3/4 loss 5.12``."""
    _terminal().info(message, extra={"to_stdout": False})


def summary(message: str) -> None:
    """A command's result for its user (stdout), e.g. the demo's ``[3/7] vqvae: ok in 12.0 s`` lines or a verdict."""
    _terminal().info(message, extra={"to_stdout": True})
