"""Writing shards: deterministic tars, published whole under their final name, to a local folder or object storage.

Tars are written with fixed member metadata (mtime 0, uid/gid 0, mode 0644, members in ``SAMPLE_MEMBERS`` order per
sample), so the same samples give byte-identical shards. A tar is built in a local temporary file, fsynced and
hashed, then published with one rename (file system) or one whole upload (object storage): no reader ever sees a
partial shard under its final name. A shard task publishes its stats first and its tar second, and returns the
stats to the driver, which writes the manifest last (the commit point, see ``format.py``).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile

from infra.core import storage

from .format import ShardStats, stats_name, stats_to_bytes


class TarWriter:
    """Members with fixed metadata into a local temporary tar; ``finish`` hashes it and ``publish`` puts it in place."""

    def __init__(self, final_url: str):
        self.final_url = final_url
        # next to a local destination (so publishing is a rename), else in the system temp folder
        d = os.path.dirname(storage.local_path(final_url)) if storage.is_local(final_url) else None
        fd, self.tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".tar", dir=d or None)
        os.close(fd)
        self.f = open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.f, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        ti.mtime = 0
        ti.mode = 0o644
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        ti.type = tarfile.REGTYPE
        self.tar.addfile(ti, io.BytesIO(data))

    def finish(self) -> tuple[int, str]:
        """Close and fsync the temporary tar; returns (bytes, sha256). Call ``publish`` to put it in place."""
        self.tar.close()
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        sha = hashlib.sha256()
        with open(self.tmp, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
        return os.path.getsize(self.tmp), sha.hexdigest()

    def publish(self) -> None:
        storage.put_file(self.tmp, self.final_url)
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)


def publish_shard(writer: TarWriter, stats: ShardStats, out_dir: str, prefix: str) -> ShardStats:
    """Hash the finished tar, publish its stats, then the tar itself; returns the completed stats."""
    return publish_with_stats(writer, stats, storage.join(out_dir, stats_name(prefix, stats.index)))


def publish_with_stats(writer: TarWriter, stats, stats_url: str):
    """Hash the finished tar into ``stats`` (its ``bytes`` and ``sha256``), publish the stats at ``stats_url``, then
    the tar under its final name; returns the completed stats."""
    stats.bytes, stats.sha256 = writer.finish()
    storage.write_bytes(stats_url, stats_to_bytes(stats))
    writer.publish()
    return stats


def remove_stale_temporaries(out_dir: str) -> int:
    """Delete ``.tmp-*`` files a killed run left in a local output folder (object stores never hold partial
    objects, so there is nothing to clean there)."""
    if not storage.is_local(out_dir):
        return 0
    n = 0
    for name in storage.listdir(out_dir):
        if name.startswith(".tmp-"):
            os.unlink(os.path.join(storage.local_path(out_dir), name))
            n += 1
    return n
