"""Gaussian diffusion tables and likelihood terms of the refiner (docs/MODEL.md §3.3-docs/MODEL.md §3.4; IDDPM
conventions).

All tables are float64 NumPy arrays (the upstream precision); values are gathered per timestep as float32 tensors on
the caller's device, so the network may run under autocast while the schedule arithmetic never does.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """IDDPM cosine schedule: abar(s) = cos²(((s + 0.008)/1.008)·π/2), β_i = min(1 - abar((i+1)/T)/abar(i/T), 0.999)."""

    def abar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), max_beta) for i in range(num_steps)], dtype=np.float64
    )


def linear_betas(num_steps: int) -> np.ndarray:
    """DDPM linear schedule scaled to num_steps (1e-4 … 0.02 at 1000 steps)."""
    scale = 1000 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


def make_betas(schedule: str, num_steps: int) -> np.ndarray:
    if schedule == "cosine":
        return cosine_betas(num_steps)
    if schedule == "linear":
        return linear_betas(num_steps)
    raise ValueError(f"unknown refiner noise schedule {schedule!r}; choose 'cosine' or 'linear'")


def space_timesteps(num_steps: int, count: int) -> list[int]:
    """Evenly respaced subset of original steps (IDDPM "N" respacing): round(i·(T-1)/(N-1)), e.g. 0, 111, …, 999."""
    if not 1 <= count <= num_steps:
        raise ValueError(f"cannot respace {num_steps} diffusion steps into {count}")
    stride = 1.0 if count == 1 else (num_steps - 1) / (count - 1)
    return [round(i * stride) for i in range(count)]


class GaussianSchedule:
    """Tables of one (possibly respaced) diffusion process; `timestep_map[i]` is the original step the net is told."""

    def __init__(self, betas: np.ndarray, timestep_map: list[int] | None = None):
        b = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(b)
        self.timestep_map = list(range(len(b))) if timestep_map is None else list(timestep_map)
        self.betas = b
        alphas = 1.0 - b
        self.alphas_cumprod = ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)
        self.posterior_variance = pv = b * (1.0 - ac_prev) / (1.0 - ac)
        # posterior variance is 0 at t = 0: clip the log by repeating the value at t = 1
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:])) if len(b) > 1 else np.log(b)
        self.log_betas = np.log(b)
        self.posterior_mean_coef1 = b * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    @classmethod
    def respaced(cls, base_betas: np.ndarray, use_timesteps: list[int]) -> "GaussianSchedule":
        """Keep only `use_timesteps`: β'_i = 1 - abar(t_i)/abar(t_{i-1}) (abar before the first kept step = 1)."""
        keep = set(use_timesteps)
        last, new_betas, tmap = 1.0, [], []
        for i, a in enumerate(np.cumprod(1.0 - np.asarray(base_betas, dtype=np.float64))):
            if i in keep:
                new_betas.append(1 - a / last)
                last = a
                tmap.append(i)
        return cls(np.array(new_betas), tmap)

    # ---- gathering ---------------------------------------------------------------------------------------------------
    def at(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """table[t] as float32 (N, 1) on t's device."""
        key = (name, str(t.device))
        tab = self._cache.get(key)
        if tab is None:
            tab = self._cache[key] = torch.from_numpy(getattr(self, name)).to(t.device)
        return tab[t].float().unsqueeze(-1)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Respaced indices -> original timesteps given to the network."""
        return torch.as_tensor(self.timestep_map, device=t.device)[t]

    # ---- process -----------------------------------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.at("sqrt_alphas_cumprod", t) * x0 + self.at("sqrt_one_minus_alphas_cumprod", t) * noise

    def q_posterior_mean(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.at("posterior_mean_coef1", t) * x0 + self.at("posterior_mean_coef2", t) * xt

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self.at("sqrt_recip_alphas_cumprod", t) * xt - self.at("sqrt_recipm1_alphas_cumprod", t) * eps

    def learned_range_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log σ² = frac·log β_t + (1 - frac)·log σ̃²_t (clipped), frac = (v + 1)/2."""
        frac = (v + 1) / 2
        return frac * self.at("log_betas", t) + (1 - frac) * self.at("posterior_log_variance_clipped", t)

    def p_mean_log_variance(
        self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, v: torch.Tensor, clip_x0: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of p(x_{t-1} | x_t) from the ε prediction and the variance interpolation v."""
        x0 = self.predict_x0(xt, t, eps)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        return self.q_posterior_mean(x0, xt, t), self.learned_range_log_variance(v, t)


# ---- likelihood terms (IDDPM) ----------------------------------------------------------------------------------------
def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log-probability of x under a Gaussian discretised into 255 bins over [-1, 1] (image-style decoder NLL)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
