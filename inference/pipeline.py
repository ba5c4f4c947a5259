"""VARSRPipeline: any-size image super-resolution with the VARSR model (docs/MODEL.md §4).

Per image: decode to RGB (any mode, EXIF applied) -> bicubic-upsample the LR to the target size (scale x input; for a
target equal to the model resolution this is exactly the released pre-processing, docs/MODEL.md §4.1) -> reflect-pad to
a multiple of the VQVAE stride and at least one model tile -> one generate() per latent tile (a single tile when the
padded target is the model resolution; otherwise overlapping tiles, batched) returning f_hat -> tiles blended in latent
space with symmetric smooth weights -> decoded once -> cropped to the exact target -> uint8 -> colour fix against the
bicubic-upsampled LR (AdaIN or wavelet) -> PIL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .colorfix import color_fix as apply_color_fix
from .config import COLOR_FIXES, InferenceConfig, SamplingConfig, load_inference_config
from .images import (
    ImageInputError,
    ImageLike,
    check_pixels,
    load_image,
    pil_to_tensor,
    tensor_to_pil_round,
    tensor_to_pil_trunc,
)
from .tiling import Tile, blend_tiles, tile_grid

log = logging.getLogger(__name__)

_AUTO = "auto"


class UpscaleParamError(ValueError):
    """An upscale parameter is unsupported or out of range; the message names it and the allowed range."""


@dataclass
class UpscaleParams:
    """Validated parameters of one upscale call."""

    scale: float
    cfg: float
    top_k: int
    top_p: float
    seed: int | None
    color_fix: str
    overlap: int | None  # None: tile only when needed, with the config overlap; int: force tiling with this overlap


@dataclass
class _Plan:
    """Geometry of one image: target size, padded size, latent tiles and the LR crops they see."""

    target_hw: tuple[int, int]
    padded_hw: tuple[int, int]
    lr_up: torch.Tensor  # (3, H, W) bicubic-upsampled LR in [0, 1], the colour reference
    tiles: list[Tile]
    crops: list[torch.Tensor]  # (3, S, S) per tile


def effective_sampling(config_sampling: SamplingConfig, model_defaults: dict) -> SamplingConfig:
    """The sampling defaults a model runs with: the inference config's (the global defaults, those of the released
    d24) with the model's own ``sampling.json`` values put over them key by key (model/checkpoint.py). A call's own
    params still win over both."""
    return dataclasses.replace(config_sampling, **model_defaults)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> cuda when available, else cpu."""
    if device is None or str(device) == _AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``/None -> bf16 autocast where the device has bf16 matrix units (model.precision), fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == _AUTO:
        from model.precision import default_inference_dtype

        return default_inference_dtype(device)
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise UpscaleParamError(f"unknown dtype {dtype!r}; choose one of {sorted(names)}")
    return names[dtype]


def is_mlflow_uri(s: str) -> bool:
    """True for ``models:/``, ``runs:/`` and remote artifact URIs (anything with a scheme other than file)."""
    return s.startswith(("models:/", "runs:/", "mlflow-artifacts:/")) or ("://" in s and not s.startswith("file://"))


def _logged_config(model_dir: Path) -> InferenceConfig | None:
    """The inference config logged with an MLflow model (``inference.yaml``), if any."""
    logged = sorted(model_dir.rglob("inference.yaml"))
    return load_inference_config(logged[0]) if logged else None


def model_geometry(checkpoint: str | Path) -> tuple[str, int]:
    """The preset name and the tile side in HR pixels of a native checkpoint folder, read from its config.json
    without loading its weights: what a caller building data for the model needs (``varsr demo``'s shards)."""
    from model.checkpoint import read_config

    cfg = read_config(checkpoint)[0]
    return cfg.name, int(cfg.image_size)


def reflect_pad_to(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Pad (C,H0,W0) at the bottom/right to (C,h,w): reflect where possible, replicate beyond that."""
    ph, pw = h - x.shape[-2], w - x.shape[-1]
    if ph == 0 and pw == 0:
        return x
    y = x[None]
    while ph > 0 or pw > 0:  # reflect in steps no larger than the current extent
        sh = min(ph, y.shape[-2] - 1)
        sw = min(pw, y.shape[-1] - 1)
        if sh <= 0 and sw <= 0:
            y = F.pad(y, (0, pw, 0, ph), mode="replicate")
            break
        y = F.pad(y, (0, max(sw, 0), 0, max(sh, 0)), mode="reflect")
        ph, pw = ph - max(sh, 0), pw - max(sw, 0)
    return y[0]


class VARSRPipeline:
    """Super-resolve images of any size with a VARSR model (see the module docstring for the steps)."""

    def __init__(
        self,
        vqvae: torch.nn.Module,
        varsr: torch.nn.Module,
        config: InferenceConfig | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        sampling_defaults: dict | None = None,
        sampling_source: str = "sampling defaults",
    ):
        """``sampling_defaults``: the model's own defaults (its ``sampling.json``, model/checkpoint.py); they replace
        ``config.sampling``'s values key by key, and a call's own params replace both (:meth:`make_params`)."""
        self.config = config or load_inference_config()
        self.device = resolve_device(device if device is not None else self.config.runtime.device)
        self.dtype = resolve_dtype(dtype if dtype is not None else self.config.runtime.dtype, self.device)
        if self.device.type == "cpu" and self.config.runtime.cpu_threads:
            torch.set_num_threads(int(self.config.runtime.cpu_threads))
        self.vqvae = vqvae.to(self.device).eval()
        self.varsr = varsr.to(self.device).eval()
        self.model_cfg = varsr.cfg
        self.image_size: int = int(self.model_cfg.image_size)
        self.latent_side: int = int(self.model_cfg.pn_last)
        self.stride: int = int(self.model_cfg.vqvae.downsample)
        self.sampling_defaults = dict(sampling_defaults or {})
        self.sampling = effective_sampling(self.config.sampling, self.sampling_defaults)
        if self.sampling_defaults:  # model-dependent bounds (top_k <= vocabulary, scale limits): checked at load
            try:
                self.make_params()
            except UpscaleParamError as e:
                from infra.core.errors import UserError

                raise UserError(f"{sampling_source}: {e}") from None

    # ---- construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_uri: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        config: InferenceConfig | None = None,
        tracking_uri: str | None = None,
    ) -> "VARSRPipeline":
        """Load from a native checkpoint folder or an MLflow URI (``models:/NAME@ALIAS``, ``runs:/ID/model``)."""
        from model import from_pretrained
        from model.checkpoint import SAMPLING, find_checkpoint_dir, read_sampling_defaults

        s = str(path_or_uri)
        if not is_mlflow_uri(s):
            root = Path(s)
            if (root / "MLmodel").is_file():  # a downloaded / saved MLflow model folder
                root, config = find_checkpoint_dir(root), config or _logged_config(root)
            vqvae, varsr = from_pretrained(root, device="cpu")
            return cls(vqvae, varsr, config, device, dtype, read_sampling_defaults(root), str(root / SAMPLING))
        import mlflow

        from infra.core.tracking import resolve_tracking_uri, tracking_uri_scope

        tmp = Path(tempfile.mkdtemp(prefix="varsr-model-"))
        try:
            with tracking_uri_scope(resolve_tracking_uri(tracking_uri)):  # models:/ resolves through the registry URI
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=s, dst_path=str(tmp)))
            ckpt = find_checkpoint_dir(local)
            config = config or _logged_config(local)
            vqvae, varsr = from_pretrained(ckpt, device="cpu")
            defaults = read_sampling_defaults(ckpt)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(vqvae, varsr, config, device, dtype, defaults, f"{s} ({SAMPLING})")

    # ---- parameters ----------------------------------------------------------------------------------------------
    def make_params(
        self,
        scale: float | None = None,
        cfg: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        color_fix: str | None = "default",
        tile: int | str | None = None,
    ) -> UpscaleParams:
        """Fill defaults (the model's own, else the config's: ``self.sampling``) and check every value; raises
        UpscaleParamError naming the bad one."""
        d, lim = self.sampling, self.config.limits
        scale = float(d.scale if scale is None else scale)
        if not (math.isfinite(scale) and lim.min_scale <= scale <= lim.max_scale):
            raise UpscaleParamError(f"scale must be in [{lim.min_scale}, {lim.max_scale}], got {scale}")
        cfg = float(d.cfg if cfg is None else cfg)
        if not (math.isfinite(cfg) and 0.0 <= cfg <= 50.0):
            raise UpscaleParamError(f"cfg must be in [0, 50], got {cfg}")
        top_k = int(d.top_k if top_k is None else top_k)
        vocab = int(self.model_cfg.vqvae.vocab_size)
        if not 0 <= top_k <= vocab:
            raise UpscaleParamError(f"top_k must be in [0, {vocab}] (0 = off), got {top_k}")
        top_p = float(d.top_p if top_p is None else top_p)
        if not (math.isfinite(top_p) and 0.0 <= top_p <= 1.0):
            raise UpscaleParamError(f"top_p must be in [0, 1] (0 = off), got {top_p}")
        if seed is not None and (int(seed) != seed or not 0 <= int(seed) < 2**63):
            raise UpscaleParamError(f"seed must be an integer in [0, 2^63), got {seed}")
        cf = d.color_fix if color_fix == "default" else ("none" if color_fix is None else str(color_fix))
        if cf not in COLOR_FIXES:
            raise UpscaleParamError(f"color_fix must be one of {', '.join(COLOR_FIXES)}, got {cf!r}")
        overlap: int | None
        if tile is None or tile == _AUTO:
            overlap = None
        else:
            try:
                overlap = int(tile)
            except (TypeError, ValueError):
                raise UpscaleParamError(f"tile must be 'auto' or an overlap in latent cells, got {tile!r}") from None
            if not 0 <= overlap < self.latent_side:
                raise UpscaleParamError(
                    f"tile overlap must be in [0, {self.latent_side - 1}] latent cells, got {overlap}"
                )
        return UpscaleParams(scale, cfg, top_k, top_p, None if seed is None else int(seed), cf, overlap)

    def target_size(self, width: int, height: int, scale: float) -> tuple[int, int]:
        """Output (width, height) for an input of width x height at ``scale``; enforces max_output_pixels."""
        tw, th = max(1, round(width * scale)), max(1, round(height * scale))
        check_pixels(tw, th, self.config.limits.max_output_pixels, what="output")
        return tw, th

    # ---- planning ------------------------------------------------------------------------------------------------
    def default_overlap(self) -> int:
        ov = self.config.tiling.overlap
        return self.latent_side // 4 if ov is None else int(ov)

    def plan_size(
        self, width: int, height: int, p: UpscaleParams
    ) -> tuple[tuple[int, int], tuple[int, int], list[Tile]]:
        """(target (h, w), padded (h, w), latent tiles) of a width x height input: the plan's geometry, computed
        without touching pixels (what the served endpoint's work and memory estimates read, inference/guard.py)."""
        tw, th = self.target_size(width, height, p.scale)
        S, d, P = self.image_size, self.stride, self.latent_side
        hp, wp = max(S, math.ceil(th / d) * d), max(S, math.ceil(tw / d) * d)
        overlap = self.default_overlap() if p.overlap is None else p.overlap
        return (th, tw), (hp, wp), tile_grid(hp // d, wp // d, P, overlap)

    def plan(self, img: Image.Image, p: UpscaleParams) -> _Plan:
        """Target size, padding and latent tiles of one RGB image."""
        (th, tw), (hp, wp), tiles = self.plan_size(img.width, img.height, p)
        lr_up = pil_to_tensor(img.resize((tw, th), Image.Resampling.BICUBIC))
        S, d = self.image_size, self.stride
        padded = reflect_pad_to(lr_up, hp, wp)
        crops = [padded[:, t.y * d : t.y * d + S, t.x * d : t.x * d + S] for t in tiles]
        return _Plan((th, tw), (hp, wp), lr_up, tiles, crops)

    # ---- running -------------------------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _generate_latents(
        self,
        crops: list[torch.Tensor],
        p: UpscaleParams,
        keys: list[tuple[int, int]] | None = None,
        check: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """f_hat for every crop (N, Cvae, P, P), in batches of tiling.batch_size.

        ``keys`` names each crop (image index in the request, tile index in the image). With a seed, crop (i, t) samples
        from its own stream derived from (seed, i, t) (``model.sampling.stream_generator``): images and tiles draw
        independent noise, and a crop's result does not depend on the batch it lands in. ``check()`` runs before
        each generate() call and may raise to stop the work there (the served endpoint's deadline and cancellation).
        """
        from model.sampling import stream_generator

        keys = list(keys) if keys is not None else [(0, t) for t in range(len(crops))]
        if len(keys) != len(crops):
            raise ValueError(f"{len(keys)} stream keys for {len(crops)} crops")
        bs = max(1, int(self.config.tiling.batch_size))
        out = []
        for i in range(0, len(crops), bs):
            if check is not None:
                check()
            x = torch.stack(crops[i : i + bs]).to(self.device, torch.float32)
            gens = None
            if p.seed is not None:
                gens = [stream_generator(p.seed, img, tile, device=self.device) for img, tile in keys[i : i + bs]]
            with self._autocast():
                f = self.varsr.generate(
                    x, label=0, cfg=p.cfg, top_k=p.top_k, top_p=p.top_p, generator=gens, return_fhat=True
                )
            out.append(f.float())
        return torch.cat(out)

    def _decode(self, plan: _Plan, latents: torch.Tensor) -> torch.Tensor:
        """Blend (when tiled) and decode once -> (3, H, W) in [0, 1] cropped to the target."""
        d = self.stride
        hp, wp = plan.padded_hw
        if len(plan.tiles) == 1:
            f_hat = latents[0]
        else:
            tcfg = self.config.tiling
            f_hat = blend_tiles(latents, plan.tiles, (hp // d, wp // d), tcfg.weight, tcfg.sigma)
        with self._autocast():
            img = self.vqvae.fhat_to_img(f_hat[None].to(self.device))
        img = ((img.float() + 1) / 2).clamp(0, 1)[0]
        th, tw = plan.target_hw
        return img[:, :th, :tw].cpu()

    def _postprocess(self, sr: torch.Tensor, plan: _Plan, p: UpscaleParams) -> Image.Image:
        """uint8 rounding, colour fix against the bicubic LR, truncation to uint8 (docs/MODEL.md §4.4 / docs/MODEL.md
        §7.2 item 8)."""
        if p.color_fix == "none":
            return tensor_to_pil_round(sr)
        q = (sr * 255.0).round() / 255.0
        fixed = apply_color_fix(q[None], plan.lr_up[None], p.color_fix)[0]
        return tensor_to_pil_trunc(fixed)

    @torch.inference_mode()
    def upscale(
        self,
        images: ImageLike | Sequence[ImageLike],
        scale: float | None = None,
        cfg: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        color_fix: str | None = "default",
        tile: int | str | None = None,
        check: Callable[[], None] | None = None,
    ) -> Image.Image | list[Image.Image]:
        """Super-resolve one image (returns a PIL image) or a list/batch (returns a list).

        ``images``: PIL image, numpy array (HxW[xC], uint8/uint16/float), tensor ((3,H,W) or (B,3,H,W) in [0, 1]),
        file path or encoded bytes. ``scale``: output = scale x input size. ``seed``: fixes sampling (same seed ->
        same output; a batch gives each image the result it gets alone). ``color_fix``: adain | wavelet | none/None
        (default from config). ``tile``: None/'auto' tiles only targets larger than the model resolution; an int
        forces latent tiling with that overlap (latent cells). ``check()``, if given, runs between tiles and may
        raise to stop the work.
        """
        single = not isinstance(images, (list, tuple)) and not (isinstance(images, torch.Tensor) and images.ndim == 4)
        items = [images] if single else list(images)
        p = self.make_params(scale, cfg, top_k, top_p, seed, color_fix, tile)
        pils = [load_image(x, self.config.limits.max_input_pixels) for x in items]
        plans = [self.plan(im, p) for im in pils]
        crops = [c for pl in plans for c in pl.crops]
        keys = [(i, t) for i, pl in enumerate(plans) for t in range(len(pl.tiles))]
        # no lock: generate() keeps all sampling state per call, so concurrent requests may share the model
        latents = self._generate_latents(crops, p, keys, check)
        srs, k = [], 0
        for pl in plans:
            srs.append(self._decode(pl, latents[k : k + len(pl.tiles)]))
            k += len(pl.tiles)
        results = [self._postprocess(sr, pl, p) for sr, pl in zip(srs, plans)]
        return results[0] if single else results

    def describe(self) -> dict[str, Any]:
        """What this pipeline runs (logged next to outputs and in benchmarks)."""
        return {
            "model": self.model_cfg.name,
            "image_size": self.image_size,
            "latent_side": self.latent_side,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "tile_overlap": self.default_overlap(),
            "tile_batch_size": self.config.tiling.batch_size,
            "sampling": dataclasses.asdict(self.sampling),
            "sampling_source": "model" if self.sampling_defaults else "config",
        }

    # ---- serving: the images of several requests in one pass -----------------------------------------------------
    @torch.inference_mode()
    def upscale_requests(
        self,
        requests: Sequence[Sequence[Image.Image]],
        p: UpscaleParams,
        generate_batch: int | None = None,
        fixed_batch_shape: bool = False,
        on_done: Callable[[int, list[Image.Image]], None] | None = None,
        cancelled: Callable[[int], bool] | None = None,
    ) -> list[list[Image.Image]]:
        """Super-resolve the images of several requests that share the params ``p`` with shared generate() calls.

        Entry r of the result holds request r's images, each the one that request gets alone: crop (i, t) -- image i
        of its own request, tile t -- is named by those indices, not by its place in the combined batch, so it draws
        the same random stream whatever else runs with it. Crops go through generate() ``generate_batch`` at a time
        (default and upper bound ``tiling.batch_size``), in request order; ``fixed_batch_shape`` pads the last call
        to that size, so that every call has one shape: kernels pick their summation order by shape (a matrix
        product of 2 rows is summed differently from one of 8), and only a fixed shape makes the result
        byte-identical alone and batched. After each call the images whose crops are all generated are decoded, and
        ``on_done(r, images)`` hands request r its images as soon as they are all ready.

        ``requests`` hold RGB PIL images already checked against the limits (:func:`load_image`,
        :meth:`target_size`); ``p`` comes from :meth:`make_params`. generate() keeps its sampling state per call, so
        one batch can decode while another generates. ``cancelled(r)`` is asked between generate() calls: the crops of
        a request it is true for are dropped, that request gets nothing (no ``on_done``) and its entry stays short.
        """
        plans = [[self.plan(im, p) for im in imgs] for imgs in requests]
        crops: list[torch.Tensor] = []
        keys: list[tuple[int, int]] = []
        spans: list[tuple[int, int, int]] = []  # (request, first crop, end crop) of each image, in crop order
        for r, req in enumerate(plans):
            for i, pl in enumerate(req):
                spans.append((r, len(crops), len(crops) + len(pl.tiles)))
                crops += pl.crops
                keys += [(i, t) for t in range(len(pl.tiles))]
        n = len(crops)
        limit = max(1, int(self.config.tiling.batch_size))  # _generate_latents splits anything larger
        gb = limit if generate_batch is None else max(1, min(int(generate_batch), limit))
        if fixed_batch_shape and n % gb:
            pad = gb - n % gb  # blank crops, generated and dropped
            crops += [torch.zeros_like(crops[0])] * pad
            keys += [(0, 0)] * pad
        out: list[list[Image.Image]] = [[] for _ in plans]
        rows: list[torch.Tensor] = []  # one latent per crop, generated so far
        img_idx = 0
        for r, req in enumerate(plans):  # requests without images are done at once
            if not req and on_done is not None:
                on_done(r, [])
        owner = [r for r, a, b in spans for _ in range(a, b)] + [-1] * (len(crops) - n)  # request of each crop
        crops_end = {r: b for r, a, b in spans}  # end of each request's crops
        dropped: set[int] = set()
        for s in range(0, len(crops), gb):
            if cancelled is not None:
                dropped.update(r for r in range(len(plans)) if r not in dropped and cancelled(r))
                if dropped and all(r in dropped for r, end in crops_end.items() if end > s):
                    break  # nothing left that anyone waits for
            if dropped and all(o in dropped or o < 0 for o in owner[s : s + gb]):
                rows += [None] * len(crops[s : s + gb])  # a cancelled request's crops: not generated
            else:
                rows += list(self._generate_latents(crops[s : s + gb], p, keys[s : s + gb]))
            while img_idx < len(spans) and spans[img_idx][2] <= len(rows):
                r, a, b = spans[img_idx]
                if r in dropped:
                    img_idx += 1
                    continue
                pl = plans[r][len(out[r])]
                sr = self._decode(pl, torch.stack(rows[a:b]))
                out[r].append(self._postprocess(sr, pl, p))
                if len(out[r]) == len(plans[r]) and on_done is not None:
                    on_done(r, out[r])
                img_idx += 1
        return out


__all__ = ["VARSRPipeline", "UpscaleParams", "UpscaleParamError", "ImageInputError", "resolve_device", "resolve_dtype"]
