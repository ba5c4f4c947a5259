"""Determinism and random streams: the same seed gives the same tokens and image; each image (and tile) draws from
its own stream derived from the seed; an image in a batch equals that image alone, with its own stream."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from model import VARSRConfig, build
from model.sampling import derive_seed, image_generators, resolve_generators, stream_generator
from model.vae_layers import AttnBlock


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    vqvae, varsr = build(VARSRConfig.preset("tiny", init_adaln_gamma=1.0))
    return vqvae, varsr.eval()


def _run(varsr, lr, generator, **kw):
    kw = {"top_k": 20, "top_p": 0.9, **kw}  # real sampling, so the streams matter
    img, info = varsr.generate(lr, generator=generator, return_info=True, **kw)
    return img, info.tokens


def test_same_seed_same_tokens_and_image(model):
    _, varsr = model
    lr = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a, ta = _run(varsr, lr, torch.Generator().manual_seed(7))
    b, tb = _run(varsr, lr, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(ta, tb))
    c, tc = _run(varsr, lr, torch.Generator().manual_seed(8))  # another seed changes tokens or refiner noise
    assert not torch.equal(a, c)


def test_derived_streams_differ_per_image_and_tile_and_are_reproducible():
    keys = [(s, i, t) for s in (0, 1) for i in range(3) for t in range(3)]
    seeds = [derive_seed(*k) for k in keys]
    assert len(set(seeds)) == len(keys) and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [derive_seed(*k) for k in keys]  # a pure function of (seed, image, tile)
    assert derive_seed(0, 1, 2) != derive_seed(0, 2, 1)  # the path is ordered
    draws = [torch.randn(64, generator=stream_generator(*k)) for k in keys]
    again = [torch.randn(64, generator=stream_generator(*k)) for k in keys]
    assert all(torch.equal(a, b) for a, b in zip(draws, again))
    for i in range(len(draws)):  # no two streams start alike
        for j in range(i):
            assert not torch.allclose(draws[i], draws[j])
    gens = image_generators(5, 3, start=2)
    assert [g.initial_seed() for g in gens] == [derive_seed(5, i) for i in (2, 3, 4)]
    with pytest.raises(ValueError, match="one per image"):
        resolve_generators(image_generators(0, 2), 3, "cpu")


def test_one_generator_gives_every_image_its_own_noise(model):
    """Two copies of one LR in one batch: greedy tokens agree, but the refiner noise of image 1 is not image 0's."""
    _, varsr = model
    lr = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)).repeat(2, 1, 1, 1)
    f = varsr.generate(lr, top_k=1, generator=torch.Generator().manual_seed(1), return_fhat=True)
    assert float((f[0] - f[1]).abs().max()) > 1e-2
    f2 = varsr.generate(lr, top_k=1, generator=torch.Generator().manual_seed(1), return_fhat=True)
    assert torch.equal(f, f2)


def _rounding_bound(dtype: torch.dtype, magnitude: float, layers: int, reduction: int) -> float:
    """How far two evaluations of the same function may differ when only their summation order differs.

    Batched kernels may add a row's products in another order than the same row alone. A sum of n products in a
    floating format with unit roundoff u carries an error of about sqrt(n)·u relative to the magnitude of its terms
    (the probabilistic rounding bound; the worst case n·u is never approached by blocked GEMMs). A chain of ``layers``
    such reductions adds one such error per layer, relative to the largest magnitude the values reach. The two
    evaluations each carry that error, so they may differ by twice it. No safety factor beyond that model.
    """
    u = torch.finfo(dtype).eps / 2
    return 2 * layers * math.sqrt(reduction) * u * magnitude


def test_batch_equals_each_image_alone(model):
    """Each image keeps its own stream (image_generators(seed, B) in the batch, the same stream alone): the tokens are
    identical, the latents differ only by fp32 summation order (bounded by ``_rounding_bound``), and so does the
    batched decode of a latent from its decode alone.

    The image is checked in these two steps rather than batch image against alone image because the decoder can
    amplify a rounding-level change of its input (a GroupNorm over a nearly constant group divides by a small
    deviation); each step compares the same inputs evaluated in another order, which is what the bound covers.
    """
    vqvae, varsr = model
    cfg = varsr.cfg
    lr = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    labels = [0, 1, 0]
    fb, infob = varsr.generate(
        lr,
        label=torch.tensor(labels),
        generator=image_generators(11, 3),
        top_k=20,
        top_p=0.9,
        return_fhat=True,
        return_info=True,
    )
    img_b = varsr.vqvae.fhat_to_img(fb)
    # layers of sequential reductions on the way to the latent: per scale every Linear of the blocks and the head plus
    # the two attention products per block; per refiner step every Linear of the res blocks and final layer
    linears = lambda m: [x for x in m.modules() if isinstance(x, nn.Linear)]  # noqa: E731
    ar_layers = cfg.num_scales * (len(linears(varsr.blocks)) + 2 * cfg.depth + 1)
    refiner = [*linears(varsr.diffloss.net.res_blocks), *linears(varsr.diffloss.net.final_layer)]
    latent_layers = ar_layers + cfg.refiner_sample_steps * len(refiner)
    red_latent = max(x.in_features for x in linears(varsr))
    # the decoder: every conv plus the two products of each attention block; longest reduction: C_in·k·k of a conv
    convs = [x for x in (vqvae.post_quant_conv, *vqvae.decoder.modules()) if isinstance(x, nn.Conv2d)]
    n_attn = sum(isinstance(x, AttnBlock) for x in vqvae.decoder.modules())
    dec_layers = len(convs) + 2 * n_attn
    red_dec = max(c.in_channels * c.kernel_size[0] * c.kernel_size[1] for c in convs)
    for i in range(3):
        fa, infoa = varsr.generate(
            lr[i : i + 1],
            label=labels[i],
            generator=[stream_generator(11, i)],
            top_k=20,
            top_p=0.9,
            return_fhat=True,
            return_info=True,
        )
        assert all(torch.equal(x[i : i + 1], y) for x, y in zip(infob.tokens, infoa.tokens))
        tol_f = _rounding_bound(torch.float32, float(fa.abs().max()), latent_layers, red_latent)
        assert float((fb[i : i + 1] - fa).abs().max()) <= tol_f
        # the decoder, the same way: image i of the batched decode against the decode of that latent alone
        img_alone = varsr.vqvae.fhat_to_img(fb[i : i + 1])
        tol_img = _rounding_bound(torch.float32, float(img_alone.abs().max()), dec_layers, red_dec)
        assert float((img_b[i : i + 1] - img_alone).abs().max()) <= tol_img
        assert tol_img < 1e-3  # a rounding-level bound, not a loose one


def test_injected_refiner_noise_fixes_the_refiner(model):
    _, varsr = model
    lr = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(1, 16, varsr.cfg.vqvae.z_channels, generator=torch.Generator().manual_seed(3))
    f1 = varsr.generate(lr, generator=torch.Generator().manual_seed(1), refiner_noise=noise, return_fhat=True)
    f2 = varsr.generate(lr, generator=torch.Generator().manual_seed(1), refiner_noise=noise, return_fhat=True)
    f3 = varsr.generate(lr, generator=torch.Generator().manual_seed(1), refiner_noise=noise * 2, return_fhat=True)
    assert torch.equal(f1, f2) and not torch.equal(f1, f3)
    with pytest.raises(ValueError, match="refiner_noise must have shape"):
        varsr.generate(lr, refiner_noise=torch.zeros(2, 2))
