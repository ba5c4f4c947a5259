"""Diffusion refiner (docs/MODEL.md §3): a small MLP denoiser that predicts the last-scale quantisation error.

Per final-scale token, conditioned on the transformer feature z, it models x0 = (R - e_last) / refiner_scale, the
continuous residual the discrete codes miss. Training: ε-MSE + VB (learned-range variance) on a 1000-step cosine
schedule. Inference: 10-step respaced ancestral sampling with guidance on ε, result rescaled to latent units.
Held as attribute `diffloss` of the transformer, its keys are `diffloss.net.*` as in the released checkpoint
(docs/MODEL.md §6.1)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from model.config import VARSRConfig
from model.diffusion_schedule import (
    GaussianSchedule,
    discretized_gaussian_log_likelihood,
    make_betas,
    normal_kl,
    space_timesteps,
)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Integer timestep -> sinusoidal features [cos, sin] (dim 256) -> Linear -> SiLU -> Linear."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoidal(t, self.freq_dim))


class ResBlock(nn.Module):
    """x + gate·MLP(modulate(LN(x), shift, scale)); (shift, scale, gate) = Linear(SiLU(y)) in that row order."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    """Linear(modulate(LN(x), shift, scale)) with a non-affine LN; (shift, scale) row order."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """(x_t, t, c) -> (ε̂, v): input_proj(x_t) through AdaLN res-blocks driven by y = time_embed(t) + cond_embed(c)."""

    def __init__(self, in_channels: int, width: int, out_channels: int, cond_channels: int, depth: int):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, out_channels)

    def trunk(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Res-blocks + final layer on the projected input h and the AdaLN condition y."""
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.input_proj(x), self.time_embed(t) + self.cond_embed(c))

    def init_weights_dit(self) -> None:
        """DiT/MAR init: xavier-uniform Linears with zero bias, N(0, 0.02) time MLP, zeroed adaLN and output layers."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)


class DiffLoss(nn.Module):
    """Refiner wrapper: the denoiser `net`, its training loss and its guided sampler."""

    def __init__(self, cfg: VARSRConfig):
        super().__init__()
        self.in_channels = cfg.vqvae.z_channels
        self.cond_channels = cfg.C
        self.scale = float(cfg.refiner_scale)
        self.batch_mul = int(cfg.diffusion_batch_mul)
        if self.scale <= 0 or self.batch_mul < 1:
            raise ValueError(
                f"refiner_scale must be > 0 and diffusion_batch_mul >= 1 "
                f"(got {cfg.refiner_scale}, {cfg.diffusion_batch_mul})"
            )
        self.net = SimpleMLPAdaLN(self.in_channels, cfg.refiner_width, 2 * self.in_channels, cfg.C, cfg.refiner_depth)
        betas = make_betas(cfg.refiner_schedule, cfg.refiner_train_steps)
        self.train_schedule = GaussianSchedule(betas)
        self.sample_schedule = GaussianSchedule.respaced(
            betas, space_timesteps(cfg.refiner_train_steps, cfg.refiner_sample_steps)
        )
        self.init_weights_dit()

    def init_weights_dit(self) -> None:
        self.net.init_weights_dit()

    def _check(self, name: str, t: torch.Tensor, ch: int) -> None:
        if t.ndim != 2 or t.shape[1] != ch:
            raise ValueError(f"{name} must be (N, {ch}), got {tuple(t.shape)}")

    # ---- training (docs/MODEL.md §3.3) -------------------------------------------------------------------------------
    def loss(self, z: torch.Tensor, residual: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean over rows of ε-MSE + VB (mean detached; decoder NLL at t = 0), target x0 = residual / scale."""
        self._check("residual", residual, self.in_channels)
        self._check("z", z, self.cond_channels)
        if z.shape[0] != residual.shape[0]:
            raise ValueError(f"z has {z.shape[0]} rows but residual has {residual.shape[0]}")
        sch, C = self.train_schedule, self.in_channels
        x0 = (residual.float() / self.scale).repeat(self.batch_mul, 1)
        z = z.repeat(self.batch_mul, 1)
        N, dev = x0.shape[0], x0.device
        t = torch.randint(0, sch.num_timesteps, (N,), device=dev, generator=generator)
        noise = torch.randn(x0.shape, device=dev, generator=generator)
        xt = sch.q_sample(x0, t, noise)
        eps, v = self.net(xt, t, z).float().split(C, dim=1)
        mse = (noise - eps).square().mean(dim=1)
        # VB term: only the variance output v gets gradient from it (the mean uses a detached ε̂)
        mean_p, logvar_p = sch.p_mean_log_variance(xt, t, eps.detach(), v, clip_x0=False)
        kl = normal_kl(sch.q_posterior_mean(x0, xt, t), sch.at("posterior_log_variance_clipped", t), mean_p, logvar_p)
        nll = -discretized_gaussian_log_likelihood(x0, mean_p, 0.5 * logvar_p)
        vb = torch.where(t == 0, nll.mean(dim=1), kl.mean(dim=1)) / math.log(2.0)
        return (mse + vb).mean()

    def forward(
        self, z: torch.Tensor, residual: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return self.loss(z, residual, generator)

    # ---- inference (docs/MODEL.md §3.4) ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        z_pos: torch.Tensor,
        z_neg: torch.Tensor | None,
        cfg: float,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Respaced ancestral sampling; returns (N, Cvae) in latent units (× refiner_scale).

        With z_neg, the net sees [x; x] with conditions [z_pos; z_neg] and ε = (1 + cfg)·ε_pos - cfg·ε_neg; the
        variance stays the positive branch's. Per-step noise is drawn for both halves (the upstream RNG stream) and the
        first half is kept, which equals upstream's result for its first half.
        """
        sch, C = self.sample_schedule, self.in_channels
        self._check("z_pos", z_pos, self.cond_channels)
        N, dev = z_pos.shape[0], z_pos.device
        guided = z_neg is not None
        if guided and z_neg.shape != z_pos.shape:
            raise ValueError(f"z_neg {tuple(z_neg.shape)} must match z_pos {tuple(z_pos.shape)}")
        if noise is None:
            noise = torch.randn(N, C, device=dev, generator=generator)
        self._check("noise", noise, C)
        if noise.shape[0] != N:
            raise ValueError(f"noise has {noise.shape[0]} rows, z_pos has {N}")
        x = noise.to(device=dev, dtype=torch.float32)
        net = self.net
        c_emb = net.cond_embed(torch.cat([z_pos, z_neg]) if guided else z_pos)  # constant over the steps
        rows = 2 * N if guided else N
        for i in reversed(range(sch.num_timesteps)):
            t = torch.full((N,), i, device=dev, dtype=torch.long)
            t_model = torch.tensor([sch.timestep_map[i]], device=dev)
            h = net.input_proj(x)
            out = net.trunk(h.repeat(2, 1) if guided else h, c_emb + net.time_embed(t_model)).float()
            eps, v = out[:N, :C], out[:N, C:]
            if guided:
                eps = (1 + cfg) * eps - cfg * out[N:, :C]
            mean, logvar = sch.p_mean_log_variance(x, t, eps, v, clip_x0=True)
            step_noise = torch.randn(rows, C, device=dev, generator=generator)[:N]
            x = mean + torch.exp(0.5 * logvar) * step_noise * temperature if i > 0 else mean
        return x * self.scale
