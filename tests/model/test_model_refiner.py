"""Diffusion refiner (docs/MODEL.md §3): schedule numbers, key layout, loss, sampler determinism and guidance
algebra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from model.config import VARSRConfig
from model.diffusion_schedule import GaussianSchedule, cosine_betas, space_timesteps
from model.refiner import DiffLoss


@pytest.fixture(scope="module")
def tiny():
    cfg = VARSRConfig.preset("tiny")
    torch.manual_seed(0)
    dl = DiffLoss(cfg)
    # give the zero-initialised adaLN/final layers random weights so every branch of the net matters
    with torch.no_grad():
        for p in dl.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return cfg, dl


def test_training_schedule_numbers():
    b = cosine_betas(1000)
    assert b.dtype == np.float64 and len(b) == 1000
    assert b[0] == pytest.approx(4.128e-05, rel=1e-3)
    assert b[999] == 0.999
    assert np.cumprod(1 - b)[999] == pytest.approx(2.43e-09, rel=1e-2)


def test_respaced_schedule_numbers():
    cfg = VARSRConfig.preset("tiny")
    s = DiffLoss(cfg).sample_schedule
    assert space_timesteps(1000, 10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert s.timestep_map == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    beta = [
        4.128e-05,
        3.437e-02,
        9.272e-02,
        1.5305e-01,
        2.1934e-01,
        2.9716e-01,
        3.9574e-01,
        5.3252e-01,
        7.4237e-01,
        0.9999999,
    ]
    abar = [0.99996, 0.96559, 0.87606, 0.74197, 0.57923, 0.40711, 0.24600, 0.11500, 0.029628, 2.43e-09]
    np.testing.assert_allclose(s.betas, beta, rtol=2e-3)
    np.testing.assert_allclose(s.alphas_cumprod, abar, rtol=2e-3)
    plv = [-10.096, -10.096, -3.660, -2.610, -2.006, -1.556, -1.167, -0.790, -0.390, -0.030]
    np.testing.assert_allclose(s.posterior_log_variance_clipped, plv, atol=2e-3)
    logb = [-10.095, -3.370, -2.378, -1.877, -1.517, -1.213, -0.927, -0.630, -0.298]
    np.testing.assert_allclose(s.log_betas[:9], logb, atol=2e-3)
    assert abs(s.log_betas[9]) < 1e-6


def test_schedule_gathers_float32_on_device_and_rejects_bad_respacing():
    s = GaussianSchedule(cosine_betas(1000))
    v = s.at("sqrt_alphas_cumprod", torch.tensor([0, 999]))
    assert v.dtype == torch.float32 and v.shape == (2, 1)
    with pytest.raises(ValueError, match="respace"):
        space_timesteps(1000, 0)
    with pytest.raises(ValueError, match="schedule"):
        DiffLoss(VARSRConfig.preset("tiny", refiner_schedule="sqrt"))


def test_released_refiner_keys_and_count():
    cfg = VARSRConfig.preset("d24")
    holder = nn.Module()
    with torch.device("meta"):
        holder.diffloss = DiffLoss(cfg)
    sd = {k: tuple(v.shape) for k, v in holder.state_dict().items()}
    expect = {
        "diffloss.net.time_embed.mlp.0.weight": (1024, 256),
        "diffloss.net.time_embed.mlp.0.bias": (1024,),
        "diffloss.net.time_embed.mlp.2.weight": (1024, 1024),
        "diffloss.net.time_embed.mlp.2.bias": (1024,),
        "diffloss.net.cond_embed.weight": (1024, 1536),
        "diffloss.net.cond_embed.bias": (1024,),
        "diffloss.net.input_proj.weight": (1024, 32),
        "diffloss.net.input_proj.bias": (1024,),
        "diffloss.net.final_layer.linear.weight": (64, 1024),
        "diffloss.net.final_layer.linear.bias": (64,),
        "diffloss.net.final_layer.adaLN_modulation.1.weight": (2048, 1024),
        "diffloss.net.final_layer.adaLN_modulation.1.bias": (2048,),
    }
    for i in range(6):
        p = f"diffloss.net.res_blocks.{i}."
        expect.update(
            {
                p + "in_ln.weight": (1024,),
                p + "in_ln.bias": (1024,),
                p + "mlp.0.weight": (1024, 1024),
                p + "mlp.0.bias": (1024,),
                p + "mlp.2.weight": (1024, 1024),
                p + "mlp.2.bias": (1024,),
                p + "adaLN_modulation.1.weight": (3072, 1024),
                p + "adaLN_modulation.1.bias": (3072,),
            }
        )
    assert sd == expect
    assert sum(p.numel() for p in holder.parameters()) == pytest.approx(36.586e6, abs=1e3)


def test_dit_init_zeroes_modulation_and_output():
    dl = DiffLoss(VARSRConfig.preset("tiny"))
    net = dl.net
    assert not net.final_layer.linear.weight.any() and not net.final_layer.adaLN_modulation[1].weight.any()
    assert all(not b.adaLN_modulation[1].weight.any() for b in net.res_blocks)
    assert net.input_proj.weight.std() > 0 and not net.input_proj.bias.any()


def test_time_embedding_is_cos_then_sin():
    from model.refiner import TimestepEmbedder

    e = TimestepEmbedder.sinusoidal(torch.tensor([0, 5]), 256)
    assert e.shape == (2, 256)
    torch.testing.assert_close(e[0, :128], torch.ones(128))
    torch.testing.assert_close(e[0, 128:], torch.zeros(128))
    torch.testing.assert_close(e[1, 0], torch.cos(torch.tensor(5.0)))
    torch.testing.assert_close(e[1, 128], torch.sin(torch.tensor(5.0)))


def test_loss_decreases_on_a_fixed_set():
    cfg = VARSRConfig.preset("tiny")
    torch.manual_seed(0)
    dl = DiffLoss(cfg)
    z = torch.randn(64, cfg.C)
    residual = 0.3 * torch.tanh(z[:, : cfg.vqvae.z_channels] * 2)  # a learnable function of the condition

    def eval_loss() -> float:
        with torch.no_grad():
            return float(np.mean([float(dl.loss(z, residual, torch.Generator().manual_seed(s))) for s in range(8)]))

    before = eval_loss()
    opt = torch.optim.AdamW(dl.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(100):
        loss = dl.loss(z, residual, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.5 * before, (before, after)


def test_loss_is_deterministic_for_a_generator_and_checks_shapes(tiny):
    cfg, dl = tiny
    z, r = torch.randn(8, cfg.C), torch.randn(8, cfg.vqvae.z_channels) * 0.2
    a = dl.loss(z, r, torch.Generator().manual_seed(5))
    b = dl.loss(z, r, torch.Generator().manual_seed(5))
    assert a.ndim == 0 and torch.equal(a, b) and torch.isfinite(a)
    with pytest.raises(ValueError, match="residual must be"):
        dl.loss(z, torch.zeros(8, 3))


def test_sample_deterministic(tiny):
    cfg, dl = tiny
    zp, zn = torch.randn(6, cfg.C), torch.randn(6, cfg.C)
    a = dl.sample(zp, zn, 2.0, generator=torch.Generator().manual_seed(0))
    b = dl.sample(zp, zn, 2.0, generator=torch.Generator().manual_seed(0))
    c = dl.sample(zp, zn, 2.0, generator=torch.Generator().manual_seed(1))
    assert a.shape == (6, cfg.vqvae.z_channels) and torch.equal(a, b) and not torch.equal(a, c)
    noise = torch.randn(6, cfg.vqvae.z_channels)
    d = dl.sample(zp, None, 0.0, noise=noise, generator=torch.Generator().manual_seed(3))
    e = dl.sample(zp, None, 0.0, noise=noise, generator=torch.Generator().manual_seed(3))
    assert torch.equal(d, e)
    # result is in latent units: x0 is clamped to [-1, 1] at every step, so the output is within ±refiner_scale
    assert float(a.abs().max()) <= cfg.refiner_scale + 1e-5


def test_guidance_algebra(tiny):
    cfg, dl = tiny
    zp = torch.randn(5, cfg.C)
    zn1, zn2 = torch.randn(5, cfg.C), torch.randn(5, cfg.C)
    noise = torch.randn(5, cfg.vqvae.z_channels)

    def run(zn, s):
        return dl.sample(zp, zn, s, noise=noise, generator=torch.Generator().manual_seed(9))

    torch.testing.assert_close(run(zn1, 0.0), run(zn2, 0.0), atol=1e-6, rtol=0)  # cfg 0: negative has no influence
    assert not torch.allclose(run(zn1, 3.0), run(zn2, 3.0))


def test_sample_matches_reference_loop(tiny):
    """Upstream's doubled-batch loop, written out: [x1; x1] into the net, guided ε in both halves, first half kept."""
    cfg, dl = tiny
    s, N, C = 1.5, 4, cfg.vqvae.z_channels
    zp, zn = torch.randn(N, cfg.C), torch.randn(N, cfg.C)
    noise = torch.randn(N, C)
    out = dl.sample(zp, zn, s, noise=noise, generator=torch.Generator().manual_seed(4))

    sch = dl.sample_schedule
    g = torch.Generator().manual_seed(4)
    x = torch.cat([noise, noise]).double()
    with torch.no_grad():
        for i in reversed(range(10)):
            half = x[:N]
            o = dl.net(
                torch.cat([half, half]).float(), torch.full((2 * N,), sch.timestep_map[i]), torch.cat([zp, zn])
            ).double()
            eps = (1 + s) * o[:N, :C] - s * o[N:, :C]
            eps, v = torch.cat([eps, eps]), o[:, C:]
            x0 = (np.sqrt(1 / sch.alphas_cumprod[i]) * x - np.sqrt(1 / sch.alphas_cumprod[i] - 1) * eps).clamp(-1, 1)
            mean = sch.posterior_mean_coef1[i] * x0 + sch.posterior_mean_coef2[i] * x
            frac = (v + 1) / 2
            logvar = frac * np.log(sch.betas[i]) + (1 - frac) * sch.posterior_log_variance_clipped[i]
            z = torch.randn(2 * N, C, generator=g).double()
            x = mean + (torch.exp(0.5 * logvar) * z if i > 0 else 0)
    torch.testing.assert_close(out, (x[:N] * cfg.refiner_scale).float(), atol=1e-4, rtol=1e-4)


def test_sample_under_bf16_autocast(tiny):
    cfg, dl = tiny
    zp, zn = torch.randn(4, cfg.C), torch.randn(4, cfg.C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dl.sample(zp, zn, 2.0, generator=torch.Generator().manual_seed(0))
        loss = dl.loss(zp, torch.randn(4, cfg.vqvae.z_channels) * 0.1, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and torch.isfinite(loss)


def test_loss_value_and_detached_vb_mean(tiny):
    """Loss = mean(ε-MSE + VB/ln2) with the VB mean built from a detached ε̂: check value and ε̂ gradient in float64."""
    import copy

    cfg, dl0 = tiny
    dl = copy.deepcopy(dl0)
    C, rows = cfg.vqvae.z_channels, 6
    M = rows * cfg.diffusion_batch_mul

    class Fixed(nn.Module):
        def __init__(self, out):
            super().__init__()
            self.out = nn.Parameter(out)

        def forward(self, x, t, c):
            return self.out

    torch.manual_seed(11)
    dl.net = Fixed(torch.randn(M, 2 * C) * 0.5)
    z, r = torch.randn(rows, cfg.C), torch.randn(rows, C) * 0.3
    # pick a seed whose draw contains a t = 0 row, so the decoder-NLL branch is exercised too
    seed_found = -1
    for s in range(5000):
        t = torch.randint(0, 1000, (M,), generator=torch.Generator().manual_seed(s))
        if (t == 0).any():
            seed_found = s
            break
    loss = dl.loss(z, r, torch.Generator().manual_seed(seed_found))
    loss.backward()

    g = torch.Generator().manual_seed(seed_found)
    t = torch.randint(0, 1000, (M,), generator=g)
    noise = torch.randn(M, C, generator=g).double()
    assert (t == 0).any()
    sch = dl.train_schedule
    ti = t.numpy()
    col = lambda a: torch.from_numpy(a[ti])[:, None]  # noqa: E731
    x0 = (r.double() / cfg.refiner_scale).repeat(cfg.diffusion_batch_mul, 1)
    xt = col(sch.sqrt_alphas_cumprod) * x0 + col(sch.sqrt_one_minus_alphas_cumprod) * noise
    out = dl.net.out.detach().double()
    eps, v = out[:, :C], out[:, C:]
    mse = ((noise - eps) ** 2).mean(1)
    x0_hat = col(sch.sqrt_recip_alphas_cumprod) * xt - col(sch.sqrt_recipm1_alphas_cumprod) * eps
    mean_p = col(sch.posterior_mean_coef1) * x0_hat + col(sch.posterior_mean_coef2) * xt
    mean_q = col(sch.posterior_mean_coef1) * x0 + col(sch.posterior_mean_coef2) * xt
    lv_q = col(sch.posterior_log_variance_clipped)
    frac = (v + 1) / 2
    lv_p = frac * col(np.log(sch.betas)) + (1 - frac) * lv_q
    kl = 0.5 * (-1 + lv_p - lv_q + torch.exp(lv_q - lv_p) + (mean_q - mean_p) ** 2 * torch.exp(-lv_p))
    phi = lambda u: 0.5 * (1 + torch.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))  # noqa: E731
    inv = torch.exp(-0.5 * lv_p)
    cp, cm = phi(inv * (x0 - mean_p + 1 / 255)), phi(inv * (x0 - mean_p - 1 / 255))
    logp = torch.where(
        x0 < -0.999,
        torch.log(cp.clamp(min=1e-12)),
        torch.where(x0 > 0.999, torch.log((1 - cm).clamp(min=1e-12)), torch.log((cp - cm).clamp(min=1e-12))),
    )
    vb = torch.where(t == 0, -logp.mean(1), kl.mean(1)) / np.log(2)
    expect = (mse + vb).mean()
    assert float(loss.detach()) == pytest.approx(float(expect), rel=1e-4)
    # gradient w.r.t. ε̂ comes from the MSE only (VB sees a detached mean)
    torch.testing.assert_close(dl.net.out.grad[:, :C].double(), -2 * (noise - eps) / (C * M), atol=1e-6, rtol=1e-4)
    assert dl.net.out.grad[:, C:].abs().sum() > 0  # the variance output learns from VB


def test_condition_shape_errors(tiny):
    cfg, dl = tiny
    with pytest.raises(ValueError, match=r"z_pos must be \(N, 128\)"):
        dl.sample(torch.zeros(3, 5), None, 0.0)
    with pytest.raises(ValueError, match="z_neg"):
        dl.sample(torch.zeros(3, cfg.C), torch.zeros(2, cfg.C), 1.0)
    with pytest.raises(ValueError, match="rows"):
        dl.loss(torch.zeros(3, cfg.C), torch.zeros(2, cfg.vqvae.z_channels))
