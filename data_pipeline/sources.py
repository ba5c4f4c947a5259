"""Input sources: a local folder (recursive), a glob, any fsspec URL, or a manifest (Parquet/CSV/JSONL).

`list_sources` turns a source spec into a sorted, de-duplicated list of `SourceItem`s (URI + optional metadata);
`read_bytes` fetches one through the platform's storage layer (``infra.core.storage``: a missing bucket or refused
credentials end in one line naming the URL). Sample ids come later from the content hash (sha256 of the bytes).
"""
from __future__ import annotations

import glob as _glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from infra.core import storage

from .config import SourceConfig

MANIFEST_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")
_URI_COLUMNS = ("path", "url", "uri", "file", "filename", "image")


@dataclass
class SourceItem:
    uri: str
    meta: dict[str, Any] = field(default_factory=dict)


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
    with storage.open_url(uri) as f:
        if uri.endswith(".parquet"):
            df = pd.read_parquet(f)
        elif uri.endswith(".csv"):
            df = pd.read_csv(f)
        else:
            df = pd.read_json(f, lines=True)
    col = cfg.manifest_column or next((c for c in _URI_COLUMNS if c in df.columns), None)
    if col is None or col not in df.columns:
        raise ValueError(f"manifest {uri}: no path/url column (looked for {cfg.manifest_column or _URI_COLUMNS}); "
                         f"columns are {list(df.columns)}")
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    items = []
    for rec in df.to_dict(orient="records"):
        p = str(rec.pop(col))
        if not ("://" in p or p.startswith("/")):
            p = f"{base}/{p}"  # relative paths are relative to the manifest
        meta = {k: (v.item() if hasattr(v, "item") else v) for k, v in rec.items()}
        items.append(SourceItem(p, json.loads(json.dumps(meta, default=str))))
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
        local = s[len("file://"):] if s.startswith("file://") else s
        if s.lower().endswith(MANIFEST_SUFFIXES) and not _is_glob(s):
            items = _read_manifest(s, cfg)
        elif _has_protocol(s):
            fs, path = storage.filesystem(s)
            proto = s.split("://", 1)[0]
            with storage.storage_errors(s, "list"):
                if _is_glob(path):
                    paths = fs.glob(path)
                elif fs.isdir(path):
                    paths = fs.find(path)
                elif fs.exists(path):
                    paths = [path]
                else:
                    raise FileNotFoundError(path)
            items = [SourceItem(f"{proto}://{p}") for p in paths if _wanted(p, cfg)]
        elif _is_glob(local):
            items = [SourceItem(os.path.abspath(p)) for p in _glob.glob(local, recursive=True)
                     if os.path.isfile(p) and _wanted(p, cfg)]
        elif os.path.isdir(local):
            items = [SourceItem(str(p.resolve())) for p in Path(local).rglob("*")
                     if p.is_file() and _wanted(p.name, cfg)]
        elif os.path.isfile(local):
            items = [SourceItem(os.path.abspath(local))]
        else:
            raise FileNotFoundError(f"input {s!r} is not a folder, glob, file, manifest or fsspec URL")
    seen: dict[str, SourceItem] = {}
    for it in items:
        seen.setdefault(it.uri, it)
    return [seen[k] for k in sorted(seen)]


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """Read a file (local or URL); reads at most max_bytes + 1 bytes so oversize files are detected cheaply."""
    with storage.open_url(uri) as f, storage.storage_errors(uri, "read"):
        return f.read() if max_bytes is None else f.read(max_bytes + 1)
