"""The VARSR transformer (docs/MODEL.md §2): next-scale prediction conditioned on LR prefix tokens.

Sequence (docs/MODEL.md §2.4): [LR prefix tokens (isr only) ; class token] form level 0 (first_l tokens), followed by
the teacher-forced inputs of scales 1…K−1 (level k = pn_k² tokens). Each level sees itself and all earlier levels
(block-causal mask, docs/MODEL.md §2.5); position comes only from the scale-aligned 2-D RoPE (docs/MODEL.md §2.6) plus a
learned ``pos_start`` on level 0. Logits at the class token predict scale 0, the tokens of level k predict scale k.
The final block output at the last scale conditions the diffusion refiner (docs/MODEL.md §3), which predicts the last
scale's quantisation error.

One class serves both variants: ``isr`` (VAR_RoPE, the SR model) and ``c2i`` (ImgVAR_RoPE, class-to-image stage 1:
no prefix, class_emb has an extra null row for CFG, label dropout in training, docs/MODEL.md §2.12).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import KVCache
from .blocks import AdaLNBeforeHead, AdaLNSelfAttn
from .config import VARSRConfig
from .lr_encoder import LREncoder
from .rope import rope_table
from .sampling import GeneratorArg, resolve_generators, sample_top_k_top_p


class VARSR(nn.Module):
    """Parameter names are the official ones (docs/MODEL.md §6.1); the VQVAE is held by reference, not as a
    submodule."""

    def __init__(self, cfg: VARSRConfig, vqvae: nn.Module | None = None):
        super().__init__()
        from .refiner import DiffLoss

        cfg.validate()
        self.cfg = cfg
        C, K = cfg.C, cfg.num_scales
        self.C, self.V, self.Cvae = C, cfg.vqvae.vocab_size, cfg.vqvae.z_channels
        self.patch_nums, self.prefix_len, self.first_l = tuple(cfg.patch_nums), cfg.prefix_len, cfg.first_l
        self.num_classes = cfg.num_classes

        # conditioning: LR prefix (isr), class token / AdaLN condition, level-0 position, level embedding
        self.con_embedding = (
            LREncoder(tuple(cfg.lr_encoder_channels), C, cfg.lr_encoder_hidden) if cfg.variant == "isr" else None
        )
        self.word_embed = nn.Linear(self.Cvae, C)
        self.class_emb = nn.Embedding(cfg.class_rows, C)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.lvl_embed = nn.Embedding(K, C)

        dpr = [cfg.dpr * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linspace(0, dpr, depth)
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(C, cfg.heads, cfg.mlp_ratio, dpr[i], cfg.norm_eps, cfg.drop_rate, cfg.attn_drop_rate)
            for i in range(cfg.depth)
        )
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, self.V)
        self.decoder_norm = nn.LayerNorm(C, eps=cfg.norm_eps)  # refiner condition (docs/MODEL.md §3.2)
        self.diffloss = DiffLoss(cfg)

        # level id of every sequence position (upstream buffer lvl_1L; regenerated, never stored)
        lvl = [0] * self.first_l + [k for k in range(1, K) for _ in range(self.patch_nums[k] ** 2)]
        self._level_ids = torch.tensor(lvl, dtype=torch.long, device="cpu")
        # geometry tables per device (RoPE, masks): filled on first use, never changed after, so concurrent readers
        # are safe (two threads filling the same key compute the same value)
        self._cache: dict = {}
        self._vqvae = (vqvae,)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ---- the VQVAE (by reference) ---------------------------------------------------------------------------------
    @property
    def vqvae(self):
        return self._vqvae[0]

    def set_vqvae(self, vqvae: nn.Module) -> None:
        self._vqvae = (vqvae,)

    def _apply(self, fn, recurse=True):
        """Moving the transformer moves its VQVAE too (device only: the tokenizer stays fp32, docs/MODEL.md §5.3)."""
        out = super()._apply(fn, recurse)
        vq = self.vqvae
        if vq is not None:
            dev = self.word_embed.weight.device
            if any(p.device != dev for p in vq.parameters()):
                vq.to(dev)
        return out

    # ---- init (docs/MODEL.md §2.9) -----------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Upstream ``init_weights``: trunc-normal everywhere, then the head/AdaLN/residual rescalings.

        Like upstream it walks every submodule, so it also overwrites the refiner's own DiT-style init (zeroed AdaLN
        and final layer) with the truncated normal; we keep that choice so from-scratch training matches upstream.
        """
        cfg = self.cfg
        std = cfg.init_std if cfg.init_std > 0 else math.sqrt(1 / (3 * self.C))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    m.bias.zero_()
        self.head.weight.mul_(cfg.init_head)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(cfg.init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        C, depth = self.C, cfg.depth
        for blk in self.blocks:
            blk.attn.proj.weight.div_(math.sqrt(2 * depth))
            blk.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            w = blk.ada_lin[-1].weight
            w[2 * C :].mul_(cfg.init_adaln)
            w[: 2 * C].mul_(cfg.init_adaln_gamma)
            blk.ada_lin[-1].bias.zero_()
        for p in (self.pos_start, self.class_emb.weight, self.lvl_embed.weight):
            nn.init.trunc_normal_(p, std=std)
        if self.con_embedding is not None and cfg.lr_encoder_init == "fan_in":
            self.con_embedding.init_fan_in()

    # ---- geometry caches (not in the state dict) ------------------------------------------------------------------
    def rope_sides(self) -> list[int]:
        """RoPE grid sides in sequence order: (prefix side, 1, pn_1, …) for isr; patch_nums for c2i (docs/MODEL.md
        §2.6, docs/MODEL.md §2.12)."""
        sides = list(self.patch_nums)
        if self.prefix_len:
            sides = [math.isqrt(self.prefix_len)] + sides
        return sides

    def rope(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("rope", str(device))
        if key not in self._cache:
            self._cache[key] = rope_table(
                self.rope_sides(), self.cfg.rope_grid_side, self.cfg.head_dim, self.cfg.rope_theta, device
            )
        return self._cache[key]

    def level_ids(self, device) -> torch.Tensor:
        return self._level_ids.to(device)

    def attn_mask(self, device) -> torch.Tensor:
        """Boolean (S, S) block-causal level mask, built once per device."""
        from .attention import level_mask

        key = ("mask", str(device))
        if key not in self._cache:
            self._cache[key] = level_mask(self._level_ids).to(device)
        return self._cache[key]

    def attn_segments(self, device) -> list:
        """The level mask as query segments (see ``attention.level_segments``), built once per device."""
        from .attention import level_segments

        key = ("segments", str(device))
        if key not in self._cache:
            self._cache[key] = [
                (a, b, c, None if m is None else m.to(device)) for a, b, c, m in level_segments(self._level_ids)
            ]
        return self._cache[key]

    def scale_slices(self) -> list[slice]:
        """Slices of the length-L target/logit sequence per scale."""
        out, b = [], 0
        for pn in self.patch_nums:
            out.append(slice(b, b + pn * pn))
            b += pn * pn
        return out

    # ---- shared pieces ----------------------------------------------------------------------------------------------
    def encode_prefix(self, lr: torch.Tensor, fp32: bool = True) -> torch.Tensor:
        """LR in [−1, 1] → prefix tokens (B, prefix_len, C).

        Training runs it in fp32 outside autocast (docs/MODEL.md §2.10 step 1); at inference it runs under the caller's
        autocast like upstream (``fp32=False``).
        """
        if not fp32:
            return self.con_embedding(lr)
        # in the weights' precision outside autocast: fp32 normally; bf16/fp16 when the engine keeps low-precision
        # weights (DeepSpeed bf16/fp16 with fp32 master copies), where fp32 activations cannot meet bf16 weights
        wdtype = self.con_embedding.conv_in.weight.dtype
        with torch.autocast(lr.device.type, enabled=False):
            return self.con_embedding(lr.to(wdtype)).float()

    def refiner_condition(self, h_last: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """z = decoder_norm(h_last + word_embed(e)) in float32 (docs/MODEL.md §3.2); the norm's affine is applied in
        fp32 even when the weights are kept in bf16/fp16 by the engine (LayerNorm is an fp32 op under autocast
        anyway)."""
        n = self.decoder_norm
        x = h_last.float() + self.word_embed(e.to(self.word_embed.weight.dtype)).float()
        return F.layer_norm(x, n.normalized_shape, n.weight.float(), n.bias.float(), n.eps)

    def logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """head(head_nm(h, cond)) in float32 (docs/MODEL.md §2.8)."""
        return self.head(self.head_nm(h.float(), cond_BD).float()).float()

    def run_blocks(self, x, cond_BD, rope, mask, cache: KVCache | None = None):
        """All blocks (with gradient checkpointing when configured and training).

        Sampling passes mask None and the call's ``KVCache`` (block i appends to slot i); training passes the mask.
        """
        ckpt = self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, blk in enumerate(self.blocks):
            if ckpt:
                x = checkpoint(blk, x, cond_BD, rope, mask, use_reentrant=False)
            else:
                x = blk(x, cond_BD, rope, mask, None if cache is None else cache.slot(i))
        return x

    # ---- training forward (docs/MODEL.md §2.10) ----------------------------------------------------------------------
    def forward(
        self,
        x_BLCv: torch.Tensor,
        label_B: torch.Tensor,
        lr: torch.Tensor | None,
        residual: torch.Tensor,
        generator: torch.Generator | None = None,
    ):
        """Teacher-forced forward.

        x_BLCv: teacher-forcing inputs (B, L−1, Cvae) from ``vqvae.idxBl_to_var_input``; label_B (B,) long;
        lr: (B, 3, S, S) in [−1, 1] (isr) or None (c2i); residual: continuous last-scale target R (B, pn_last², Cvae);
        generator: for the refiner's timesteps/noise (and c2i label dropout).
        Returns (logits (B, L, V) float32, refiner loss scalar). In training mode the c2i variant replaces labels by
        the null class with probability cfg.cond_drop_rate.
        """
        B, n_last = x_BLCv.shape[0], self.patch_nums[-1] ** 2
        if tuple(x_BLCv.shape[1:]) != (self.cfg.L - 1, self.Cvae):
            raise ValueError(
                f"teacher-forcing inputs must be (B, {self.cfg.L - 1}, {self.Cvae}), got {tuple(x_BLCv.shape)}"
            )
        if tuple(residual.shape) != (B, n_last, self.Cvae):
            raise ValueError(f"residual must be {(B, n_last, self.Cvae)}, got {tuple(residual.shape)}")
        if tuple(label_B.shape) != (B,):
            raise ValueError(f"labels must be ({B},), got {tuple(label_B.shape)}")
        if self.cfg.variant == "c2i" and self.training and self.cfg.cond_drop_rate > 0:
            drop = torch.rand(B, generator=generator, device=label_B.device if generator is None else generator.device)
            label_B = torch.where(
                drop.to(label_B.device) < self.cfg.cond_drop_rate, torch.full_like(label_B, self.num_classes), label_B
            )
        cond_BD = self.class_emb(label_B)
        sos = cond_BD[:, None]
        if self.prefix_len:
            if lr is None:
                raise ValueError("the isr variant needs LR images")
            sos = torch.cat([self.encode_prefix(lr), sos.float()], dim=1)
        sos = sos + self.pos_start
        x = torch.cat([sos, self.word_embed(x_BLCv.float()).to(sos.dtype)], dim=1)
        dev = x.device
        x = x + self.lvl_embed(self.level_ids(dev))[None]
        if torch.is_autocast_enabled(dev.type):
            dt = torch.get_autocast_dtype(dev.type)
            x, cond_BD = x.to(dt), cond_BD.to(dt)
        x = self.run_blocks(x, cond_BD, self.rope(dev), self.attn_segments(dev))

        logits = self.logits(x[:, self.prefix_len :], cond_BD)  # (B, L, V): position prefix_len+i predicts token i
        h_last = x[:, -n_last:]
        # refiner condition uses the model's own argmax codes of the last scale (docs/MODEL.md §2.10 step 5)
        with torch.no_grad():
            idx_last = logits[:, -n_last:].argmax(dim=-1)
            e = self.vqvae.embed_idx(idx_last).float()
        z = self.refiner_condition(h_last, e)
        diff = self.diffloss.loss(
            z.reshape(-1, self.C), (residual.float() - e).reshape(-1, self.Cvae), generator=generator
        )
        return logits, diff

    # ---- sampling (docs/MODEL.md §4.2) -------------------------------------------------------------------------------
    def _guidance(self, si: int, cfg: float) -> float:
        K = self.cfg.num_scales
        if self.cfg.variant == "c2i":
            if self.cfg.c2i_cfg_schedule == "quadratic":
                return cfg * (si / (K - 1)) ** 2
            return cfg * (si + 1) / (K - 1)
        return cfg * si / (K - 1)

    def _check_generate_inputs(self, lr_images, label, class_labels):
        cfg = self.cfg
        S = cfg.image_size
        if cfg.variant == "c2i":
            if lr_images is not None:
                raise ValueError("the c2i variant takes no LR images: pass lr_images=None and class_labels")
            if class_labels is None:
                raise ValueError("the c2i variant needs class_labels (B,) to generate")
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            if labels.numel() == 0:
                raise ValueError("class_labels is empty")
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise ValueError(f"class_labels must lie in [0, {self.num_classes}), got {labels.tolist()}")
            return None, labels
        if not isinstance(lr_images, torch.Tensor):
            raise ValueError(
                f"lr_images must be a float tensor (B, 3, {S}, {S}) in [0, 1], got {type(lr_images).__name__}"
            )
        if lr_images.ndim != 4 or lr_images.shape[1] != 3 or tuple(lr_images.shape[2:]) != (S, S):
            raise ValueError(
                f"lr_images must have shape (B, 3, {S}, {S}) (resize the LR to the model resolution "
                f"first, docs/MODEL.md §4.1), got {tuple(lr_images.shape)}"
            )
        if lr_images.shape[0] == 0:
            raise ValueError("lr_images is an empty batch")
        if not lr_images.is_floating_point():
            raise ValueError(f"lr_images must be floating point in [0, 1], got dtype {lr_images.dtype}")
        lo, hi = float(lr_images.min()), float(lr_images.max())
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"lr_images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
        B = lr_images.shape[0]
        if class_labels is not None:
            label = class_labels
        labels = torch.as_tensor(label, dtype=torch.long).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(B)
        if labels.numel() != B:
            raise ValueError(f"label must be an int or have one entry per image ({B}), got {labels.numel()}")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {labels.tolist()}")
        return lr_images, labels.clone()

    @torch.inference_mode()
    def generate(
        self,
        lr_images: torch.Tensor | None,
        label=0,
        cfg: float = 6.0,
        top_k: int = 1,
        top_p: float = 0.75,
        generator: GeneratorArg = None,
        refiner_noise: torch.Tensor | None = None,
        return_fhat: bool = False,
        class_labels=None,
        return_info: bool = False,
    ):
        """Super-resolve LR images (B, 3, S, S) in [0, 1] (already resized to the model resolution) → (B, 3, S, S) in
        [0, 1].

        Image-based CFG (docs/MODEL.md §4.2): the negative branch is label num_classes−1 sharing the LR prefix (c2i:
        the null class), guidance t = cfg·si/(K−1) on the logits, (1+t)·pos − t·neg; the refiner is guided with
        s = cfg.

        Randomness (``sampling.resolve_generators``): ``generator`` is None (global RNG), one torch.Generator (image b
        draws from the stream (seed drawn from it, b)), or a list of one generator per image (an image then gets the
        same result in any batch); ``refiner_noise`` (B, pn_last², Cvae) fixes the refiner's initial noise.
        ``return_fhat`` returns the final latent f_hat (B, Cvae, pn_last, pn_last) instead of images.
        ``return_info`` returns ``(output, GenerationInfo)`` with the sampled tokens and the per-phase timings.

        All sampling state (KV cache, generators, tokens) lives in this call, so concurrent calls on one model from
        several threads are safe.
        """
        if self.vqvae is None:
            raise ValueError("this VARSR has no VQVAE attached (use model.build or set_vqvae)")
        lr_images, labels = self._check_generate_inputs(lr_images, label, class_labels)
        dev = self.word_embed.weight.device
        B, n_last = labels.numel(), self.patch_nums[-1] ** 2
        if refiner_noise is not None and tuple(refiner_noise.shape) != (B, n_last, self.Cvae):
            raise ValueError(
                f"refiner_noise must have shape {(B, n_last, self.Cvae)}, got {tuple(refiner_noise.shape)}"
            )
        gens = resolve_generators(generator, B, dev)
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        f_hat, tokens, h_last = self._sample_tokens(lr_images, labels.to(dev), cfg, top_k, top_p, gens)
        sync()
        t1 = time.perf_counter()
        f_hat = f_hat + self._refine(h_last, tokens[-1], cfg, gens, refiner_noise)
        sync()
        t2 = time.perf_counter()
        if return_fhat:
            out = f_hat
        else:
            out = ((self.vqvae.fhat_to_img(f_hat).float() + 1) / 2).clamp_(0, 1).contiguous()
        sync()
        info = GenerationInfo(tokens=tokens, ar_s=t1 - t0, refiner_s=t2 - t1, decode_s=time.perf_counter() - t2)
        return (out, info) if return_info else out

    def _sample_tokens(self, lr_images, labels, cfg: float, top_k: int, top_p: float, gens):
        """The guided scale-by-scale loop (docs/MODEL.md §4.2) with a KV cache owned by this call.

        Returns (f_hat of the sampled codes (B, Cvae, pn_last, pn_last) float32, the K sampled code maps (B, pn²),
        the last level's block output for both branches (2B, pn_last², C)).
        """
        dev = labels.device
        B, K = labels.numel(), self.cfg.num_scales
        neg = torch.full_like(labels, self.num_classes - 1 if self.cfg.variant == "isr" else self.num_classes)
        cond_BD = self.class_emb(torch.cat([labels, neg]))  # (2B, C)
        sos = cond_BD[:, None]
        if self.prefix_len:
            prefix = self.encode_prefix(lr_images.to(dev) * 2 - 1, fp32=False)
            sos = torch.cat([prefix.repeat(2, 1, 1), sos.to(prefix.dtype)], dim=1)
        x = sos + self.pos_start + self.lvl_embed.weight[0]
        cos, sin = self.rope(dev)
        f_hat = torch.zeros(B, self.Cvae, self.patch_nums[-1], self.patch_nums[-1], device=dev)
        cache = KVCache(len(self.blocks), self.cfg.seq_len)
        cursor, h, tokens = 0, None, []
        for si, pn in enumerate(self.patch_nums):
            n = x.shape[1]
            h = self.run_blocks(x, cond_BD, (cos[cursor : cursor + n], sin[cursor : cursor + n]), None, cache)
            cursor += n
            logits = self.logits(h[:, -1:] if si == 0 else h, cond_BD)  # si = 0: the class token only
            t = self._guidance(si, cfg)
            logits = (1 + t) * logits[:B] - t * logits[B:]
            idx = sample_top_k_top_p(logits, top_k, top_p, generator=gens)  # (B, pn²)
            tokens.append(idx)
            h_BChw = self.vqvae.embed_idx(idx).float().transpose(1, 2).reshape(B, self.Cvae, pn, pn)
            f_hat, nxt = self.vqvae.get_next_autoregressive_input(si, f_hat, h_BChw)
            if si < K - 1:
                x = self.word_embed(nxt.flatten(2).transpose(1, 2).float()) + self.lvl_embed.weight[si + 1]
                x = x.repeat(2, 1, 1)
        return f_hat, tokens, h

    def _refine(self, h_last, idx_last, cfg: float, gens, refiner_noise) -> torch.Tensor:
        """Refiner residual (B, Cvae, pn_last, pn_last) in latent units (docs/MODEL.md §3.4): per image, guided with
        s = cfg between z = decoder_norm(h_last + word_embed(e_last)) of the two branches."""
        B, pn = idx_last.shape[0], self.patch_nums[-1]
        dev = h_last.device
        e = self.vqvae.embed_idx(idx_last).float()
        z = self.refiner_condition(h_last, e.repeat(2, 1, 1))
        res = []
        for b in range(B):
            noise = None if refiner_noise is None else refiner_noise[b].to(dev, torch.float32)
            res.append(self.diffloss.sample(z[b], z[B + b], cfg, noise=noise, generator=gens[b] if gens else None))
        residual = torch.stack(res).float()  # (B, n_last, Cvae)
        return residual.transpose(1, 2).reshape(B, self.Cvae, pn, pn)


@dataclass
class GenerationInfo:
    """What one ``generate`` call sampled and where its time went (seconds; decode_s ≈ 0 with return_fhat)."""

    tokens: list[torch.Tensor] = field(default_factory=list)  # the K sampled code maps (B, pn_k²)
    ar_s: float = 0.0
    refiner_s: float = 0.0
    decode_s: float = 0.0

    def timings(self) -> dict[str, float]:
        return dict(ar_s=self.ar_s, refiner_s=self.refiner_s, decode_s=self.decode_s)
