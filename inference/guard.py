"""Limits of the served endpoint that MLflow's scoring server does not have (inference/README.md, "Limits of the
served endpoint"; issue 28, findings 1-4).

- :class:`RequestGuard`, an ASGI wrapper put around MLflow's FastAPI app from inside the server process
  (:func:`install_request_guard`), sits before MLflow's parser: it refuses bodies over ``serving.max_request_bytes``
  (413, unread past the limit), JSON that does not parse or is nested deeper than ``serving.max_json_depth`` (400,
  where MLflow answers 500 for a RecursionError and echoes a malformed body whole), and rewrites every error reply
  into ``{"error_code", "message"}`` with a message of at most ``serving.max_error_chars`` characters that never
  repeats the request (MLflow prefixes model errors with ``Failed to predict data '<the input>'``).
- Each /invocations request gets a :class:`RequestControl` (deadline ``serving.request_timeout_s`` from arrival, and
  a cancel flag the guard sets when the client goes away or the deadline passes), visible to ``predict()`` through a
  context variable (``asyncio.to_thread`` copies it into the request's thread); the pipeline asks it between tiles.
- :func:`estimate_request` gives the work (latent tiles x autoregressive steps) and an upper estimate of the memory
  of a request from its tiling plan, before any pixel is touched.
- With the endpoint's metrics and health (inference/serve_metrics.py), the guard answers ``/metrics``,
  ``/health/live`` and ``/health/ready``, records each /invocations request, and refuses one with 503 (and
  ``Retry-After``) while its process already holds ``serving.max_queued_requests`` (load shedding).
- :func:`start_orphan_watchdog`: when the ``varsr serve`` process that started the server is gone (even by
  SIGKILL), every uvicorn process cancels its requests and kills itself after ``serving.orphan_grace_s``.

Nothing here imports torch; only the standard library (the served model ships this module; inference/
serve_metrics.py brings prometheus_client where metrics are on).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
import os
import re
import select
import signal
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

SERVE_PID_ENV = "VARSR_SERVE_PID"  # set by `varsr serve`: the process whose death takes the server down
SCORING_APP_MODULE = "mlflow.pyfunc.scoring_server.app"  # the module uvicorn serves (`mlflow models serve`)
INVOCATIONS = "/invocations"
_TRUNCATED = " [... truncated]"


class RequestCancelled(RuntimeError):
    """The request's work was stopped: its deadline passed or its client went away (``reason`` says which)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)
class RequestControl:
    """Deadline and cancel flag of one request; ``check()`` between tiles raises :class:`RequestCancelled`."""

    timeout_s: float
    arrived: float = field(default_factory=time.monotonic)
    reason: str | None = None
    _event: threading.Event = field(default_factory=threading.Event)

    @property
    def deadline(self) -> float:
        return self.arrived + self.timeout_s

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def cancel(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def cancelled(self) -> bool:
        if not self._event.is_set() and time.monotonic() >= self.deadline:
            self.cancel(f"the request took longer than serving.request_timeout_s={self.timeout_s:g} s")
        return self._event.is_set()

    def check(self) -> None:
        if self.cancelled():
            raise RequestCancelled(self.reason or "cancelled")


_CURRENT: contextvars.ContextVar[RequestControl | None] = contextvars.ContextVar("varsr_request", default=None)
_LIVE: "weakref.WeakSet[RequestControl]" = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def current_control() -> RequestControl | None:
    """The control of the request this code runs for; None outside a guarded server (``pyfunc.load_model``)."""
    return _CURRENT.get()


def cancel_all(reason: str) -> int:
    """Cancel every request in flight in this process; returns how many."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for c in live:
        c.cancel(reason)
    return len(live)


# ---- work and memory estimate --------------------------------------------------------------------------------------
@dataclass
class RequestEstimate:
    """What a request will cost, from its tiling plan: tiles, AR steps per tile, work (tile-steps), peak bytes."""

    tiles: int
    steps: int
    work: int
    memory_bytes: int


def image_memory_bytes(
    target_hw: tuple[int, int],
    padded_hw: tuple[int, int],
    n_tiles: int,
    *,
    decoder_ch: int,
    latent_ch: int,
    latent_side: int,
    input_px: int,
) -> int:
    """Upper estimate of the memory one image takes in the pipeline (inference/pipeline.py), in bytes.

    Per target pixel: the float32 bicubic LR (12 B) and its uint8 resize (3 B), the decoded image and its crop, the
    colour fix's float copies (about 6 x 12 B) and the PNG / base64 output (about 8 B). Per padded pixel: the padded
    float32 copy (12 B) and the VQVAE decoder's activations at full resolution (about 4 tensors of ``decoder_ch``
    float32 channels alive at once, which dominate). Per tile: its f_hat latent (float32). Plus the decoded input.
    """
    t = target_hw[0] * target_hw[1]
    pad = padded_hw[0] * padded_hw[1]
    return int(
        t * (12 + 3 + 12 + 72 + 8)
        + pad * (12 + 16 * decoder_ch)
        + n_tiles * latent_ch * latent_side * latent_side * 4
        + 3 * input_px
    )


def estimate_request(pipeline, sizes: Iterable[tuple[int, int]], params) -> RequestEstimate:
    """Work and memory of upscaling images of ``sizes`` ((width, height) each) with ``params``, from
    :meth:`inference.pipeline.VARSRPipeline.plan_size` alone (no pixels touched, nothing generated)."""
    cfg = pipeline.model_cfg
    steps = len(cfg.patch_nums)
    vq = cfg.vqvae
    decoder_ch = int(vq.ch) * int(vq.ch_mult[0])
    tiles = 0
    mem = 0
    for w, h in sizes:
        target_hw, padded_hw, grid = pipeline.plan_size(w, h, params)
        tiles += len(grid)
        mem += image_memory_bytes(
            target_hw,
            padded_hw,
            len(grid),
            decoder_ch=decoder_ch,
            latent_ch=int(vq.z_channels),
            latent_side=int(pipeline.latent_side),
            input_px=w * h,
        )
    return RequestEstimate(tiles, steps, tiles * steps, mem)


# ---- bounded error replies -----------------------------------------------------------------------------------------
_CODE_RE = re.compile(rb'"error_code"\s*:\s*"([A-Z_]{1,64})"')
_MSG_RE = re.compile(rb'"message"\s*:\s*"')
_DEFAULT_CODES = {
    400: "BAD_REQUEST",
    404: "ENDPOINT_NOT_FOUND",
    405: "BAD_REQUEST",
    413: "REQUEST_LIMIT_EXCEEDED",
    415: "BAD_REQUEST",
    422: "BAD_REQUEST",
    429: "REQUEST_LIMIT_EXCEEDED",
    503: "TEMPORARILY_UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def clean_message(message: str, max_chars: int) -> str:
    """The part of an error message that is about the error, at most ``max_chars`` characters: MLflow's
    ``Failed to predict data '<input>'. \\nError: `` prefix and ``Input: <body>`` suffix are cut off."""
    message = str(message)
    if message.startswith("Failed to predict data"):
        cut = message.rfind("\nError: ")
        message = message[cut + len("\nError: ") :] if cut >= 0 else "the model could not process the request"
    cut = message.find("\nInput:")
    if cut >= 0:
        message = message[:cut]
    message = message.strip()
    if len(message) > max_chars:
        message = message[: max(0, max_chars - len(_TRUNCATED))] + _TRUNCATED
    return message


def bounded_error_body(raw: bytes, complete: bool, status: int, max_chars: int) -> bytes:
    """A JSON error body ``{"error_code", "message"}`` made from an error reply's (possibly cut) body ``raw``."""
    code = None
    message = None
    if complete:
        try:
            obj = json.loads(raw)
            if isinstance(obj, dict):
                code = obj.get("error_code") if isinstance(obj.get("error_code"), str) else None
                message = obj.get("message") if isinstance(obj.get("message"), str) else None
        except (ValueError, RecursionError):
            pass
    if code is None:
        m = _CODE_RE.search(raw[:4096])
        code = (
            m.group(1).decode()
            if m
            else _DEFAULT_CODES.get(status, "INTERNAL_ERROR" if status >= 500 else "BAD_REQUEST")
        )
    if message is None:
        m = _MSG_RE.search(raw)
        text = raw[m.end() :] if m else raw
        message = text.decode("utf-8", errors="replace")
        if m:  # a cut JSON string: undo the common escapes, drop the closing quote if it is there
            message = message.split('"}', 1)[0].replace("\\n", "\n").replace('\\"', '"')
    return json.dumps({"error_code": code, "message": clean_message(message, max_chars)}).encode()


def json_problem(body: bytes, max_depth: int) -> str | None:
    """Why ``body`` is not acceptable request JSON (a short reason that quotes none of it), or None."""
    try:
        obj = json.loads(body)
    except RecursionError:
        return f"the request JSON is nested too deeply (limit serving.max_json_depth={max_depth})"
    except UnicodeDecodeError as e:
        return f"the request body is not UTF-8 (byte {e.start})"
    except json.JSONDecodeError as e:
        return f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
    except ValueError as e:  # e.g. numbers too long to convert
        return f"the request body is not valid JSON: {str(e)[:200]}"
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return f"the request JSON is nested too deeply: more than serving.max_json_depth={max_depth} levels"
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return None


# ---- the ASGI guard ------------------------------------------------------------------------------------------------
@dataclass
class GuardLimits:
    """The ``serving`` settings the guard enforces (inference/config.py: ServingConfig)."""

    max_request_bytes: int
    max_json_depth: int
    max_error_chars: int
    request_timeout_s: float
    reply_grace_s: float = 2.0  # after the deadline, how long predict() has to answer before the guard does
    max_queued_requests: int = 0  # requests this process holds at once; more get a 503 (0: no limit)

    @classmethod
    def from_serving(cls, sv) -> "GuardLimits":
        return cls(
            int(sv.max_request_bytes),
            int(sv.max_json_depth),
            int(sv.max_error_chars),
            float(sv.request_timeout_s),
            max_queued_requests=int(getattr(sv, "max_queued_requests", 0)),
        )


def _header(scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers") or ():
        if k.lower() == name:
            return v
    return None


class RequestGuard:
    """ASGI app wrapping MLflow's scoring app (see the module docstring). Counters in ``stats``.

    With ``metrics`` and ``health`` (inference/serve_metrics.py) it also answers ``/metrics``, ``/health/live`` and
    ``/health/ready`` itself, records every /invocations request (status code, latency, held requests, refusals)
    and refuses a request with 503 while this process holds ``limits.max_queued_requests`` already.
    """

    def __init__(self, app, limits: GuardLimits, on_start: Callable[[], Any] | None = None, metrics=None, health=None):
        self.app = app
        self.limits = limits
        self._on_start = on_start
        self.metrics = metrics
        self.health = health
        self.stats = {
            "requests": 0,
            "too_large": 0,
            "bad_json": 0,
            "timed_out": 0,
            "client_gone": 0,
            "errors_bounded": 0,
            "queue_full": 0,
        }

    async def _reply(
        self, send, status: int, code: str, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        body = json.dumps({"error_code": code, "message": clean_message(message, self.limits.max_error_chars)}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _plain(self, send, status: int, body: bytes, content_type: str) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _operations(self, path: str, send) -> bool:
        """Answer ``/metrics`` and the health endpoints; False for any other path."""
        from .serve_metrics import LIVE_PATH, METRICS_PATH, READY_PATH

        if path == METRICS_PATH:
            body, ctype = await asyncio.to_thread(self.metrics.exposition)
            await self._plain(send, 200, body, ctype)
        elif path == LIVE_PATH:
            await self._plain(send, 200, b'{"live": true}', "application/json")
        elif path == READY_PATH and self.health is not None:
            ready, details = await asyncio.to_thread(self.health.readiness)
            await self._plain(send, 200 if ready else 503, json.dumps(details).encode(), "application/json")
        else:
            return False
        return True

    async def __call__(self, scope, receive, send):
        if self._on_start is not None:
            on_start, self._on_start = self._on_start, None
            try:
                on_start()
            except Exception:  # a setup step must not take the server down
                log.exception("request guard: start-up step failed")
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "").rstrip("/")
        if self.metrics is not None and scope.get("method", "GET") == "GET" and await self._operations(path, send):
            return None
        if path != INVOCATIONS:
            return await self.app(scope, receive, self._bounding_send(send, None))
        if self.metrics is None:
            return await self._invocation(scope, receive, send)
        arrived = time.monotonic()
        held_before = self.metrics.request_started()
        seen: dict[str, int] = {}

        async def observed(msg):
            if msg["type"] == "http.response.start":
                seen.setdefault("status", int(msg["status"]))
            return await send(msg)

        try:
            cap = self.limits.max_queued_requests
            if cap > 0 and held_before >= cap:
                self.stats["queue_full"] += 1
                self.metrics.refused("queue_full")
                await self._reply(
                    observed,
                    503,
                    "TEMPORARILY_UNAVAILABLE",
                    f"this server holds {held_before} requests, its limit "
                    f"(serving.max_queued_requests={cap}); retry shortly or on another replica",
                    headers=((b"retry-after", b"1"),),
                )
                return None
            await self._invocation(scope, receive, observed)
        except Exception:
            seen.setdefault("status", 500)  # uvicorn answers 500 for an exception out of the app
            raise
        finally:
            self.metrics.request_finished(seen.get("status", 499), time.monotonic() - arrived)

    def _refused(self, reason: str) -> None:
        self.stats[reason] += 1
        if self.metrics is not None:
            self.metrics.refused(reason)

    async def _invocation(self, scope, receive, send):
        """One /invocations request through the limits (see the module docstring)."""
        lim = self.limits
        self.stats["requests"] += 1
        too_large = (
            f"the request body is larger than serving.max_request_bytes={lim.max_request_bytes} bytes; "
            f"send fewer or smaller images per request, or upscale large sets with `varsr upscale`"
        )
        cl = _header(scope, b"content-length")
        if cl is not None and cl.strip().isdigit() and int(cl) > lim.max_request_bytes:
            self._refused("too_large")
            return await self._reply(send, 413, "REQUEST_LIMIT_EXCEEDED", too_large)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                self._refused("client_gone")
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > lim.max_request_bytes:
                self._refused("too_large")
                return await self._reply(send, 413, "REQUEST_LIMIT_EXCEEDED", too_large)
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        ctype = (_header(scope, b"content-type") or b"").split(b";")[0].strip().lower()
        if ctype == b"application/json":
            problem = await asyncio.to_thread(json_problem, body, lim.max_json_depth)
            if problem is not None:
                self._refused("bad_json")
                return await self._reply(send, 400, "BAD_REQUEST", problem)

        control = RequestControl(lim.request_timeout_s)
        with _LIVE_LOCK:
            _LIVE.add(control)
        gone = asyncio.Event()
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        started = {"v": False, "done": False}

        async def watch_client():
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    if not started["done"]:  # uvicorn also says "disconnect" once the reply is complete
                        self._refused("client_gone")
                        control.cancel("the client went away")
                    gone.set()
                    return

        inner_send = self._bounding_send(send, started)
        token = _CURRENT.set(control)
        watcher = asyncio.create_task(watch_client())
        try:
            await asyncio.wait_for(
                self.app(scope, replay, inner_send), timeout=lim.request_timeout_s + lim.reply_grace_s
            )
        except (asyncio.TimeoutError, TimeoutError):
            self._refused("timed_out")
            control.cancel(f"the request took longer than serving.request_timeout_s={lim.request_timeout_s:g} s")
            if not started["v"] and not gone.is_set():
                await self._reply(
                    send,
                    504,
                    "DEADLINE_EXCEEDED",
                    f"the request took longer than serving.request_timeout_s={lim.request_timeout_s:g}"
                    f" s and was stopped; upscale large images with `varsr upscale` or a batch job",
                )
        finally:
            _CURRENT.reset(token)
            control.cancel("the request has finished")  # whatever is still running for it stops at the next tile
            watcher.cancel()
            with _LIVE_LOCK:
                _LIVE.discard(control)

    def _bounding_send(self, send, started: dict | None):
        """``send`` that passes success replies through and turns error replies into bounded JSON bodies."""
        lim = self.limits
        cap = 64 * 1024 + 4 * lim.max_error_chars
        state: dict[str, Any] = {"start": None, "buf": bytearray(), "complete": True}

        async def bounded(msg):
            kind = msg["type"]
            if kind == "http.response.body" and started is not None and not msg.get("more_body", False):
                started["done"] = True
            if kind == "http.response.start":
                if started is not None:
                    started["v"] = True
                if msg["status"] < 400:
                    return await send(msg)
                state["start"] = msg  # an error: hold the start until the body is known
                return
            if kind == "http.response.body" and state["start"] is not None:
                buf = state["buf"]
                chunk = msg.get("body", b"")
                room = cap - len(buf)
                if len(chunk) > room:
                    state["complete"] = False
                buf += chunk[: max(0, room)]
                if msg.get("more_body", False):
                    return
                start = state["start"]
                out = bounded_error_body(bytes(buf), state["complete"], start["status"], lim.max_error_chars)
                self.stats["errors_bounded"] += 1
                headers = [
                    (k, v) for k, v in start.get("headers", ()) if k.lower() not in (b"content-length", b"content-type")
                ]
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]
                await send({"type": "http.response.start", "status": start["status"], "headers": headers})
                return await send({"type": "http.response.body", "body": out})
            return await send(msg)

        return bounded


def install_request_guard(
    limits: GuardLimits, on_start: Callable[[], Any] | None = None, metrics=None, health=None
) -> bool:
    """Make the scoring app uvicorn serves run behind :class:`RequestGuard`; False when not inside a scoring server.

    MLflow's ``scoring_server/app.py`` loads the model (this runs from ``load_context``) and then builds its FastAPI
    app in ``scoring_server.init``, which imports ``fastapi.FastAPI`` when it runs; uvicorn (0.55, one worker)
    imports that module before its event loop starts. So the hook is a one-shot subclass put in place of
    ``fastapi.FastAPI`` for that one app: its middleware stack, built by Starlette on the first call (the lifespan
    startup, before the server listens), is wrapped in the guard, the outermost layer, in front of MLflow's timeout
    middleware and parser. The subclass puts the original class back once the app exists. ``on_start()``, if given,
    runs once inside the server's event loop, on the guard's first call (the lifespan startup). ``metrics`` and
    ``health`` (inference/serve_metrics.py) add ``/metrics`` and the health endpoints (see :class:`RequestGuard`).
    """
    module = sys.modules.get(SCORING_APP_MODULE)
    if module is None:
        return False
    import fastapi

    existing = getattr(module, "app", None)
    if existing is not None:  # loaded again into a server that already has its app
        if not isinstance(existing.middleware_stack, RequestGuard):
            if existing.middleware_stack is None:
                existing.middleware_stack = existing.build_middleware_stack()
            existing.middleware_stack = RequestGuard(existing.middleware_stack, limits, on_start, metrics, health)
        return True
    original = fastapi.FastAPI
    if getattr(original, "_varsr_guard_limits", None) is not None:
        return True

    class GuardedFastAPI(original):
        """FastAPI whose middleware stack runs behind the request guard (see install_request_guard)."""

        _varsr_guard_limits = limits

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            fastapi.FastAPI = original  # one app only: the scoring server's

        def build_middleware_stack(self):
            guard = RequestGuard(super().build_middleware_stack(), self._varsr_guard_limits, on_start, metrics, health)
            log.info(
                "request guard: body <= %d bytes, JSON depth <= %d, %g s per request, errors <= %d chars",
                limits.max_request_bytes,
                limits.max_json_depth,
                limits.request_timeout_s,
                limits.max_error_chars,
            )
            return guard

    fastapi.FastAPI = GuardedFastAPI
    return True


# ---- the orphan watchdog -------------------------------------------------------------------------------------------
def _wait_for_exit(pid: int, poll_s: float = 0.5) -> None:
    """Block until process ``pid`` has exited (a pidfd where the kernel has them, else polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            p = select.poll()
            p.register(fd, select.POLLIN)
            while not p.poll(None):
                pass
        finally:
            os.close(fd)
        return
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass
        time.sleep(poll_s)


def start_orphan_watchdog(grace_s: float, pid: int | None = None, on_orphan: Callable[[], None] | None = None) -> bool:
    """Watch ``pid`` (default: ``$VARSR_SERVE_PID``, set by ``varsr serve``); when it has exited, cancel this
    process's requests, wait ``grace_s`` seconds and SIGKILL this process. False when there is nothing to watch.

    The kernel's parent-death signal reaches only mlflow (``varsr serve``'s child) and uvicorn (mlflow's); uvicorn
    answers SIGTERM by waiting for the requests in flight, which can take hours, and its ``--workers`` processes
    have no parent-death signal. This thread, started in every process that loads the model, covers all of them.
    """
    if pid is None:
        raw = os.environ.get(SERVE_PID_ENV, "").strip()
        if not raw.isdigit():
            return False
        pid = int(raw)

    def watch():
        _wait_for_exit(pid)
        n = cancel_all("the server is shutting down (varsr serve is gone)")
        log.warning("varsr serve (pid %d) is gone: cancelled %d request(s); exiting in %g s", pid, n, grace_s)
        if on_orphan is not None:
            on_orphan()
            return
        time.sleep(grace_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="varsr-orphan-watchdog", daemon=True).start()
    return True


def timeout_env_seconds(request_timeout_s: float, margin_s: float = 5.0) -> str:
    """MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT for a budget of ``request_timeout_s``: a little above it, so that the
    guard answers (504, with the reason) and cancels the work before MLflow's own timeout does."""
    return str(int(math.ceil(request_timeout_s + margin_s)))


__all__ = [
    "RequestGuard",
    "GuardLimits",
    "RequestControl",
    "RequestCancelled",
    "RequestEstimate",
    "current_control",
    "cancel_all",
    "estimate_request",
    "install_request_guard",
    "start_orphan_watchdog",
    "json_problem",
    "bounded_error_body",
    "clean_message",
    "SERVE_PID_ENV",
]
