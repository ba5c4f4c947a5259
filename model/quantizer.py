"""Multi-scale residual quantizer with partially shared phi convolutions (docs/MODEL.md §1.3-docs/MODEL.md §1.7).

A latent f (B, Cvae, pn_K, pn_K) is explained coarse-to-fine: at scale k the remaining residual is area-downsampled to
pn_k x pn_k, snapped to its nearest codebook vectors, upsampled back (bicubic), refined by phi, and subtracted.
VARSR's change to VAR: no phi (and no resampling) at the last scale, and the residual left *before* the last scale is
returned as the refiner's continuous target R.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from model.resample import area_down, bicubic_up

# docs/MODEL.md §1.3: the upstream float64 argmin results, hard-coded by (number of scales K, number of phi convs n).
_PHI_TABLES: dict[tuple[int, int], tuple[int, ...]] = {
    (10, 4): (0, 0, 1, 1, 1, 2, 2, 3, 3, 3),  # released patch_nums (1,2,3,4,6,9,13,18,24,32)
    (12, 4): (0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3),  # C2I patch_nums (1,2,3,4,6,9,12,16,20,24,28,32)
}


def phi_ticks(n: int) -> np.ndarray:
    """Positions in [0, 1] of the n shared phi convs; upstream uses a 1/(3n) margin for n = 4 and 1/(2n) otherwise."""
    margin = 1 / (3 * n) if n == 4 else 1 / (2 * n)
    return np.linspace(margin, 1 - margin, n, dtype=np.float64)


def computed_phi_index(si: int, num_scales: int, n: int) -> int:
    """argmin_j |ticks_j - si/(K-1)| in float64, first index on ties."""
    at = si / (num_scales - 1) if num_scales > 1 else 0.0
    return int(np.argmin(np.abs(phi_ticks(n) - at)))


class Phi(nn.Conv2d):
    """phi(h) = (1 - r)·h + r·conv3x3(h): a residual refinement of the upsampled code map."""

    def __init__(self, ch: int, resi_ratio: float):
        super().__init__(ch, ch, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = float(resi_ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul_(self.resi_ratio)


class PhiPartiallyShared(nn.Module):
    """Holds the n phi convs (`qresi_ls.{j}`) shared across the K scales."""

    def __init__(self, ch: int, resi_ratio: float, n: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList([Phi(ch, resi_ratio) for _ in range(n)])


class MultiScaleQuantizer(nn.Module):
    """Codebook `embedding` (V, Cvae), phi convs `quant_resi`, usage statistics buffer `ema_vocab_hit_SV` (K, V)."""

    def __init__(
        self,
        vocab_size: int,
        Cvae: int,
        patch_nums: tuple[int, ...],
        beta: float,
        quant_resi: float,
        share_quant_resi: int,
    ):
        super().__init__()
        if not patch_nums:
            raise ValueError("patch_nums must name at least one scale")
        self.V, self.Cvae, self.beta = vocab_size, Cvae, beta
        self.patch_nums = tuple(int(p) for p in patch_nums)
        K = len(self.patch_nums)
        n = share_quant_resi if share_quant_resi > 0 else K  # 0 = one phi per scale (VAR's "non-shared")
        self.quant_resi = PhiPartiallyShared(Cvae, quant_resi, n)
        self.embedding = nn.Embedding(vocab_size, Cvae)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(K, vocab_size), persistent=True)
        self.record_hit = 0
        table = _PHI_TABLES.get((K, n))
        self.phi_table = table if table is not None else tuple(computed_phi_index(si, K, n) for si in range(K))

    # ---- loading: usage statistics for another number of scales are ignored (docs/MODEL.md §1.3) ---------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape[0] != self.ema_vocab_hit_SV.shape[0]:
            state_dict[key] = self.ema_vocab_hit_SV.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- building blocks ---------------------------------------------------------------------------------------------
    def phi(self, si: int, h: torch.Tensor) -> torch.Tensor:
        return self.quant_resi.qresi_ls[self.phi_table[si]](h)

    def nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code by Euclidean distance, ||z||² + ||e||² - 2 z·e (one matmul), shape (N,)."""
        w = self.embedding.weight.detach()
        d = z_NC.square().sum(dim=1, keepdim=True) + w.square().sum(dim=1)
        d.addmm_(z_NC, w.T, alpha=-2, beta=1)
        return d.argmin(dim=1)

    def code_map(self, idx_Bl: torch.Tensor, pn: int) -> torch.Tensor:
        """(B, pn²) indices -> (B, Cvae, pn, pn) codebook vectors (raster order)."""
        B = idx_Bl.shape[0]
        return self.embedding(idx_Bl).view(B, pn, pn, self.Cvae).permute(0, 3, 1, 2)

    def _quantize_scale(self, f_rest: torch.Tensor, si: int) -> torch.Tensor:
        """Nearest-code indices (B, pn²) of the residual at scale si."""
        B, C = f_rest.shape[:2]
        pn = self.patch_nums[si]
        z = f_rest if si == len(self.patch_nums) - 1 else area_down(f_rest, pn)
        return self.nearest(z.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn * pn)

    # ---- VARSR tokenisation (docs/MODEL.md §1.4) ---------------------------------------------------------------------
    @torch.no_grad()
    def tokenize(self, f: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """f (B, Cvae, pnK, pnK) -> (K index maps (B, pn²), R (B, pnK², Cvae), final f_hat (B, Cvae, pnK, pnK))."""
        B, C, H, W = f.shape
        K = len(self.patch_nums)
        if H != W or H != self.patch_nums[-1]:
            raise ValueError(f"latent side {H}x{W} does not match the last scale {self.patch_nums[-1]}")
        f_rest = f.clone()
        f_hat = torch.zeros_like(f)
        idx_list: list[torch.Tensor] = []
        R = f_rest
        for si, pn in enumerate(self.patch_nums):
            idx = self._quantize_scale(f_rest, si)
            idx_list.append(idx)
            h = self.code_map(idx, pn)
            if si < K - 1:
                h = self.phi(si, bicubic_up(h, H))
            else:
                R = f_rest.flatten(2).transpose(1, 2).contiguous()  # residual before the last scale, raster tokens
            f_hat.add_(h)
            f_rest.sub_(h)
        return idx_list, R, f_hat

    # ---- teacher forcing (docs/MODEL.md §1.5) and AR accumulation (docs/MODEL.md §1.6) -------------------------------
    def idxBl_to_var_input(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """K GT index maps -> (B, L - 1, Cvae): area-downsampled partial f_hat after each scale but the last."""
        K = len(self.patch_nums)
        if len(idx_list) < K:
            raise ValueError(f"expected {K} index maps, got {len(idx_list)}")
        B = idx_list[0].shape[0]
        H = self.patch_nums[-1]
        f_hat = torch.zeros(B, self.Cvae, H, H, device=self.embedding.weight.device, dtype=torch.float32)
        nexts = []
        for si in range(K - 1):
            h = self.code_map(idx_list[si], self.patch_nums[si]).float()
            f_hat.add_(self.phi(si, bicubic_up(h, H)))
            nexts.append(area_down(f_hat, self.patch_nums[si + 1]).flatten(2).transpose(1, 2))
        if not nexts:
            return f_hat.new_zeros(B, 0, self.Cvae)
        return torch.cat(nexts, dim=1)

    def get_next_autoregressive_input(
        self, si: int, f_hat: torch.Tensor, h_BChw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add scale si's codes to f_hat in place; return (f_hat, next-scale input map), or (f_hat, f_hat) at the
        end."""
        K = len(self.patch_nums)
        if si < K - 1:
            f_hat.add_(self.phi(si, bicubic_up(h_BChw, f_hat.shape[-1])))
            return f_hat, area_down(f_hat, self.patch_nums[si + 1])
        f_hat.add_(h_BChw)
        return f_hat, f_hat

    # ---- VAR's VQVAE training forward (docs/MODEL.md §1.7: phi at every scale, straight-through) ---------------------
    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """f -> (straight-through f_hat, mean over scales of beta·commitment + codebook loss, usage % per scale)."""
        B, C, H, W = f.shape
        f_nograd = f.detach()
        f_rest = f_nograd.clone()
        f_hat = torch.zeros_like(f_rest)
        loss = f.new_zeros(())
        for si, pn in enumerate(self.patch_nums):
            idx = self._quantize_scale(f_rest, si)
            if self.training:
                self._record_usage(si, idx)
            h = self.code_map(idx, pn)
            if si < len(self.patch_nums) - 1:
                h = bicubic_up(h, H)
            h = self.phi(si, h)
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            loss = loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_nograd)
        if self.training:
            self.record_hit += 1
        loss = loss / len(self.patch_nums)
        f_st = (f_hat.detach() - f_nograd) + f  # value of f_hat, gradient of f (straight-through)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        margin = world * (f.numel() / C) / self.V * 0.08
        usage = [
            (self.ema_vocab_hit_SV[si] >= margin).float().mean().item() * 100 for si in range(len(self.patch_nums))
        ]
        return f_st, loss, usage

    @torch.no_grad()
    def _record_usage(self, si: int, idx: torch.Tensor) -> None:
        hit = idx.flatten().bincount(minlength=self.V).float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(hit)
        ema = self.ema_vocab_hit_SV[si]
        if self.record_hit == 0:
            ema.copy_(hit)
        elif self.record_hit < 100:
            ema.mul_(0.9).add_(hit, alpha=0.1)
        else:
            ema.mul_(0.99).add_(hit, alpha=0.01)
