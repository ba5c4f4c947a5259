"""Request batching for the served model: concurrent ``predict()`` calls share pipeline calls.

MLflow's scoring server (``mlflow models serve``: uvicorn + FastAPI, one process per ``--workers``) runs every
``/invocations`` request's ``predict()`` in its own thread (``asyncio.to_thread``), so requests that arrive together
are in ``predict()`` at the same time. :class:`RequestBatcher` sits between those threads and the pipeline: each
thread hands its (already validated) work over with :meth:`RequestBatcher.submit` and blocks; worker threads gather
pending work with the same key (the request's params), waiting at most ``wait_s`` after the oldest one arrived for
more to join, up to ``max_batch`` images, and make one call for the lot. Every request gets back exactly its own
results, as soon as they are ready (``deliver``), not when the whole batch is. When a batch fails, the requests it
had not answered yet are retried one by one, so an error reaches only the request that caused it. A request
submitted with ``cancelled`` (its deadline passed, its client went away: inference/guard.py) that is cancelled
before its batch runs is dropped from the queue, and one that the batch left unanswered is not retried: it gets
:class:`JobCancelled` (the run function is expected to skip its work between tiles).

The module knows nothing about images or models: ``run(key, payloads, deliver)`` does the work, calling
``deliver(i, result)`` for payload i as soon as it is done, or returning the results in payload order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional, Sequence

log = logging.getLogger(__name__)

Deliver = Callable[[int, Any], None]
RunBatch = Callable[[Hashable, list[Any], Deliver], Optional[Sequence[Any]]]


class JobCancelled(RuntimeError):
    """The request was cancelled (deadline, client gone) before its work was done."""


@dataclass
class _Job:
    """One request's work waiting for (or in) a batch."""

    key: Hashable
    payload: Any
    size: int  # images, counted against max_batch
    arrived: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)
    cancelled: Optional[Callable[[], bool]] = None

    def is_cancelled(self) -> bool:
        return self.cancelled is not None and bool(self.cancelled())


@dataclass
class BatchStats:
    """What the batcher has run so far (for logs, benchmarks and tests)."""

    batches: int = 0
    requests: int = 0
    images: int = 0
    largest_batch_requests: int = 0
    retried_alone: int = 0  # requests re-run alone after their batch failed
    cancelled: int = 0  # requests dropped because they were cancelled before their work was done


class RequestBatcher:
    """Collects concurrent requests with the same key into batches run by ``run``.

    ``max_batch``: images per batch (a single request larger than that still runs, alone). ``wait_s``: how long the
    oldest pending request waits for others with its key; 0 takes only what is already pending. ``workers``: batches
    in progress at once (each worker gathers a batch, runs it, delivers it; while one runs, the next gathers).
    ``on_batch(key, n_requests, n_images)`` is called before each batch runs.
    """

    def __init__(
        self,
        run: RunBatch,
        *,
        max_batch: int,
        wait_s: float,
        workers: int = 1,
        on_batch: Callable[[Hashable, int, int], None] | None = None,
        name: str = "varsr-batcher",
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s}")
        self._run_batch = run
        self.max_batch = int(max_batch)
        self.wait_s = float(wait_s)
        self.workers = max(1, int(workers))
        self._on_batch = on_batch
        self._name = name
        self._cond = threading.Condition()
        self._collect = threading.Lock()  # one worker gathers at a time, so no two take the same request
        self._pending: deque[_Job] = deque()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.stats = BatchStats()

    # ---- client side ---------------------------------------------------------------------------------------------
    def submit_async(
        self, key: Hashable, payload: Any, size: int = 1, cancelled: Callable[[], bool] | None = None
    ) -> Future:
        """Queue one request's work; the future resolves to its own result (or raises its own error, or
        :class:`JobCancelled` once ``cancelled()`` is true and its work was not done)."""
        job = _Job(key, payload, max(1, int(size)), cancelled=cancelled)
        with self._cond:
            if self._closed:
                raise RuntimeError("the request batcher is closed")
            self._start_workers()
            self._pending.append(job)
            self._cond.notify_all()
        return job.future

    def submit(self, key: Hashable, payload: Any, size: int = 1, timeout: float | None = None) -> Any:
        """:meth:`submit_async` and wait for the result."""
        return self.submit_async(key, payload, size).result(timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Run what is pending, then stop the workers; later submits raise."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)

    # ---- workers -------------------------------------------------------------------------------------------------
    def _start_workers(self) -> None:
        """Start the worker threads on first use (daemon: a stopping server never waits for an idle batcher)."""
        while len(self._threads) < self.workers:
            t = threading.Thread(target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True)
            self._threads.append(t)
            t.start()

    def _work(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            if jobs:
                self._run(jobs)

    def _take(self) -> list[_Job] | None:
        """The next batch: the oldest pending request and, in arrival order, the pending ones with its key that fit,
        after waiting until ``max_batch`` images are pending or ``wait_s`` has passed since the oldest arrived.
        None when closed and nothing is left."""
        with self._collect, self._cond:
            while not self._pending:
                if self._closed:
                    return None
                self._cond.wait()
            self._drop_cancelled()
            if not self._pending:
                return []
            first = self._pending[0]
            deadline = first.arrived + self.wait_s
            while not self._closed:
                waiting = sum(j.size for j in self._pending if j.key == first.key)
                remaining = deadline - time.monotonic()
                if waiting >= self.max_batch or remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._drop_cancelled()
            taken: list[_Job] = []
            total = 0
            for job in self._pending:
                if job.key != first.key:
                    continue
                if taken and total + job.size > self.max_batch:
                    break  # keep arrival order within a key: later ones wait for the next batch
                taken.append(job)
                total += job.size
            for job in taken:
                self._pending.remove(job)
            return taken

    def _drop_cancelled(self) -> None:
        """Answer and remove the pending requests that were cancelled (called with ``_cond`` held)."""
        for job in [j for j in self._pending if j.is_cancelled()]:
            self._pending.remove(job)
            self.stats.cancelled += 1
            if not job.future.done():
                job.future.set_exception(JobCancelled("cancelled before its work started"))

    def _run(self, jobs: list[_Job]) -> None:
        """Run one batch, answering each request as soon as ``run`` delivers it; when the batch fails, run the requests
        it had not answered yet one by one."""
        key = jobs[0].key
        n_images = sum(j.size for j in jobs)
        with self._cond:
            self.stats.batches += 1
            self.stats.requests += len(jobs)
            self.stats.images += n_images
            self.stats.largest_batch_requests = max(self.stats.largest_batch_requests, len(jobs))

        def deliver(i: int, result: Any) -> None:
            if not jobs[i].future.done():
                jobs[i].future.set_result(result)

        try:
            if self._on_batch is not None:
                self._on_batch(key, len(jobs), n_images)
            results = self._run_batch(key, [j.payload for j in jobs], deliver)
            if results is not None:
                results = list(results)
                if len(results) != len(jobs):
                    raise RuntimeError(f"batch returned {len(results)} results for {len(jobs)} requests")
                for i, r in enumerate(results):
                    deliver(i, r)
            missing = [j for j in jobs if not j.future.done()]
            if missing:
                raise RuntimeError(f"batch answered {len(jobs) - len(missing)} of {len(jobs)} requests")
        except Exception as e:  # noqa: BLE001 - delivered to the request(s) it belongs to
            gone = [j for j in jobs if not j.future.done() and j.is_cancelled()]
            for job in gone:  # cancelled ones are not retried: nobody waits for them
                job.future.set_exception(JobCancelled("cancelled while its batch ran"))
            with self._cond:
                self.stats.cancelled += len(gone)
            left = [j for j in jobs if not j.future.done()]
            if len(left) == 1 and len(jobs) == 1:
                left[0].future.set_exception(e)
                return
            if not left:
                return
            log.warning(
                "a batch of %d requests failed (%s: %s); running the %d unanswered alone",
                len(jobs),
                type(e).__name__,
                e,
                len(left),
            )
            with self._cond:
                self.stats.retried_alone += len(left)
            for job in left:
                self._run([job])


__all__ = ["RequestBatcher", "BatchStats", "JobCancelled"]
