"""Where a training run writes: ``output_dir`` is a local folder or an object-store URL (``s3://bucket/runs/x``).

Every rank works in a local folder: the output folder itself when it is local, else a scratch folder of its own on
its node (``$VARSR_SCRATCH`` or the system temp folder). With a URL, files are published to it explicitly — each
rank its own checkpoint shards, rank 0 everything else — and always through the storage layer's atomic writes, so a
reader of the URL never sees a partial file. Nothing here assumes a disk shared between nodes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from infra.core import storage


class RunDir:
    """The local working folder of one rank plus, for URL outputs, the URL it publishes to."""

    def __init__(self, output_dir: str, rank: int = 0):
        self.url = storage.absolute(output_dir)
        self.remote = not storage.is_local(self.url)
        if self.remote:
            tag = hashlib.sha256(self.url.encode()).hexdigest()[:12]
            root = os.environ.get("VARSR_SCRATCH") or tempfile.gettempdir()
            self.local = Path(root) / f"varsr-run-{tag}-rank{rank}"
        else:
            self.local = Path(self.url)
        self.local.mkdir(parents=True, exist_ok=True)

    def __truediv__(self, rel: str) -> Path:
        return self.local / rel

    def url_of(self, rel: str | Path) -> str:
        return storage.join(self.url, *Path(rel).parts)

    def publish(self, rel: str | Path) -> None:
        """Copy one local file (path relative to the run folder) to the output URL; a no-op for local outputs."""
        if self.remote:
            storage.put_file_copy(str(self.local / rel), self.url_of(rel))

    def publish_tree(self, rel: str | Path) -> None:
        if self.remote and (self.local / rel).is_dir():
            storage.put_tree(self.local / rel, self.url_of(rel))

    def fetch(self, rel: str | Path) -> bool:
        """Bring one file of the output URL into the local folder (True when it exists there)."""
        if not self.remote:
            return (self.local / rel).exists()
        url = self.url_of(rel)
        if not storage.exists(url):
            return False
        storage.get_file(url, self.local / rel)
        return True

    def fetch_tree(self, rel: str | Path) -> Path:
        if self.remote:
            storage.get_tree(self.url_of(rel), self.local / rel)
        return self.local / rel

    def list(self, rel: str) -> list[str]:
        """Names under a sub-folder of the output (the URL for remote outputs)."""
        return storage.listdir(self.url_of(rel))

    def exists(self, rel: str | Path) -> bool:
        return storage.exists(self.url_of(rel))

    def remove_tree(self, rel: str | Path) -> None:
        storage.remove(self.url_of(rel), recursive=True)
        if self.remote:
            storage.remove(str(self.local / rel), recursive=True)
