"""Input sources: a local folder (recursive), a glob, any fsspec URL, or a manifest (Parquet/CSV/JSONL).

`list_sources` turns a source spec into a sorted, de-duplicated list of `SourceItem`s (URI + optional metadata);
`read_bytes` fetches one through the platform's storage layer (``infra.core.storage``: a missing bucket or refused
credentials end in one line naming the URL). Sample ids come later from the content hash (sha256 of the bytes).

Every input is accounted for (data_pipeline/README.md: "every input ends in exactly one place"): each path the user
gave, each glob match and each entry a folder walk meets becomes one `SourceItem`. Those that must not be read are
decided while listing (``status`` "rejected"/"failed" with a reason) and flow through scoring into
``rejected.parquet`` and ``manifest.json``'s counts without ever being opened:

- ``name_not_utf8``: a file name that is not valid UTF-8 (the tables and the shard contract store URIs as UTF-8
  text); its URI is shown with ``\\xNN`` escapes, and the error says to rename it.
- ``hidden``: a name starting with "." met by a folder walk or a glob (hidden folders are not walked).
- ``not_regular_file``: a FIFO, socket, device or directory (a directory only when it is not the walked folder
  itself: a directory symlink met by a walk is not followed, so walks stay inside the input and cannot loop).
  Opening a FIFO blocks forever and a device may never end, so only regular files are ever opened, everywhere:
  ``read_bytes`` checks ``stat`` before ``open`` (and ``fstat`` after it, with ``O_NONBLOCK``) and raises
  `NotRegularFile`; fsspec URLs are checked with the file system's own type information.
- ``dangling_symlink`` / ``symlink_loop``: a symlink whose target is missing, or that resolves to itself.
- ``extension``: a folder-walk or glob entry whose extension is not in ``source.extensions``. Such a file is not
  read to sniff its content (a folder may hold videos or archives), so a PNG named ``photo.txt`` is rejected with
  this reason, cheaply and visibly; ``source.all_files=true`` decodes every file by content instead (the decoder
  identifies formats by their bytes, never by the name), and so does naming the file itself or listing it in a
  manifest.

Manifest rows are not stat-ed while listing (a manifest may list millions of files): their type is checked by
`read_bytes` in the scoring workers, with the same reasons. A path that does not exist at all is a read failure
(``failed``/``read_error``); a spec that matches nothing is an error, as before.
"""

from __future__ import annotations

import errno
import glob as _glob
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from infra.core import storage

from .config import SourceConfig

MANIFEST_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")
_URI_COLUMNS = ("path", "url", "uri", "file", "filename", "image")


# object stores hold only objects: no FIFOs or devices, and opening anything else fails (a read error); every other
# fsspec file system (memory, sftp, smb, hdfs, ...) is asked for the entry's type before it is opened
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "http", "https", "hf"})


@dataclass
class SourceItem:
    uri: str
    meta: dict[str, Any] = field(default_factory=dict)
    status: str = ""  # "": read and decode it; "rejected" / "failed": decided while listing, never opened
    reason: str = ""
    error: str = ""


class NotRegularFile(OSError):
    """Raised instead of opening an input that is not a regular file; ``reason`` is its rejection reason
    (``not_regular_file``, ``dangling_symlink`` or ``symlink_loop``) and the message names the input."""

    def __init__(self, uri: str, reason: str, detail: str):
        super().__init__(f"{printable(uri)}: {detail}")
        self.reason, self.detail = reason, detail


def printable(name: str) -> str:
    """``name`` when it is valid UTF-8 text, else the same name with its undecodable bytes shown as ``\\xNN``
    (file names that are not UTF-8 reach Python as surrogate escapes, which no table or JSON can store)."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte (e.g. from a JSON manifest)
        return name.encode("utf-8", "backslashreplace").decode("ascii")


def _rejected(uri: str, reason: str, error: str, status: str = "rejected") -> SourceItem:
    return SourceItem(printable(uri), status=status, reason=reason, error=error)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "special file"


def local_problem(path: str) -> tuple[str, str] | None:
    """None when ``path`` is a regular file (after following symlinks), else (reason, detail) saying what is there
    instead. Only ``stat``/``lstat``: nothing is opened. A path that does not exist raises FileNotFoundError."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink_loop", "symlink loop (too many levels of symbolic links): never opened"
        if e.errno in (errno.ENOENT, errno.ENOTDIR) and os.path.islink(path):
            return "dangling_symlink", f"symlink to '{printable(os.readlink(path))}', which does not exist"
        raise
    if stat.S_ISREG(st.st_mode):
        return None
    return "not_regular_file", f"{_kind(st.st_mode)}, not a regular file: never opened"


def _remote_problem(fs, path: str, proto: str) -> tuple[str, str] | None:
    """The fsspec counterpart of `local_problem`, from the file system's type information."""
    if proto in _OBJECT_STORES:
        return None
    kind = (fs.info(path) or {}).get("type", "file")
    return None if kind == "file" else ("not_regular_file", f"{kind}, not a regular file: never opened")


def _local_item(path: str, cfg: SourceConfig, walked: bool) -> SourceItem:
    """The SourceItem of one local path: to be read, or rejected/failed with its reason. ``walked``: met by a
    folder walk or a glob (then hidden names and unlisted extensions are rejected too) rather than named."""
    shown = printable(path)
    if shown != path:
        return _rejected(
            path,
            "name_not_utf8",
            f"file name is not valid UTF-8 ({shown}, undecodable bytes shown as \\xNN): rename it to include it",
        )
    base = os.path.basename(path.rstrip("/"))
    if walked and base.startswith("."):
        return _rejected(path, "hidden", "hidden file (name starts with '.')")
    try:
        problem = local_problem(path)
    except OSError as e:
        return _rejected(path, "read_error", f"{type(e).__name__}: {e}", status="failed")
    if problem is not None:
        return _rejected(path, *problem)
    if walked and not cfg.all_files and os.path.splitext(base)[1].lower() not in cfg.extensions:
        return _rejected(
            path,
            "extension",
            f"extension not in source.extensions {cfg.extensions} (not read; "
            f"source.all_files=true decodes every file by content)",
        )
    return SourceItem(path)


def _walk(root: str, cfg: SourceConfig) -> list[SourceItem]:
    """Every entry under ``root``, one SourceItem each. Real sub-folders are walked (hidden ones are rejected, not
    walked); symlinks are not followed into directories, so the walk stays inside ``root`` and cannot loop."""
    items: list[SourceItem] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            if folder == root:
                raise
            items.append(_rejected(folder, "read_error", f"cannot list folder: {type(e).__name__}: {e}", "failed"))
            continue
        for entry in entries:
            try:
                real_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                real_dir = False
            if real_dir and printable(entry.path) == entry.path and not entry.name.startswith("."):
                stack.append(entry.path)
            elif real_dir and entry.name.startswith("."):
                items.append(_rejected(entry.path, "hidden", "hidden folder (name starts with '.'): not walked"))
            elif real_dir:
                items.append(
                    _rejected(
                        entry.path,
                        "name_not_utf8",
                        f"folder name is not valid UTF-8 ({printable(entry.path)}): not walked; rename it",
                    )
                )
            else:
                items.append(_local_item(entry.path, cfg, walked=True))
    return items


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _has_protocol(s: str) -> bool:
    return "://" in s and not s.startswith("file://")


def _wanted(name: str, cfg: SourceConfig) -> bool:
    base = name.rsplit("/", 1)[-1]
    if base.startswith("."):
        return False
    return cfg.all_files or os.path.splitext(base)[1].lower() in cfg.extensions


def _read_manifest(uri: str, cfg: SourceConfig) -> list[SourceItem]:
    import pandas as pd

    try:
        check_regular(uri)
    except NotRegularFile as e:
        raise ValueError(f"manifest {e}") from None
    with storage.open_url(uri) as f:
        if uri.endswith(".parquet"):
            df = pd.read_parquet(f)
        elif uri.endswith(".csv"):
            df = pd.read_csv(f)
        else:
            df = pd.read_json(f, lines=True)
    col = cfg.manifest_column or next((c for c in _URI_COLUMNS if c in df.columns), None)
    if col is None or col not in df.columns:
        raise ValueError(
            f"manifest {uri}: no path/url column (looked for {cfg.manifest_column or _URI_COLUMNS}); "
            f"columns are {list(df.columns)}"
        )
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    items = []
    for rec in df.to_dict(orient="records"):
        p = str(rec.pop(col))
        if not ("://" in p or p.startswith("/")):
            p = f"{base}/{p}"  # relative paths are relative to the manifest
        meta = {k: (v.item() if hasattr(v, "item") else v) for k, v in rec.items()}
        if printable(p) != p:  # e.g. "\udcff" in a JSON manifest: no table can store it, so it is never read
            items.append(_rejected(p, "name_not_utf8", f"path is not valid UTF-8 ({printable(p)})"))
            continue
        # the type of each row (regular file, FIFO, ...) is checked by read_bytes in the scoring workers
        items.append(SourceItem(p, json.loads(json.dumps(meta, default=str))))
    return items


def _remote_items(s: str, cfg: SourceConfig) -> list[SourceItem]:
    """A fsspec URL: a glob, a folder (every object under it) or one object, with the file system's type info."""
    fs, path = storage.filesystem(s)
    proto = s.split("://", 1)[0]
    with storage.storage_errors(s, "list"):
        if _is_glob(path):
            found, walked = fs.glob(path, detail=True), True
        elif fs.isdir(path):
            found, walked = fs.find(path, detail=True), True
        elif fs.exists(path):
            found, walked = {path: fs.info(path)}, False
        else:
            raise FileNotFoundError(path)
    items = []
    for p, info in sorted(found.items()):
        uri, base = f"{proto}://{p}", p.rstrip("/").rsplit("/", 1)[-1]
        kind = (info or {}).get("type", "file")
        if walked and base.startswith("."):
            items.append(_rejected(uri, "hidden", "hidden file (name starts with '.')"))
        elif kind != "file":
            items.append(_rejected(uri, "not_regular_file", f"{kind}, not a regular file: never opened"))
        elif walked and not _wanted(p, cfg):
            items.append(
                _rejected(
                    uri,
                    "extension",
                    f"extension not in source.extensions {cfg.extensions} "
                    f"(not read; source.all_files=true decodes by content)",
                )
            )
        else:
            items.append(SourceItem(uri))
    return items


def list_sources(spec: str | Path | Iterable[str], cfg: SourceConfig | None = None) -> list[SourceItem]:
    """Expand a source spec (or a list of them) into SourceItems, sorted by URI, duplicates of a URI dropped."""
    cfg = cfg or SourceConfig()
    if not isinstance(spec, (str, Path)):
        items: list[SourceItem] = []
        for s in spec:
            items.extend(list_sources(s, cfg))
    else:
        s = str(spec)
        local = s[len("file://") :] if s.startswith("file://") else s
        if s.lower().endswith(MANIFEST_SUFFIXES) and not _is_glob(s):
            items = _read_manifest(s, cfg)
        elif _has_protocol(s):
            items = _remote_items(s, cfg)
        elif _is_glob(local):
            items = [_local_item(os.path.abspath(p), cfg, walked=True) for p in _glob.glob(local, recursive=True)]
        elif os.path.isdir(local):
            items = _walk(os.path.abspath(local), cfg)
        elif os.path.lexists(local):  # a file, or a FIFO / device / broken symlink named on its own
            items = [_local_item(os.path.abspath(local), cfg, walked=False)]
        else:
            raise FileNotFoundError(f"input {s!r} is not a folder, glob, file, manifest or fsspec URL")
    seen: dict[str, SourceItem] = {}
    for it in items:  # one item per URI; one to read wins over a rejection of the same URI (e.g. by extension)
        if it.uri not in seen or (seen[it.uri].status and not it.status):
            seen[it.uri] = it
    return [seen[k] for k in sorted(seen)]


def check_regular(uri: str) -> None:
    """Raise `NotRegularFile` unless ``uri`` is a regular file (or an object store's object); opens nothing. A
    missing file raises the storage layer's one-line error."""
    if storage.is_local(uri):
        with storage.storage_errors(uri, "read"):
            problem = local_problem(storage.local_path(uri))
    else:
        fs, path = storage.filesystem(uri)
        with storage.storage_errors(uri, "read"):
            problem = _remote_problem(fs, path, storage.protocol(uri))
    if problem is not None:
        raise NotRegularFile(uri, *problem)


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """Read a file (local or URL); reads at most max_bytes + 1 bytes so oversize files are detected cheaply.
    Only regular files are opened: anything else raises `NotRegularFile` (see the module docstring)."""
    check_regular(uri)
    if not storage.is_local(uri):
        with storage.open_url(uri) as f, storage.storage_errors(uri, "read"):
            return f.read() if max_bytes is None else f.read(max_bytes + 1)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    with storage.storage_errors(uri, "read"):
        fd = os.open(storage.local_path(uri), flags)  # O_NONBLOCK: a FIFO swapped in after the stat cannot block
    try:
        mode = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegularFile(uri, "not_regular_file", f"{_kind(mode)}, not a regular file (replaced while opened)")
    with os.fdopen(fd, "rb") as f, storage.storage_errors(uri, "read"):
        return f.read() if max_bytes is None else f.read(max_bytes + 1)
