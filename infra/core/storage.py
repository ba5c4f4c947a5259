"""One storage layer on fsspec: every input and output of the platform is a local path or a URL.

Local paths (and ``file://``) behave as plain files; ``s3://``, ``gs://``, ``memory://`` and any other fsspec
protocol go through fsspec. S3-compatible endpoints are taken from the standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), so the same command runs against AWS,
MinIO or a loopback test server.

Writes are safe to retry. :func:`write_bytes` and :func:`put_file` never leave a partial object under the final
name: on a file system the data goes to a temporary name in the same folder, is fsynced and renamed; on object
storage one whole upload creates the object (an object is visible only once its upload completed). Callers that
publish several objects write the commit point (a manifest, a COMPLETE marker) last.

Object-store failures — a missing bucket, refused credentials, an endpoint that does not answer — end in a
:class:`StorageError` (a one-line ``UserError`` naming the URL) after a bounded number of quick retries, never in a
traceback or an endless retry loop.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tempfile
import uuid
from contextlib import contextmanager
from typing import IO, Iterator

from .errors import UserError

CHUNK = 1 << 20


class StorageError(UserError):
    """An input or output URL cannot be read or written; the message names the URL and the reason."""


def is_local(url: str | os.PathLike) -> bool:
    s = os.fspath(url)
    return "://" not in s or s.startswith("file://")


def local_path(url: str | os.PathLike) -> str:
    """A local location as a plain path: ``file://`` dropped, and a ``<repo>/`` reference (a file the repository
    ships, as runs record it) resolved in this checkout by :func:`infra.core.tracking.resolve_ref`."""
    s = os.fspath(url)
    if s.startswith("<repo>/"):
        from .tracking import resolve_ref

        return resolve_ref(s, os.getcwd())
    return s[len("file://") :] if s.startswith("file://") else s


def protocol(url: str | os.PathLike) -> str:
    s = os.fspath(url)
    return "file" if is_local(s) else s.split("://", 1)[0]


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path segments onto a local path or a URL (URLs always use ``/``)."""
    b = os.fspath(base)
    if is_local(b):
        return os.path.join(local_path(b), *parts)
    return posixpath.join(b.rstrip("/"), *parts)


def parent(url: str | os.PathLike) -> str:
    s = os.fspath(url)
    if is_local(s):
        return os.path.dirname(os.path.abspath(local_path(s)))
    scheme, rest = s.split("://", 1)
    return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"


def basename(url: str | os.PathLike) -> str:
    return posixpath.basename(os.fspath(url).rstrip("/"))


def absolute(url: str | os.PathLike) -> str:
    """A local path made absolute (for workers that run elsewhere); URLs unchanged."""
    s = os.fspath(url)
    return os.path.abspath(local_path(s)) if is_local(s) else s


def storage_options(url: str) -> dict:
    """fsspec options per protocol: bounded, fast-failing retries for S3 (an endpoint that is down must fail in
    seconds, not retry for minutes)."""
    if protocol(url) in ("s3", "s3a"):
        return {
            "config_kwargs": {
                "connect_timeout": 5,
                "read_timeout": 60,
                "retries": {"max_attempts": 3, "mode": "standard"},
            }
        }
    return {}


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **storage_options(url))
    except ImportError as e:
        raise StorageError(
            f"{url}: no fsspec driver for {protocol(url)}:// ({e}); install the 'cluster' extra "
            f"(pip install 'varsr-platform[cluster]')"
        ) from None
    except ValueError as e:
        raise StorageError(f"{url}: {e}") from None


def _reason(e: BaseException) -> str:
    """A short, credential-free reason for a storage failure."""
    name = type(e).__name__
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    code = getattr(e, "response", {}) or {}
    code = code.get("Error", {}).get("Code") if isinstance(code, dict) else None
    if isinstance(e, FileNotFoundError):
        return "not found (missing bucket, folder or object)"
    if isinstance(e, PermissionError) or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return f"access refused ({code or name}): check the credentials"
    if (
        "EndpointConnectionError" in name
        or "ConnectTimeout" in name
        or "ConnectionError" in name
        or isinstance(e, (ConnectionError, TimeoutError))
    ):
        return f"cannot reach the storage endpoint ({name}): check AWS_ENDPOINT_URL / the network"
    if code == "NoSuchBucket":
        return "the bucket does not exist"
    return f"{name}: {text}"[:300]


@contextmanager
def storage_errors(url: str, action: str):
    """Turn any failure inside the block into one StorageError naming ``url``."""
    try:
        yield
    except StorageError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        raise StorageError(f"cannot {action} {url}: {_reason(e)}") from e
    except Exception as e:  # botocore / aiohttp errors do not share a base class with OSError
        if type(e).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "google", "s3fs", "gcsfs"):
            raise StorageError(f"cannot {action} {url}: {_reason(e)}") from e
        raise


def exists(url: str) -> bool:
    if is_local(url):
        return os.path.exists(local_path(url))
    fs, path = filesystem(url)
    with storage_errors(url, "check"):
        return fs.exists(path)


def size(url: str) -> int:
    if is_local(url):
        return os.path.getsize(local_path(url))
    fs, path = filesystem(url)
    with storage_errors(url, "stat"):
        return int(fs.size(path))


def makedirs(url: str) -> None:
    """Create a local folder (object stores have no folders: nothing to do, but the bucket must exist)."""
    if is_local(url):
        os.makedirs(local_path(url), exist_ok=True)
        return
    fs, path = filesystem(url)
    bucket = path.split("/", 1)[0]
    with storage_errors(url, "open the bucket of"):
        if not fs.exists(bucket):
            raise FileNotFoundError(bucket)


def listdir(url: str) -> list[str]:
    """Names (not paths) of the entries directly in a folder / under a prefix; [] when it does not exist."""
    if is_local(url):
        p = local_path(url)
        return sorted(os.listdir(p)) if os.path.isdir(p) else []
    fs, path = filesystem(url)
    with storage_errors(url, "list"):
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False, refresh=True))
        except FileNotFoundError:
            bucket = path.split("/", 1)[0]
            if not fs.exists(bucket):
                raise
            return []


@contextmanager
def open_url(url: str, mode: str = "rb") -> Iterator[IO]:
    """A file object for reading a local path or URL (streamed, never copied whole to local disk first)."""
    if "w" in mode or "a" in mode:
        raise ValueError("open_url reads; write with write_bytes / put_file (atomic)")
    if is_local(url):
        with storage_errors(url, "read"), open(local_path(url), mode) as f:
            yield f
        return
    fs, path = filesystem(url)
    with storage_errors(url, "read"):
        f = fs.open(path, mode)
    try:
        with storage_errors(url, "read"):
            yield f
    finally:
        f.close()


def read_bytes(url: str) -> bytes:
    with open_url(url) as f, storage_errors(url, "read"):
        return f.read()


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` atomically (no partial object under the final name, ever)."""
    if is_local(url):
        p = local_path(url)
        d = os.path.dirname(os.path.abspath(p))
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".tmp-{os.path.basename(p)}.{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    fs, path = filesystem(url)
    with storage_errors(url, "write"):
        fs.pipe_file(path, data)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def put_file(local: str | os.PathLike, url: str) -> None:
    """Publish a finished local file at ``url`` (rename on a file system; one whole upload on object storage)."""
    src = os.fspath(local)
    if is_local(url):
        dst = local_path(url)
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        if os.path.dirname(os.path.abspath(src)) == os.path.dirname(os.path.abspath(dst)):
            os.replace(src, dst)
            return
        with open(src, "rb") as f:
            data = f.read()
        write_bytes(dst, data)
        return
    fs, path = filesystem(url)
    with storage_errors(url, "upload to"):
        fs.put_file(src, path)


def get_file(url: str, local: str | os.PathLike) -> None:
    """Copy one object to a local file (atomically)."""
    dst = os.fspath(local)
    d = os.path.dirname(os.path.abspath(dst))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    os.close(fd)
    try:
        if is_local(url):
            with open(local_path(url), "rb") as fi, open(tmp, "wb") as fo:
                for chunk in iter(lambda: fi.read(CHUNK), b""):
                    fo.write(chunk)
        else:
            fs, path = filesystem(url)
            with storage_errors(url, "download"):
                fs.get_file(path, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove(url: str, recursive: bool = False) -> None:
    """Delete a file/object (or a folder/prefix with ``recursive``); missing is fine."""
    if is_local(url):
        p = local_path(url)
        if os.path.isdir(p) and recursive:
            import shutil

            shutil.rmtree(p, ignore_errors=True)
        elif os.path.exists(p):
            os.unlink(p)
        return
    fs, path = filesystem(url)
    with storage_errors(url, "delete"):
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass


def sha256(url: str) -> str:
    """Hex sha256 of a file/object, streamed."""
    h = hashlib.sha256()
    with open_url(url) as f, storage_errors(url, "read"):
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def put_tree(local_dir: str | os.PathLike, url: str) -> None:
    """Upload every file under ``local_dir`` to the prefix ``url`` (same relative paths), file by file."""
    root = os.fspath(local_dir)
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            src = os.path.join(dirpath, name)
            rel = os.path.relpath(src, root).replace(os.sep, "/")
            put_file_copy(src, join(url, rel))


def put_file_copy(src: str, url: str) -> None:
    """Like :func:`put_file` but leaves the source in place."""
    if is_local(url):
        with open(src, "rb") as f:
            write_bytes(url, f.read())
    else:
        put_file(src, url)


def get_tree(url: str, local_dir: str | os.PathLike) -> None:
    """Download every object under the prefix ``url`` into ``local_dir`` (same relative paths)."""
    dst = os.fspath(local_dir)
    if is_local(url):
        import shutil

        shutil.copytree(local_path(url), dst, dirs_exist_ok=True)
        return
    fs, path = filesystem(url)
    with storage_errors(url, "list"):
        found = fs.find(path)
    for obj in found:
        rel = posixpath.relpath(obj, path)
        get_file(f"{protocol(url)}://{obj}", os.path.join(dst, *rel.split("/")))


# Settings a process on another node needs to reach the same storage (and tracking) as the one that launched it.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "VARSR_SCRATCH",
)


def forwarded_env() -> dict[str, str]:
    """The storage/tracking environment of this process, to hand to remote workers (Ray runtime_env)."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def pyarrow_filesystem(url: str):
    """(pyarrow filesystem, path) for a URL, through fsspec (for libraries such as Ray Train that take pyarrow)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
