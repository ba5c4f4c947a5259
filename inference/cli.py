"""CLI: ``varsr upscale | register | serve | eval`` (registered into the ``varsr`` command by infra/cli.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from infra.core.config import add_config_args
from infra.core.errors import UserError
from infra.core.log import say, summary

from .config import COLOR_FIXES

log = logging.getLogger(__name__)

TRACKING_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db)"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def _tile_arg(s: str) -> str | int:
    if s == "auto":
        return s
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tile must be 'auto' or an overlap in latent cells, got {s!r}") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="native checkpoint folder (see model/checkpoint.py)")
    src.add_argument("--model-uri", help="MLflow model URI, e.g. models:/varsr@champion")
    p.add_argument("--tracking-uri", help=TRACKING_HELP)
    add_config_args(p, "inference YAML (default configs/inference/default.yaml)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale", type=float, default=None, help="output = scale x input size (default 4)")
    p.add_argument(
        "--cfg",
        type=float,
        default=None,
        help="classifier-free guidance (default: the model's sampling.json, else 6.0)",
    )
    p.add_argument("--top-k", type=int, default=None, help="(default: the model's sampling.json, else 1)")
    p.add_argument("--top-p", type=float, default=None, help="(default: the model's sampling.json, else 0.75)")
    p.add_argument("--seed", type=int, default=None, help="fix sampling (same seed -> same output)")
    p.add_argument("--tile", type=_tile_arg, default="auto", help="auto, or force latent tiling with N cells overlap")
    p.add_argument(
        "--color-fix", choices=COLOR_FIXES, default=None, help="(default: the model's sampling.json, else adain)"
    )


def _sampling_kwargs(args) -> dict:
    kw = {
        "scale": args.scale,
        "cfg": args.cfg,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "tile": args.tile,
    }
    if args.color_fix is not None:
        kw["color_fix"] = args.color_fix
    return kw


def _load_pipeline(args):
    from .config import load_inference_config
    from .pipeline import VARSRPipeline

    try:
        config = load_inference_config(args.config, args.overrides)
    except ValueError as e:
        raise UserError(str(e)) from None
    src = str(args.checkpoint) if args.checkpoint else args.model_uri
    if args.checkpoint and not args.checkpoint.is_dir():
        raise UserError(f"checkpoint folder {args.checkpoint} does not exist")
    try:
        pipe = VARSRPipeline.from_pretrained(
            src, device=args.device, dtype=args.dtype, config=config, tracking_uri=args.tracking_uri
        )
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. unknown registered model / alias
        raise UserError(f"cannot load the model from {src}: {type(e).__name__}: {e}") from None
    # `--set sampling.KEY=…` is as explicit as a flag: it wins over the model's own sampling.json
    from infra.core.config import parse_override

    explicit = {keys[1] for keys, _ in map(parse_override, args.overrides) if len(keys) == 2 and keys[0] == "sampling"}
    if explicit:
        pipe.sampling = dataclasses.replace(pipe.sampling, **{k: getattr(config.sampling, k) for k in explicit})
    return pipe


def collect_inputs(paths: list[Path]) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(file, path relative to its input root) for files and folders (recursive); missing paths reported."""
    found, missing = [], []
    for p in paths:
        if p.is_file():
            found.append((p, Path(p.name)))
        elif p.is_dir():
            found += [
                (f, f.relative_to(p))
                for f in sorted(p.rglob("*"))
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            ]
        else:
            missing.append(f"{p}: no such file or folder")
    return found, missing


def cmd_upscale(args) -> int:
    from tqdm import tqdm

    from .images import ImageInputError, open_image_path
    from .pipeline import UpscaleParamError

    inputs, problems = collect_inputs(args.inputs)
    if not inputs:
        raise UserError("no input images found" + (f" ({'; '.join(problems)})" if problems else ""))
    out = args.output
    single_file = len(inputs) == 1 and out.suffix.lower() in IMAGE_SUFFIXES
    pipe = _load_pipeline(args)
    kw = _sampling_kwargs(args)
    try:
        pipe.make_params(**{k: v for k, v in kw.items()})
    except UpscaleParamError as e:
        raise UserError(str(e)) from None
    ok, failed, t0 = 0, list(problems), time.perf_counter()
    tty = sys.stderr.isatty()
    for i, (src, rel) in enumerate(tqdm(inputs, desc="upscale", unit="img", file=sys.stderr, disable=not tty)):
        if not tty:
            log.info("[%d/%d] %s", i + 1, len(inputs), src)
        dst = out if single_file else out / rel.with_suffix(".png")
        try:
            img = open_image_path(src, pipe.config.limits.max_input_pixels)
            sr = pipe.upscale(img, **kw)
        except (ImageInputError, ValueError) as e:
            failed.append(f"{src}: {e}")
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        sr.save(dst)
        ok += 1
    secs = time.perf_counter() - t0
    for f in failed:
        say(f"skipped {f}")
    summary(
        f"upscaled {ok} image(s), skipped {len(failed)}, {secs:.1f} s"
        + (f" ({secs / ok:.2f} s/image)" if ok else "")
        + f" -> {out}"
    )
    return 0 if ok and not failed else (1 if ok else 2)


def cmd_register(args) -> int:
    from infra.core.config import parse_override

    from .config import load_inference_config
    from .registry import register_model

    tags = {}
    for t in args.tag:
        if "=" not in t:
            raise UserError(f"--tag {t!r} must be KEY=VALUE")
        k, v = t.split("=", 1)
        tags[k] = v
    sampling = {}
    for item in args.sampling:
        keys, value = parse_override(item)
        if len(keys) != 1:
            raise UserError(f"--sampling {item!r} must be KEY=VALUE, KEY one of scale, cfg, top_k, top_p, color_fix")
        sampling[keys[0]] = value
    try:
        config = load_inference_config(args.config, args.overrides)
    except ValueError as e:
        raise UserError(str(e)) from None
    mv = register_model(
        args.ckpt_dir,
        args.name,
        alias=args.alias or None,
        tracking_uri=args.tracking_uri,
        tags=tags,
        config=config,
        validate_example=not args.no_validate,
        sampling=sampling,
    )
    uri = f"models:/{args.name}@{args.alias}" if args.alias else f"models:/{args.name}/{mv.version}"
    summary(
        json.dumps({"name": mv.name, "version": int(mv.version), "alias": args.alias, "uri": uri, "run_id": mv.run_id})
    )
    return 0


def cmd_serve(args) -> int:
    from .mlflow_model import check_serve_overrides
    from .serve import serve

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: reachable from other machines", args.host)
    try:
        overrides = check_serve_overrides(args.overrides)
    except ValueError as e:
        raise UserError(str(e)) from None
    return serve(
        args.model_uri,
        args.port,
        args.host,
        args.workers,
        args.tracking_uri,
        overrides=overrides,
        stop_timeout=args.stop_timeout,
    )


def cmd_eval(args) -> int:
    from .evaluate import evaluate, evaluate_pairs, format_table

    if args.suite:
        return cmd_eval_suite(args)
    if bool(args.checkpoint) == bool(args.model_uri):
        raise UserError("give one of --checkpoint DIR or --model-uri URI (both only with --suite)")
    if args.shards:
        if args.hr or args.lr:
            raise UserError("give either --shards or --hr/--lr, not both")
        pairs = args.shard_pairs(args.shards)
    else:
        if not (args.hr and args.lr):
            raise UserError("give --hr DIR and --lr DIR (or --shards TAR...)")
        for d in (args.hr, args.lr):
            if not d.is_dir():
                raise UserError(f"{d} is not a folder")
    pipe = _load_pipeline(args)
    kw = _sampling_kwargs(args)
    kw.pop("scale")
    opts = dict(
        baseline=args.baseline,
        upscale_kwargs=kw,
        log_to_mlflow=not args.no_mlflow,
        tracking_uri=args.tracking_uri,
        model_ref=args.model_uri or str(args.checkpoint),
    )
    try:
        if args.shards:
            manifest = args.shard_manifest(args.shards) if getattr(args, "shard_manifest", None) else None
            res = evaluate_pairs(pipe, pairs, args.output, source={"shards": args.shards, "manifest": manifest}, **opts)
        else:
            res = evaluate(pipe, args.hr, args.lr, args.output, **opts)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    for n in res.notices:
        say(f"notice: {n}")
    for f in res.failed:
        say(f"skipped {f}")
    summary(format_table(res.summary))
    summary(f"results in {res.out_dir}" + (f"; MLflow run {res.run_id}" if res.run_id else ""))
    return 0 if res.summary else 2


def _method_label(source: str) -> str:
    return source.removeprefix("models:/") if source.startswith("models:/") else Path(source).name


def cmd_eval_suite(args) -> int:
    """``varsr eval --suite``: the table of every method on every set of a suite (inference/eval_suite.py)."""
    from .eval_suite import Method, load_suite, run_suite

    if args.hr or args.lr or args.shards:
        raise UserError("--suite reads its test sets from the suite; leave out --hr/--lr/--shards")
    overrides = list(args.suite_overrides)
    if args.metrics:
        names = [m.strip() for m in args.metrics.split(",") if m.strip()]
        overrides += [f"metrics={json.dumps(names)}", f"required_metrics={json.dumps(names)}"]
    if args.weights_dir:
        overrides.append(f"weights_dir={json.dumps(str(args.weights_dir))}")
    if args.workers:
        overrides.append(f"workers={args.workers}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    cfg = load_suite(args.suite, overrides)
    kw = _sampling_kwargs(args)
    kw.pop("scale")
    kw.pop("seed")
    if args.checkpoint and not args.checkpoint.is_dir():
        raise UserError(f"checkpoint folder {args.checkpoint} does not exist")
    rows = [(None, s) for s in (args.model_uri, str(args.checkpoint) if args.checkpoint else None) if s]
    for item in args.compare:  # [LABEL=]SOURCE
        label, sep, src = item.partition("=")
        rows.append((label, src) if sep and not label.startswith("models:") else (None, item))
    methods = [
        Method(label or _method_label(src), src, args.tracking_uri, dict(kw), args.config, list(args.overrides))
        for label, src in rows
    ]
    if args.baseline == "bicubic":
        methods.append(Method("bicubic"))
    res = run_suite(cfg, methods, args.output, log_to_mlflow=not args.no_mlflow, tracking_uri=args.tracking_uri)
    for n in res.notices:
        say(f"notice: {n}")
    summary((res.out_dir / "table.md").read_text().rstrip("\n"))
    summary(f"results in {res.out_dir}" + (f"; MLflow run {res.run_id}" if res.run_id else ""))
    return 0


def cmd_eval_prepare(args) -> int:
    """``varsr eval-prepare KIND``: a test set folder with its manifest (inference/eval_sets.py)."""
    from . import eval_sets

    if args.kind == "paired":
        es = eval_sets.prepare_paired(
            args.hr, args.lr, args.output, args.scale, args.lr_size, args.name, args.overwrite
        )
    elif args.kind == "synthetic":
        if args.degrader is None:
            raise UserError("synthetic sets need the data pipeline's degradation presets (run through `varsr`)")
        es = eval_sets.prepare_synthetic(
            args.hr,
            args.output,
            args.n,
            args.preset,
            args.degrader,
            args.seed,
            args.hr_size,
            args.scale,
            args.name,
            args.overwrite,
        )
    elif args.kind == "bundled":
        es = eval_sets.prepare_bundled(args.output, args.hr_size, args.scale, args.name or "bundled", args.overwrite)
    else:  # verify
        es = eval_sets.load_set(args.output)
        if es.manifest["protocol"].get("kind") == "synthetic" and args.replayer is not None:
            same = eval_sets.replay_check(es, args.replayer)
            if same != len(es.pairs):
                raise UserError(f"{args.output}: {len(es.pairs) - same} LR(s) differ from their recorded degradation")
    summary(
        json.dumps(
            {
                "set": es.name,
                "path": str(es.root),
                "pairs": len(es.pairs),
                "protocol": es.manifest["protocol"],
                "manifest_sha256": es.sha256,
            }
        )
    )
    return 0


def _register_eval_prepare(subparsers, degrader, replayer) -> None:
    p = subparsers.add_parser("eval-prepare", help="make a test set (HR/, LR/, manifest.json) for varsr eval --suite")
    p.add_argument(
        "kind",
        choices=("paired", "synthetic", "bundled", "verify"),
        help="paired: centre crops of an HR/LR folder pair; synthetic: N seeded crops of an HR folder "
        "degraded by --preset; bundled: the small real set; verify: check a set's files (and replay "
        "a synthetic set's degradations)",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="the set's folder")
    p.add_argument("--hr", type=Path, help="HR folder (paired, synthetic)")
    p.add_argument("--lr", type=Path, help="LR folder with the HR's file stems (paired)")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--lr-size", type=int, default=128, help="LR crop side (paired; the HR crop is scale x)")
    p.add_argument("--hr-size", type=int, default=None, help="HR crop side (synthetic: 512, bundled: 256)")
    p.add_argument("--n", type=int, default=3000, help="pairs to make (synthetic; DIV2K-val: 3000)")
    p.add_argument(
        "--preset",
        default="realesrgan-x4plus",
        help="degradation preset (configs/data/): realesrgan-x4plus or varsr-mild",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="set name (default: the folder's name)")
    p.add_argument("--overwrite", action="store_true", help="replace a set already in --output")
    p.set_defaults(func=_prepare_dispatch, degrader=degrader, replayer=replayer)


def _prepare_dispatch(args) -> int:
    if args.hr_size is None:
        args.hr_size = 512 if args.kind == "synthetic" else 256
    if args.kind in ("paired", "synthetic") and args.hr is None:
        raise UserError(f"eval-prepare {args.kind} needs --hr DIR")
    if args.kind == "paired" and args.lr is None:
        raise UserError("eval-prepare paired needs --lr DIR")
    return cmd_eval_prepare(args)


def register(subparsers, shard_pairs=None, degrader=None, replayer=None, shard_manifest=None) -> None:
    """Add upscale / register / serve / eval / eval-prepare. ``shard_pairs(spec) -> [(key, load -> (hr, lr))]``
    enables ``varsr eval --shards`` (the CLI passes the data pipeline's shard reader; inference does not import it),
    ``shard_manifest(spec) -> URL | None`` names the dataset's manifest (the shard format's ``manifest_ref``);
    ``degrader(hr, preset, seed) -> (lr, params)`` and ``replayer(hr, params) -> lr`` the data pipeline's degradation
    presets for ``varsr eval-prepare synthetic`` / ``verify``."""
    p = subparsers.add_parser("upscale", help="super-resolve image files or folders")
    p.add_argument("inputs", nargs="+", type=Path, metavar="IN", help="image files or folders (recursive)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder (or a file for one input)")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_upscale)

    p = subparsers.add_parser("register", help="log a checkpoint as an MLflow model, register it, set an alias")
    p.add_argument("ckpt_dir", type=Path, metavar="CKPT_DIR")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--alias", default="champion", help="alias to point at the new version ('' for none)")
    p.add_argument("--tracking-uri", help=TRACKING_HELP)
    add_config_args(p, "inference YAML served with the model (limits, defaults)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="run + version tag (repeatable)")
    p.add_argument("--no-validate", action="store_true", help="skip running the input example at log time")
    p.add_argument(
        "--sampling",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a sampling default the version carries (its checkpoint's sampling.json, over the folder's "
        "own), e.g. --sampling cfg=0.75 --sampling color_fix=wavelet (repeatable)",
    )
    p.set_defaults(func=cmd_register)

    p = subparsers.add_parser(
        "serve",
        help="serve a registered model over HTTP (mlflow models serve)",
        description="Serve a registered model: POST /invocations; GET /metrics (Prometheus), "
        "/health/live (the process answers), /health/ready (model loaded, warm-up "
        "call done in every worker, queue under its limit) on the same port.",
    )
    p.add_argument("model_uri", metavar="MODEL_URI", help="e.g. models:/varsr@champion")
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="uvicorn worker processes (each loads the model). Default: chosen for this machine: on a "
        "CPU, one per core the process may use (affinity, cgroup quota), at most 8 and as many as 80%% "
        "of the memory (cgroup limit or RAM) holds at 0.5 GiB (measured) + the weights + "
        "serving.max_request_memory_mb each, with cores/workers torch threads each "
        "(runtime.cpu_threads, unless --set gives it): a CPU pipeline call uses one core well and "
        "several poorly (2 cores: 1 process x1.38 at 8 clients, 2 processes x2.06); on a GPU, 1 "
        "(it owns the device and batches for it). The choice is logged at start",
    )
    p.add_argument("--tracking-uri", help=TRACKING_HELP)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="serving.* / runtime.* over the registered model's inference config, e.g. "
        "serving.batch_wait_ms=10 (repeatable)",
    )
    p.add_argument(
        "--stop-timeout",
        type=float,
        default=30.0,
        help="seconds the server gets to finish its requests after SIGTERM/SIGINT before SIGKILL",
    )
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser(
        "eval",
        help="score a model on paired HR/LR images (or a suite of test sets: one "
        "Table-1-style table), logged to MLflow",
    )
    p.add_argument("--hr", type=Path, help="folder of HR images")
    p.add_argument("--lr", type=Path, help="folder of LR images with the same file names")
    if shard_pairs is not None:
        p.add_argument("--shards", help="a built dataset (folder or URL with manifest.json), a glob or tar URLs")
    p.add_argument("-o", "--output", type=Path, default=Path("varsr-eval"))
    p.add_argument("--baseline", choices=("bicubic",), default=None)
    p.add_argument("--no-mlflow", action="store_true", help="do not log a run")
    p.add_argument(
        "--suite",
        help="a suite (configs/eval/NAME.yaml or a YAML file): every test set, every metric, one "
        "table (docs/EVALUATION.md)",
    )
    p.add_argument(
        "--suite-set",
        dest="suite_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a suite key, e.g. --suite-set worst=8 (repeatable)",
    )
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="[LABEL=]SOURCE",
        help="another model row for --suite: a checkpoint folder or models:/ URI (repeatable)",
    )
    p.add_argument("--metrics", help="comma-separated metrics for --suite; each named one must be available")
    p.add_argument(
        "--weights-dir",
        type=Path,
        help="learned metrics' weights (default $VARSR_EVAL_WEIGHTS or ~/.cache/varsr/eval-weights)",
    )
    p.add_argument("--workers", type=int, default=None, help="Ray tasks for --suite (many pairs)")
    p.add_argument("--checkpoint", type=Path, help="native checkpoint folder (see model/checkpoint.py)")
    p.add_argument(
        "--model-uri", help="MLflow model URI, e.g. models:/varsr@champion (with --suite, also --checkpoint: two rows)"
    )
    p.add_argument("--tracking-uri", help=TRACKING_HELP)
    add_config_args(p, "inference YAML (default configs/inference/default.yaml)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_eval, shards=None, shard_pairs=shard_pairs, shard_manifest=shard_manifest)
    _register_eval_prepare(subparsers, degrader, replayer)
