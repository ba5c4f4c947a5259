"""The platform's one redaction function: what a URI, a connection string or a log line may show of a secret.

Every URI or config that the platform prints, writes (``summary.json``, ``config.yaml``, ``train_config.yaml``, run
artifacts, tags, params) or logs goes through :func:`redact` (or :func:`redact_config` for a whole config), so a
tracking URI such as ``http://user:password@host`` is *used* as given but only ever *shown* as
``http://***@host``. What counts as a secret (docs/SECURITY.md, "Secrets"):

* the user-info of any ``scheme://user:password@host`` (user and password together: a token is often passed as the
  user name, e.g. ``https://TOKEN@host``); a raw password holding ``@``, ``:``, ``/`` or ``?`` is hidden whole, up to
  the last ``@`` of the authority;
* the value of a query parameter whose name is a secret's (:func:`secret_key`): libpq's ``?password=`` and
  ``sslpassword``, ``token``, ``access_token``, ``secret``, ``key``, ``sig``, ``signature``, presigned-URL signatures
  and credentials (``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Amz-Security-Token``, ``X-Goog-Signature``, …);
* the value of a ``key=value`` pair with such a name in free text, such as a libpq keyword/value DSN
  (``host=db user=mlflow password='s3 cret'``) or an environment assignment (``MLFLOW_TRACKING_PASSWORD=...``).

The rest of the text is kept exactly, so a redacted line still says which host, database or bucket was meant.
Redaction is idempotent and never fails. It is pattern based: a secret written where no pattern can see it (a bare
token in a path, a password passed as a positional word) is not found, which is why secrets belong in the
environment or a mounted file, never in a config value (docs/SECURITY.md).

Standard library only, importing nothing of the project when loaded (:func:`restore` alone reaches for the
platform's ``UserError``): ``infra/mlflow/serve.py`` loads this file by its path beside it.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
import warnings
from typing import Any
from urllib.parse import unquote

MASK = "***"

# A name holds a secret when, lower-cased with '-', '_', '.' and spaces removed, it ends with one of these
# (password, MLFLOW_TRACKING_PASSWORD, sslpassword, access_token, X-Amz-Security-Token, client_secret,
# X-Amz-Signature, X-Amz-Credential, aws_secret_access_key, api_key, private_key, ...). A name that merely contains
# one (token_cache, max_tokens) does not.
_SECRET_SUFFIXES = (
    "password",
    "passwd",
    "secret",
    "token",
    "signature",
    "credential",
    "credentials",
    "apikey",
    "privatekey",
    "secretkey",
    "secretaccesskey",
)
# short names that are secrets as URI query parameters only (?key=..., ?sig=... of an Azure SAS, ?code=... of OAuth);
# in free text they are too common (a shard key=..., exit code=2) to mask
_QUERY_NAMES = frozenset({"pwd", "pass", "key", "sig", "sas", "auth", "authorization", "code"})

_SCHEME_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
# key=value in free text (DSN keywords, env assignments, a query string outside a URI); the value may be quoted
_KEY_VALUE = re.compile(
    r"(?<![\w.\-])([A-Za-z_][\w.\-]*)(\s*=\s*)"
    r"('(?:[^'\\]|\\.)*'?|\"(?:[^\"\\]|\\.)*\"?|[^\s&;,'\"]+)"
)


def secret_key(name: str, query: bool = False) -> bool:
    """Whether a config key, environment variable or ``key=value`` word of this name holds a secret; ``query``: as
    a URI query parameter, where the short names (``key``, ``sig``, ``code``, ...) count too."""
    n = re.sub(r"[\s_.\-]", "", unquote(str(name))).lower()
    return n.endswith(_SECRET_SUFFIXES) or (query and n in _QUERY_NAMES)


def _redact_query(query: str) -> str:
    parts = re.split(r"([&;])", query)
    for i in range(0, len(parts), 2):
        k, eq, v = parts[i].partition("=")
        if eq and v and secret_key(k, query=True):
            parts[i] = f"{k}={MASK}"
    return "".join(parts)


def _redact_uri(uri: str) -> str:
    """One ``scheme://...`` token: its user-info and its secret query values masked."""
    scheme, _, rest = uri.partition("://")
    if "@" in rest:
        creds, _, host = rest.rpartition("@")
        cut = min((i for i in (creds.find(c) for c in "/?#") if i >= 0), default=-1)
        # no '/', '?' or '#' before the last '@': all of it is user-info; otherwise it is only when a ':' comes first
        # (a raw password holding '/'), else the '@' belongs to a path or query (s3://bucket/key@v2, ?mail=a@b)
        if cut < 0 or ":" in creds[:cut]:
            rest = f"{MASK}@{host}"
    path, q, query = rest.partition("?")
    if q:
        query, h, frag = query.partition("#")
        rest = f"{path}?{_redact_query(query)}{h}{frag}"
    return f"{scheme}://{rest}"


def _redact_pair(m: re.Match) -> str:
    key, eq, value = m.groups()
    if not secret_key(key) or value.startswith(MASK):
        return m.group(0)
    return f"{key}{eq}{MASK}"


def redact(text: Any) -> Any:
    """``text`` with every secret masked as ``***``: credentials and secret query values in each URI it holds, and
    secret ``key=value`` pairs (a libpq DSN, ``?password=``, ``TOKEN=...``). A URI alone, a DSN alone or a whole log
    line all work; ``None`` (and any non-string) is returned as it is."""
    if not isinstance(text, str) or not text:
        return text
    out = _SCHEME_URI.sub(lambda m: _redact_uri(m.group(0)), text)
    return _KEY_VALUE.sub(_redact_pair, out)


def redact_config(data: Any) -> Any:
    """A copy of a plain config structure (dicts, lists, strings: what ``infra.core.config.to_dict`` gives) with
    :func:`redact` applied to every string and the whole value of every secret-named key masked. For what is
    written or logged about a config, never for the config a run uses."""
    if isinstance(data, dict):
        return {k: (MASK if secret_key(k) and isinstance(v, str) and v else redact_config(v)) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(redact_config(v) for v in data)
    return redact(data)


def restore(shown: str | None, *candidates: str | None) -> str | None:
    """The URI behind a redacted record: the first candidate (e.g. ``$MLFLOW_TRACKING_URI``) that :func:`redact`
    turns into ``shown``; ``shown`` itself when it holds no mask. A masked record without a matching candidate
    raises ``UserError`` naming what to give instead (the secret is not in the record, by design)."""
    if not shown or MASK not in shown:
        return shown
    for c in candidates:
        if c and redact(c) == shown:
            return c
    from .errors import UserError

    raise UserError(
        f"{shown} was recorded without its credentials: give the full URI (--tracking-uri, or $MLFLOW_TRACKING_URI)"
    )


_installed = False


class _RedactingStream:
    """A text stream (``sys.stdout`` / ``sys.stderr``) whose ``write`` passes through :func:`redact`; everything else
    (``fileno``, ``isatty``, ``buffer``, ...) is the wrapped stream's."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, s):
        self._stream.write(redact(s) if isinstance(s, str) else s)
        return len(s)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def install() -> None:
    """Route what this process prints on stdout / stderr, logs, warns and shows as an uncaught traceback through
    :func:`redact` (once per process; the ``varsr`` entry point and the training workers call it). This covers
    third-party output that quotes a URI it was given, such as the ``View run ... at: http://user:password@host/...``
    line that MLflow's client writes to stdout when a run on a tracking server ends. What the platform writes to
    files it redacts where it writes them. Bytes written to ``sys.stdout.buffer`` or to the file descriptors (child
    processes) are not seen here."""
    global _installed
    if _installed:
        return
    _installed = True
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _RedactingStream):
            setattr(sys, name, _RedactingStream(stream))
    make_record = logging.getLogRecordFactory()

    def record(*args, **kwargs) -> logging.LogRecord:
        rec = make_record(*args, **kwargs)
        try:
            msg = rec.getMessage()
        except Exception:  # noqa: BLE001 - a bad format: let the handler report it as it would
            return rec
        shown = redact(msg)
        if shown != msg:
            rec.msg, rec.args = shown, None
        if rec.exc_info and not rec.exc_text:  # the formatter keeps exc_text when it is set
            rec.exc_text = redact("".join(traceback.format_exception(*rec.exc_info))).rstrip("\n")
        return rec

    logging.setLogRecordFactory(record)
    format_warning = warnings.formatwarning
    warnings.formatwarning = lambda *a, **kw: redact(format_warning(*a, **kw))

    def excepthook(kind, value, tb) -> None:
        sys.stderr.write(redact("".join(traceback.format_exception(kind, value, tb))))

    sys.excepthook = excepthook
