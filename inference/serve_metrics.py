"""Prometheus metrics and health of the served endpoint (inference/README.md, "Metrics and health"; issue 32).

What an operator of ``varsr serve`` sees, with Prometheus' own client library (``prometheus_client``), on the same
port as ``/invocations``:

- ``GET /metrics``: requests by status code, request latency and latency per image, images per batch, requests
  waiting for a batch and in flight, images and latent tiles processed, refusals by reason, resident memory per
  process. Every series carries the served model's ``model``, ``version`` and ``alias`` labels
  (``varsr serve`` resolves them from the registry and passes them in ``$VARSR_MODEL_*``).
- ``GET /health/live``: the process answers (nothing else is checked: a busy worker is alive).
- ``GET /health/ready``: every worker process of the pod has loaded the model and run its warm-up call, and the
  requests held by the pod are under ``workers x serving.max_queued_requests``; 503 with the reason otherwise.

Several ``--workers`` processes: ``varsr serve`` gives the server ``$PROMETHEUS_MULTIPROC_DIR`` (a folder in its
temporary directory, created empty at start and deleted at stop), and every worker writes its values there
(prometheus_client's multiprocess mode, chosen when the library is first imported); whichever worker answers
``/metrics`` or ``/health/ready`` reads all of them. Gauges of live processes only (``livesum``/``liveall``) lose a
dead worker's files through :func:`sweep_dead_processes`, which ``varsr serve`` runs while it supervises the group.
Without that folder (a plain ``mlflow models serve``, or ``mlflow.pyfunc.load_model``) the values are this process's.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKERS_ENV = "VARSR_SERVE_WORKERS"  # processes the pod runs (readiness waits for all of them)
MODEL_NAME_ENV, MODEL_VERSION_ENV, MODEL_ALIAS_ENV = "VARSR_MODEL_NAME", "VARSR_MODEL_VERSION", "VARSR_MODEL_ALIAS"
METRICS_PATH, LIVE_PATH, READY_PATH = "/metrics", "/health/live", "/health/ready"
MODEL_LABELS = ("model", "version", "alias")
# request latency: a tiny model answers in tens of ms on a CPU, the released one in seconds to minutes
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
MEMORY_REFRESH_S = 5.0


@dataclass(frozen=True)
class ModelLabels:
    """The registered model this server runs: name, version, alias ("" where not known)."""

    name: str = ""
    version: str = ""
    alias: str = ""

    @classmethod
    def from_env(cls) -> "ModelLabels":
        return cls(
            os.environ.get(MODEL_NAME_ENV, ""),
            os.environ.get(MODEL_VERSION_ENV, ""),
            os.environ.get(MODEL_ALIAS_ENV, ""),
        )

    def env(self) -> dict[str, str]:
        return {MODEL_NAME_ENV: self.name, MODEL_VERSION_ENV: self.version, MODEL_ALIAS_ENV: self.alias}

    def values(self) -> tuple[str, str, str]:
        return (self.name, self.version, self.alias)


def parse_model_uri(uri: str) -> tuple[str, str, str]:
    """(name, version, alias) named by a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI; "" for the rest."""
    m = re.match(r"^models:/([^/@]+)(?:@([^/]+)|/([^/]+))?/?$", uri.strip())
    if not m:
        return ("", "", "")
    name, alias, version = m.group(1), m.group(2) or "", m.group(3) or ""
    if version and not version.isdigit():  # models:/NAME/latest or a stage
        alias, version = version, ""
    return (name, version, alias)


def multiproc_dir() -> str | None:
    raw = os.environ.get(MULTIPROC_ENV, "").strip()
    return raw or None


def resident_memory_bytes() -> int:
    """This process's resident set size (psutil), 0 where it cannot be read."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - a missing reading must not fail a request
        return 0


class ServeMetrics:
    """The endpoint's collectors, in a registry of their own (a model loaded twice in one process must not clash
    with itself in the global one); the values go to ``$PROMETHEUS_MULTIPROC_DIR`` when it is set."""

    def __init__(self, labels: ModelLabels | None = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.labels = labels or ModelLabels.from_env()
        self.registry = CollectorRegistry(auto_describe=True)
        r, ml = self.registry, MODEL_LABELS
        self.requests = Counter(
            "varsr_requests",
            "/invocations requests answered, by HTTP status code (499: the client went away before the answer)",
            ml + ("code",),
            registry=r,
        )
        self.latency = Histogram(
            "varsr_request_duration_seconds",
            "/invocations latency, arrival to answer",
            ml,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.image_latency = Histogram(
            "varsr_image_duration_seconds",
            "latency of an answered request divided by its images, observed once per image",
            ml,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_images = Histogram(
            "varsr_batch_images", "images per pipeline call (request batching)", ml, buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "varsr_batch_requests", "requests per pipeline call", ml, buckets=BATCH_BUCKETS, registry=r
        )
        self.waiting = Gauge(
            "varsr_requests_waiting",
            "requests waiting for their batch to start",
            ml,
            multiprocess_mode="livesum",
            registry=r,
        )
        self.in_flight = Gauge(
            "varsr_requests_in_flight",
            "/invocations requests held (arrived, not answered)",
            ml,
            multiprocess_mode="livesum",
            registry=r,
        )
        self.images = Counter("varsr_images", "images upscaled and answered", ml, registry=r)
        self.tiles = Counter(
            "varsr_tiles", "latent tiles of the answered requests (rate: tiles per second)", ml, registry=r
        )
        self.refusals = Counter(
            "varsr_refusals", "requests refused before or during their work, by reason", ml + ("reason",), registry=r
        )
        self.memory = Gauge(
            "varsr_process_resident_memory_bytes",
            "resident memory of each server process",
            ml,
            multiprocess_mode="liveall",
            registry=r,
        )
        self.workers_ready = Gauge(
            "varsr_workers_ready",
            "server processes that loaded the model and ran the warm-up call",
            ml,
            multiprocess_mode="livesum",
            registry=r,
        )
        self._lv = self.labels.values()
        self._held = 0  # requests held by this process (the admission limit is per process)
        self._lock = threading.Lock()
        self._memory_thread: threading.Thread | None = None

    # ---- recording -------------------------------------------------------------------------------------------------
    def request_started(self) -> int:
        """One more request held here; returns how many this process held before it."""
        with self._lock:
            before = self._held
            self._held += 1
        self.in_flight.labels(*self._lv).inc()
        return before

    def request_finished(self, code: int, seconds: float) -> None:
        with self._lock:
            self._held -= 1
        self.in_flight.labels(*self._lv).dec()
        self.requests.labels(*self._lv, str(code)).inc()
        self.latency.labels(*self._lv).observe(seconds)

    def held(self) -> int:
        return self._held

    def refused(self, reason: str) -> None:
        self.refusals.labels(*self._lv, reason).inc()

    def answered(self, images: int, tiles: int, seconds: float) -> None:
        """An /invocations request answered with ``images`` images made of ``tiles`` latent tiles."""
        self.images.labels(*self._lv).inc(images)
        self.tiles.labels(*self._lv).inc(tiles)
        per_image = self.image_latency.labels(*self._lv)
        for _ in range(images):
            per_image.observe(seconds / max(1, images))

    def batch(self, n_requests: int, n_images: int) -> None:
        self.batch_requests.labels(*self._lv).observe(n_requests)
        self.batch_images.labels(*self._lv).observe(n_images)

    def waiting_changed(self, delta: int) -> None:
        self.waiting.labels(*self._lv).inc(delta)

    def set_ready(self) -> None:
        self.workers_ready.labels(*self._lv).set(1)

    def update_memory(self) -> None:
        self.memory.labels(*self._lv).set(resident_memory_bytes())

    def start_memory_refresh(self, every_s: float = MEMORY_REFRESH_S) -> None:
        """Refresh this process's memory reading every ``every_s`` seconds (idle workers report too)."""
        if self._memory_thread is not None:
            return

        def loop():
            while True:
                self.update_memory()
                time.sleep(every_s)

        self._memory_thread = threading.Thread(target=loop, name="varsr-metrics-memory", daemon=True)
        self._memory_thread.start()

    # ---- reading ---------------------------------------------------------------------------------------------------
    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of ``/metrics``: every process's values in multiprocess mode, else this one's."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        self.update_memory()
        path = multiproc_dir()
        if path is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        reg = CollectorRegistry()
        MultiProcessCollector(reg, path=path)
        return generate_latest(reg), CONTENT_TYPE_LATEST

    def pod_state(self) -> dict[str, float]:
        """``{"in_flight", "workers_ready"}`` summed over the pod's live processes (this process's without the
        multiprocess folder)."""
        path = multiproc_dir()
        names = {"varsr_requests_in_flight": "in_flight", "varsr_workers_ready": "workers_ready"}
        out = {"in_flight": 0.0, "workers_ready": 0.0}
        if path is None:
            for metric in self.registry.collect():
                for s in metric.samples:
                    if s.name in names:
                        out[names[s.name]] += s.value
            return out
        from prometheus_client.multiprocess import MultiProcessCollector

        files = glob.glob(os.path.join(path, "gauge_livesum_*.db"))
        for metric in MultiProcessCollector.merge(files, accumulate=True):
            for s in metric.samples:
                if s.name in names:
                    out[names[s.name]] += s.value
        return out


_METRICS: ServeMetrics | None = None
_METRICS_LOCK = threading.Lock()


def get_metrics() -> ServeMetrics:
    """This process's one :class:`ServeMetrics` (model labels from the environment)."""
    global _METRICS
    with _METRICS_LOCK:
        if _METRICS is None:
            _METRICS = ServeMetrics()
        return _METRICS


# ---- health --------------------------------------------------------------------------------------------------------
class Health:
    """Warm-up state of this process and the pod's readiness (see the module docstring)."""

    def __init__(self, metrics: ServeMetrics, max_queued_requests: int, workers: int | None = None):
        self.metrics = metrics
        self.max_queued_requests = int(max_queued_requests)
        self.workers = max(1, int(workers if workers is not None else os.environ.get(WORKERS_ENV, "1") or 1))
        self.warm = False
        self.warm_error: str | None = None
        self.warmup_s: float | None = None

    def warmed_up(self, seconds: float) -> None:
        self.warm, self.warmup_s = True, seconds
        self.metrics.set_ready()

    def warmup_failed(self, reason: str) -> None:
        self.warm_error = reason

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, details): ready when this process and every other worker are warm and the pod's held requests
        are under ``workers x serving.max_queued_requests``."""
        state = self.metrics.pod_state()
        limit = self.workers * self.max_queued_requests
        ready_workers = int(state["workers_ready"]) if multiproc_dir() else int(self.warm)
        details: dict[str, Any] = {
            "workers": self.workers,
            "workers_ready": ready_workers,
            "requests_held": int(state["in_flight"]),
            "queue_limit": limit,
        }
        if self.warm_error is not None:
            details["reason"] = f"the warm-up call failed: {self.warm_error}"
        elif not self.warm:
            details["reason"] = "warming up: the model is loaded, its first call has not finished"
        elif ready_workers < self.workers:
            details["reason"] = f"{ready_workers} of {self.workers} worker processes are warm"
        elif state["in_flight"] >= limit:
            details["reason"] = (
                f"the queue is full: {int(state['in_flight'])} requests held, limit {limit} "
                f"(workers x serving.max_queued_requests)"
            )
        ready = "reason" not in details
        details["ready"] = ready
        return ready, details


def sweep_dead_processes(path: str | Path) -> list[int]:
    """Drop the live-gauge files of processes that are gone (a worker that crashed or was replaced), so that
    ``varsr_requests_in_flight`` and ``varsr_workers_ready`` count live workers only; returns their pids."""
    from prometheus_client.multiprocess import mark_process_dead

    dead = set()
    for f in glob.glob(os.path.join(str(path), "gauge_live*_*.db")):
        m = re.search(r"_(\d+)\.db$", f)
        if not m:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            dead.add(pid)
        except PermissionError:
            pass
    for pid in sorted(dead):
        mark_process_dead(pid, str(path))
    return sorted(dead)


__all__ = [
    "ServeMetrics",
    "Health",
    "ModelLabels",
    "get_metrics",
    "parse_model_uri",
    "sweep_dead_processes",
    "MULTIPROC_ENV",
    "WORKERS_ENV",
    "METRICS_PATH",
    "LIVE_PATH",
    "READY_PATH",
    "LATENCY_BUCKETS",
]
