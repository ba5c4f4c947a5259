"""The VARSR MLflow pyfunc model (docs/CONTRACTS.md, "MLflow model").

Input: a DataFrame with a string column ``image`` (base64 PNG/JPEG, one image per row) and params ``scale``,
``cfg``, ``seed`` (-1 = random), ``top_k``, ``top_p``, ``tile`` (-1 = auto, N >= 0 = force latent tiling with N
cells of overlap) and ``color_fix``. Output: a DataFrame with ``image`` (base64 PNG), ``width``, ``height``.
Bad requests raise ``MlflowException(INVALID_PARAMETER_VALUE)``, which the scoring server turns into HTTP 400 with the
message (no stack trace); the server keeps answering.

Serving: MLflow's scoring server runs each request's ``predict`` in its own thread, so concurrent requests meet here.
Each thread checks and decodes its own request, then hands the images to a :class:`inference.batching.RequestBatcher`
(config ``serving``), which runs requests with the same params together through
:meth:`inference.pipeline.VARSRPipeline.upscale_requests`; each thread encodes its own results. ``serving.
max_batch_images: 1`` runs every request alone through :meth:`~inference.pipeline.VARSRPipeline.upscale`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import TimeoutError as FuturesTimeout
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from infra.core.config import save_config

from .config import InferenceConfig
from .images import ImageInputError, decode_base64_image, encode_png_base64

log = logging.getLogger(__name__)

ARTIFACT_CHECKPOINT = "checkpoint"
ARTIFACT_CONFIG = "inference_config"
CONFIG_FILENAME = "inference.yaml"
ARTIFACT_CONFIG_PATH = f"artifacts/{CONFIG_FILENAME}"  # where the logged model keeps it (MLflow's artifacts/ folder)
REPO_ROOT = Path(__file__).resolve().parent.parent
SERVED_ENTRY = "inference.mlflow_model"  # the served model ships this module and everything it can import
SERVING_OVERRIDES_ENV = "VARSR_SERVING_OVERRIDES"  # JSON list of key=value set by `varsr serve --set`
SERVE_TIME_SECTIONS = ("serving", "runtime")  # what `varsr serve --set` may change; limits stay as registered
PIP_REQUIREMENTS = [
    "mlflow==3.17.2",
    "torch==2.13.0",
    "pillow==13.0.0",
    "numpy==2.4.6",
    "pandas==3.1.1",
    "safetensors==0.8.0",
    "pyyaml==6.0.4",
    "pydantic==2.14.4",
    "prometheus-client==0.26.0",
    "psutil==7.2.2",
]


def bad_request(msg: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400 and ``msg``."""
    return MlflowException(msg, error_code=INVALID_PARAMETER_VALUE)


def signature(config: InferenceConfig) -> ModelSignature:
    """Input ``image`` (string), output image/width/height, params with the config's defaults."""
    s = config.sampling
    params = ParamSchema(
        [
            ParamSpec("scale", "double", float(s.scale)),
            ParamSpec("cfg", "double", float(s.cfg)),
            ParamSpec("seed", "long", -1),
            ParamSpec("top_k", "long", int(s.top_k)),
            ParamSpec("top_p", "double", float(s.top_p)),
            ParamSpec("tile", "long", -1),
            ParamSpec("color_fix", "string", str(s.color_fix)),
        ]
    )
    return ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        outputs=Schema([ColSpec("string", "image"), ColSpec("long", "width"), ColSpec("long", "height")]),
        params=params,
    )


def example_input() -> pd.DataFrame:
    """A small real photo (a 16x16 crop of skimage's astronaut, PNG, base64) in the request format."""
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize((64, 64), Image.Resampling.BICUBIC).crop((24, 8, 40, 24))
    return pd.DataFrame({"image": [encode_png_base64(img)]})


def check_serve_overrides(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """``varsr serve --set`` items: only ``serving.*`` and ``runtime.*`` keys (the limits and sampling defaults are
    the registered model's), each valid for :class:`InferenceConfig`; raises ValueError naming the bad one."""
    from infra.core.config import parse_override

    from .config import load_inference_config

    items = [str(o) for o in overrides]
    for item in items:
        keys, _ = parse_override(item)
        if keys[0] not in SERVE_TIME_SECTIONS:
            raise ValueError(
                f"--set {item}: only {', '.join(s + '.*' for s in SERVE_TIME_SECTIONS)} can be set when "
                f"serving (limits and defaults are the registered model's)"
            )
    load_inference_config(None, items)  # types and key names
    return items


def serve_time_overrides() -> list[str]:
    """The ``--set`` items ``varsr serve`` passed to this server process (empty when not served by it)."""
    raw = os.environ.get(SERVING_OVERRIDES_ENV, "").strip()
    return check_serve_overrides(json.loads(raw)) if raw else []


def widen_request_threads(n: int) -> bool:
    """Give the running event loop's default executor ``n`` threads; False when no loop is running here.

    MLflow's scoring server runs each request's predict() with ``asyncio.to_thread``, i.e. on the event loop's
    default executor (``min(32, cpus + 4)`` threads): no more requests than that can wait together for a batch.
    uvicorn loads the app, and with it this model, inside its running loop, which is where this finds it.
    """
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return False
    loop.set_default_executor(ThreadPoolExecutor(max_workers=n, thread_name_prefix="varsr-request"))
    return True


class VARSRPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around :class:`inference.pipeline.VARSRPipeline`."""

    def load_context(self, context):
        from .config import load_inference_config
        from .pipeline import VARSRPipeline

        self.config = load_inference_config(context.artifacts[ARTIFACT_CONFIG], serve_time_overrides())
        self.pipeline = VARSRPipeline.from_pretrained(context.artifacts[ARTIFACT_CHECKPOINT], config=self.config)
        self.batcher = self._make_batcher()
        self._guard_endpoint()

    def _guard_endpoint(self) -> None:
        """Inside a scoring server: put the request guard in front of MLflow's parser, with the endpoint's metrics
        and health, start the warm-up call, and watch ``varsr serve`` (inference/guard.py, inference/serve_metrics.py;
        inference/README.md, "Limits of the served endpoint" and "Metrics and health")."""
        from .guard import SCORING_APP_MODULE, GuardLimits, install_request_guard, start_orphan_watchdog
        from .serve_metrics import Health, get_metrics

        sv = self.config.serving
        in_server = SCORING_APP_MODULE in sys.modules
        self.metrics = get_metrics() if sv.metrics and in_server else None
        self.health = Health(self.metrics, int(sv.max_queued_requests)) if self.metrics is not None else None
        # uvicorn 0.55 with one worker imports the app (and loads this model) before its event loop runs: the
        # request threads are then widened by the guard, from inside the loop, on its first call (the lifespan
        # startup), which also starts the warm-up call, so /health/live answers while it runs
        widen = not getattr(self, "_threads_widened", True)

        def on_start():
            if widen:
                widen_request_threads(int(sv.request_threads))
            if self.health is not None:
                threading.Thread(target=self._warm_up, name="varsr-warmup", daemon=True).start()

        if install_request_guard(
            GuardLimits.from_serving(sv), on_start=on_start, metrics=self.metrics, health=self.health
        ):
            log.info(
                "scoring server: request guard installed%s",
                "" if self.metrics is None else " with /metrics, /health/live and /health/ready",
            )
            if self.metrics is not None:
                self.metrics.start_memory_refresh()
        else:
            self.metrics = self.health = None
        start_orphan_watchdog(float(sv.orphan_grace_s))

    def _warm_up(self) -> None:
        """One call on a ``serving.warmup_side`` square image with the sampling defaults, through the path a request
        takes (batcher, generate, decode, colour fix); /health/ready waits for it (inference/serve_metrics.py)."""
        import numpy as np
        from PIL import Image

        side = int(self.config.serving.warmup_side)
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
        t0 = time.monotonic()
        try:
            self._run([img], self._params({"seed": 0}), None, record=False)
        except Exception as e:  # the pod stays unready and says why
            log.exception("warm-up call failed; this server will not report ready")
            if self.health is not None:
                self.health.warmup_failed(f"{type(e).__name__}: {str(e)[:300]}")
            return
        dt = time.monotonic() - t0
        log.info("warm-up call done in %.2f s (%dx%d px): ready", dt, side, side)
        if self.health is not None:
            self.health.warmed_up(dt)

    def _make_batcher(self):
        """The request batcher of ``config.serving``; None when batching is off (max_batch_images <= 1)."""
        from .batching import RequestBatcher
        from .pipeline import UpscaleParams

        sv = self.config.serving
        self._threads_widened = sv.request_threads <= 0 or widen_request_threads(int(sv.request_threads))
        if sv.request_threads > 0 and self._threads_widened:
            log.info("scoring server: %d request threads", sv.request_threads)
        if sv.max_batch_images <= 1:
            return None
        fixed = bool(sv.fixed_batch_shape)
        gb = int(sv.generate_batch)
        if gb <= 0:
            gb = self.config.tiling.batch_size if self.pipeline.device.type == "cuda" else 1

        def run(key, requests, deliver):  # requests: (images, RequestControl or None, started or None) each
            controls = [c for _, c, _ in requests]
            for _, _, started in requests:
                if started is not None:
                    started()  # no longer waiting (varsr_requests_waiting)
            metrics = getattr(self, "metrics", None)
            if metrics is not None and any(st is not None for _, _, st in requests):  # not the warm-up call
                metrics.batch(len(requests), sum(len(imgs) for imgs, _, _ in requests))
            self.pipeline.upscale_requests(  # each request is answered through on_done; a cancelled one is not
                [imgs for imgs, _, _ in requests],
                UpscaleParams(*key),
                generate_batch=gb,
                fixed_batch_shape=fixed,
                on_done=deliver,
                cancelled=lambda r: controls[r] is not None and controls[r].cancelled(),
            )

        on_batch = None
        if sv.log_batches:
            blog = logging.getLogger("inference.batching")
            if not blog.handlers:
                handler = logging.StreamHandler(sys.stderr)
                handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
                blog.addHandler(handler)
            blog.setLevel(logging.INFO)

            def on_batch(key, n_requests, n_images):
                blog.info(
                    "batch: %d requests, %d images, params %s",
                    n_requests,
                    n_images,
                    dict(zip((f.name for f in dataclasses.fields(UpscaleParams)), key)),
                )

        log.info(
            "request batching: up to %d images, %.1f ms wait, %d generate() crops per call%s",
            sv.max_batch_images,
            sv.batch_wait_ms,
            gb,
            " (fixed shape)" if fixed else "",
        )
        return RequestBatcher(
            run,
            max_batch=int(sv.max_batch_images),
            wait_s=max(0.0, sv.batch_wait_ms) / 1000.0,
            workers=int(sv.concurrent_batches),
            on_batch=on_batch,
        )

    def _refuse(self, reason: str, msg: str) -> MlflowException:
        """A 400 for ``msg``, counted in ``varsr_refusals_total{reason=...}`` when metrics are on."""
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.refused(reason)
        return bad_request(msg)

    def _params(self, params: dict[str, Any] | None):
        from .pipeline import UpscaleParamError

        p = dict(params or {})
        seed = p.get("seed", -1)
        tile = p.get("tile", -1)
        try:
            return self.pipeline.make_params(
                scale=p.get("scale"),
                cfg=p.get("cfg"),
                top_k=p.get("top_k"),
                top_p=p.get("top_p"),
                seed=None if seed is None or int(seed) < 0 else int(seed),
                color_fix=p.get("color_fix", "default"),
                tile=None if tile is None or int(tile) < 0 else int(tile),
            )
        except (UpscaleParamError, TypeError, ValueError) as e:
            raise self._refuse("bad_params", f"invalid params: {e}") from None

    def _check_budget(self, images, p):
        """Refuse (400) a request whose plan is past the endpoint's work, memory or tile-overlap budget, before any
        generation (inference/guard.py: estimate_request); returns the estimate."""
        from .guard import estimate_request

        sv = self.config.serving
        max_overlap = self.pipeline.latent_side // 2 if sv.max_tile_overlap < 0 else int(sv.max_tile_overlap)
        if p.overlap is not None and p.overlap > max_overlap:
            raise self._refuse(
                "tile_overlap",
                f"invalid params: tile overlap must be in [0, {max_overlap}] latent "
                f"cells on this endpoint (serving.max_tile_overlap), got {p.overlap}",
            )
        est = estimate_request(self.pipeline, [(im.width, im.height) for im in images], p)
        elsewhere = (
            "run it with `varsr upscale` (or as a batch job) instead, or send fewer or smaller images or a "
            "smaller scale"
        )
        if est.work > sv.max_request_work:
            raise self._refuse(
                "work",
                f"request too large for this endpoint: {est.tiles} tiles x {est.steps} steps = "
                f"{est.work} tile-steps, over the budget serving.max_request_work="
                f"{sv.max_request_work}; {elsewhere}",
            )
        mb = est.memory_bytes / 2**20
        if mb > sv.max_request_memory_mb:
            raise self._refuse(
                "memory",
                f"request too large for this endpoint: it needs about {mb:.0f} MB, over the "
                f"budget serving.max_request_memory_mb={sv.max_request_memory_mb}; "
                f"{elsewhere}",
            )
        return est

    def _run(self, images, p, control, record: bool = True):
        """Upscale ``images`` (batched or alone), stopping between tiles once ``control`` is cancelled. ``record``:
        count the request in the batch and waiting metrics (not the warm-up call)."""
        from .batching import JobCancelled
        from .guard import RequestCancelled

        metrics = getattr(self, "metrics", None) if record else None
        started = None
        try:
            if getattr(self, "batcher", None) is None:
                if metrics is not None:
                    metrics.batch(1, len(images))
                return self.pipeline.upscale(
                    images,
                    scale=p.scale,
                    cfg=p.cfg,
                    top_k=p.top_k,
                    top_p=p.top_p,
                    seed=p.seed,
                    color_fix=p.color_fix,
                    tile="auto" if p.overlap is None else p.overlap,
                    check=None if control is None else control.check,
                )
            if metrics is not None:
                started = _Once(lambda: metrics.waiting_changed(-1))
                metrics.waiting_changed(1)
            fut = self.batcher.submit_async(
                dataclasses.astuple(p),
                (images, control, started),
                size=len(images),
                cancelled=None if control is None else control.cancelled,
            )
            if control is None:
                return fut.result()
            while True:  # wait, but answer as soon as the request is cancelled or past its deadline
                try:
                    return fut.result(timeout=max(0.01, min(0.25, control.remaining())))
                except FuturesTimeout:
                    control.check()
        except (RequestCancelled, JobCancelled) as e:
            reason = control.reason if control is not None and control.reason else str(e)
            if metrics is not None and "request_timeout_s" in reason:  # a client that left is counted by the guard
                metrics.refused("timed_out")
            raise MlflowException(
                f"request stopped: {reason}; upscale large images with `varsr upscale` or a batch job",
                error_code=DEADLINE_EXCEEDED,
            ) from None
        finally:
            if started is not None:
                started()  # a request cancelled in the queue never reached a batch

    def predict(self, context, model_input, params=None):
        from .guard import current_control

        control = current_control()
        t0 = control.arrived if control is not None else time.monotonic()
        lim = self.config.limits
        if not isinstance(model_input, pd.DataFrame):
            raise bad_request(f"expected a table with a string column 'image', got {type(model_input).__name__}")
        if "image" not in model_input.columns:
            raise bad_request(f"missing column 'image' (got columns {list(model_input.columns)})")
        if len(model_input) == 0:
            raise bad_request("no images in the request")
        if len(model_input) > lim.max_batch_images:
            raise self._refuse(
                "too_many_images", f"too many images in one request: {len(model_input)} > limit {lim.max_batch_images}"
            )
        p = self._params(params)
        images = []
        for i, value in enumerate(model_input["image"].tolist()):
            try:
                img = decode_base64_image(value, max_pixels=lim.max_input_pixels, max_bytes=lim.max_payload_bytes)
                self.pipeline.target_size(img.width, img.height, p.scale)
            except ImageInputError as e:
                raise self._refuse("bad_image", f"row {i}: {e}") from None
            images.append(img)
        est = self._check_budget(images, p)
        try:
            out = self._run(images, p, control)
        except MlflowException:
            raise
        except Exception as e:  # never leak a stack trace to the client; log it server-side
            log.exception("upscale failed")
            raise MlflowException(f"upscale failed: {type(e).__name__}: {e}", error_code=INTERNAL_ERROR) from None
        answer = pd.DataFrame(
            {
                "image": [encode_png_base64(o) for o in out],
                "width": [o.width for o in out],
                "height": [o.height for o in out],
            }
        )
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.answered(len(out), est.tiles, time.monotonic() - t0)
        return answer


class _Once:
    """Call ``fn`` the first time this is called, never again (thread-safe)."""

    def __init__(self, fn):
        self._fn = fn
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            fn, self._fn = self._fn, None
        if fn is not None:
            fn()


def log_pyfunc_model(
    ckpt_dir: str | Path,
    config: InferenceConfig,
    name: str = "model",
    registered_model_name: str | None = None,
    validate_example: bool = True,
    model_id: str | None = None,
    checkpoint_ref: str | None = None,
):
    """Log the pyfunc model (checkpoint + inference config as artifacts, code, signature, example) in the active
    run, or into the pending logged model ``model_id`` (created by the caller for a finished run), and register it
    as ``registered_model_name``; returns MLflow's ModelInfo.

    The MLmodel file names its artifacts by where they came from: ``checkpoint_ref`` (default: the checkpoint
    folder's name; a URL or a path relative to the tracking store) and ``inference.yaml``, never the temporary or
    absolute paths they were copied from; its ``artifact_path`` is the model's ``models:/`` URI."""
    from model.checkpoint import read_sampling_defaults, require_native_checkpoint

    from .pipeline import effective_sampling

    ckpt = require_native_checkpoint(ckpt_dir)
    # MLflow gives a request without params the signature's defaults: they, and the logged inference.yaml, are the
    # model's own sampling defaults (its sampling.json, model/checkpoint.py) over the config's
    config = dataclasses.replace(config, sampling=effective_sampling(config.sampling, read_sampling_defaults(ckpt)))
    with tempfile.TemporaryDirectory(prefix="varsr-log-") as tmp:
        cfg_path = save_config(config, Path(tmp) / CONFIG_FILENAME)
        code_paths = served_code(Path(tmp) / "code")
        sig = signature(config)
        example = (example_input(), {"scale": float(config.sampling.scale), "seed": 0})
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=VARSRPyfunc(),
            artifacts={ARTIFACT_CHECKPOINT: str(ckpt), ARTIFACT_CONFIG: str(cfg_path)},
            code_paths=code_paths,
            signature=sig,
            input_example=example if validate_example else None,
            pip_requirements=PIP_REQUIREMENTS,
            model_id=model_id,
        )
    _record_sources(info, {ARTIFACT_CHECKPOINT: checkpoint_ref or ckpt.name, ARTIFACT_CONFIG: CONFIG_FILENAME})
    if registered_model_name:
        info.registered_model_version = mlflow.register_model(info.model_uri, registered_model_name).version
    return info


def _record_sources(info, sources: dict[str, str]) -> None:
    """Rewrite the logged MLmodel so it records no local path: artifact sources as given, ``artifact_path`` as the
    model's URI, ``run_id`` as the logged model's source run."""
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    logged = client.get_logged_model(info.model_id)
    with tempfile.TemporaryDirectory(prefix="varsr-mlmodel-") as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{logged.artifact_location}/MLmodel", dst_path=tmp)
        m = Model.load(path)
        m.artifact_path = info.model_uri
        m.run_id = m.run_id or logged.source_run_id
        for key, src in sources.items():
            m.flavors["python_function"]["artifacts"][key]["uri"] = src
        m.save(path)
        client.log_model_artifact(info.model_id, path)


def served_modules() -> list[str]:
    """The project modules the served model can import: the closure of ``inference.mlflow_model`` (model,
    inference's pipeline, the bottom layer it uses), never the CLI, the demo, training or the data pipeline."""
    from infra.core.imports import closure, import_graph

    return sorted(closure(import_graph(REPO_ROOT), SERVED_ENTRY))


def served_code(dest: Path) -> list[str]:
    """Copy exactly :func:`served_modules` into ``dest`` (package layout kept); returns MLflow ``code_paths``."""
    import shutil

    from infra.core.imports import list_modules

    files = list_modules(REPO_ROOT)
    for m in served_modules():
        src = files[m]
        dst = dest / src.relative_to(REPO_ROOT)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return [str(p) for p in sorted(dest.iterdir())]
