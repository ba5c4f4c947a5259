"""VARSR transformer: teacher-forced vs KV-cached logits, RoPE spot values, level mask, parameter counts, c2i."""

from __future__ import annotations

import math

import pytest
import torch

from model import VARSRConfig, build, compute_loss, sample_top_k_top_p
from model.attention import KVCache
from model.rope import apply_rope, rope_angles, rope_frequencies


def _tiny(**kw):
    # strong AdaLN gammas so every block really changes the residual stream (the default 1e-4 is near-identity)
    cfg = VARSRConfig.preset("tiny", init_adaln_gamma=1.0, **kw)
    torch.manual_seed(0)
    return build(cfg)


def _incremental_logits(varsr, x_in, label, lr):
    """KV-cached, scale-by-scale logits fed with the teacher-forcing inputs (the generate() path without sampling)."""
    cond = varsr.class_emb(label)
    sos = cond[:, None]
    if varsr.prefix_len:
        sos = torch.cat([varsr.encode_prefix(lr), sos], dim=1)
    x = sos + varsr.pos_start + varsr.lvl_embed.weight[0]
    cos, sin = varsr.rope("cpu")
    out, cursor, begin = [], 0, 0
    cache = KVCache(len(varsr.blocks), varsr.cfg.seq_len)
    for si in range(len(varsr.patch_nums)):
        n = x.shape[1]
        h = varsr.run_blocks(x, cond, (cos[cursor : cursor + n], sin[cursor : cursor + n]), None, cache)
        cursor += n
        out.append(varsr.logits(h[:, -1:] if si == 0 else h, cond))
        if si + 1 < len(varsr.patch_nums):
            nxt = varsr.patch_nums[si + 1] ** 2
            x = varsr.word_embed(x_in[:, begin : begin + nxt]) + varsr.lvl_embed.weight[si + 1]
            begin += nxt
    return out


@pytest.mark.parametrize("preset", ["tiny", "c2i-tiny"])
def test_teacher_forced_equals_kv_cached_per_scale(preset):
    cfg = VARSRConfig.preset(preset, init_adaln_gamma=1.0)
    torch.manual_seed(0)
    vqvae, varsr = build(cfg)
    varsr.eval()
    g = torch.Generator().manual_seed(1)
    hr = torch.rand(2, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    lr = torch.rand(2, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1 if cfg.variant == "isr" else None
    label = torch.tensor([0, 1])
    idx_list, R = vqvae.img_to_idxBl(hr)
    x_in = vqvae.idxBl_to_var_input(idx_list)
    with torch.no_grad():
        logits, _ = varsr(x_in, label, lr, R)
        inc = _incremental_logits(varsr, x_in, label, lr)
    assert logits.shape == (2, cfg.L, cfg.vqvae.vocab_size)
    assert logits.abs().max() > 1e-3  # not a degenerate all-zero head
    for sl, li in zip(varsr.scale_slices(), inc):
        torch.testing.assert_close(logits[:, sl], li, atol=1e-4, rtol=1e-4)


def test_rope_spot_values_released_geometry():
    sides = [32] + list(VARSRConfig().patch_nums)
    _, varsr = build(VARSRConfig.preset("d24"), device="meta")
    assert varsr.rope_sides() == sides
    ang = rope_angles(sides, grid=32, head_dim=64)
    assert ang.shape == (3264, 32) and ang.dtype == torch.float32
    theta = rope_frequencies(64)
    expect_theta = [
        1,
        0.5623,
        0.3162,
        0.1778,
        0.1,
        0.05623,
        0.03162,
        0.01778,
        0.01,
        0.005623,
        0.003162,
        0.001778,
        0.001,
        5.623e-4,
        3.162e-4,
        1.778e-4,
    ]
    torch.testing.assert_close(theta, torch.tensor(expect_theta), rtol=1e-3, atol=0)
    assert torch.all(ang[1024] == 0)  # class token at (0, 0)
    for r, (x, y) in enumerate([(0, 0), (0, 16), (16, 0), (16, 16)]):
        torch.testing.assert_close(ang[1025 + r, :16], x * theta)  # rows -> pairs 0..15
        torch.testing.assert_close(ang[1025 + r, 16:], y * theta)  # cols -> pairs 16..31
    assert torch.equal(ang[2240:3264], ang[:1024])  # prefix (i,j) and final scale (i,j) share positions
    # pn = 3 sits at the top-left corners 0, 10.667, 21.333 of its cells
    torch.testing.assert_close(ang[1029:1032, 16] / theta[0], torch.tensor([0, 32 / 3, 64 / 3]))


def test_apply_rope_rotates_interleaved_pairs():
    c = 8
    x = torch.zeros(1, 1, 1, c)
    x[..., 0], x[..., 5] = 1.0, 2.0  # pair 0 (row-rotated) and pair 2 (col-rotated) for c = 8
    a = torch.tensor([[0.3, 0.0, 1.1, 0.0]])  # angles for pairs 0..3
    out = apply_rope(x, a.cos(), a.sin())[0, 0, 0]
    torch.testing.assert_close(out[:2], torch.tensor([math.cos(0.3), math.sin(0.3)]))
    torch.testing.assert_close(out[4:6], torch.tensor([-2 * math.sin(1.1), 2 * math.cos(1.1)]))
    assert torch.equal(out[[2, 3, 6, 7]], torch.zeros(4))


def test_level_mask_visibility():
    _, varsr = _tiny()
    lvl = varsr.level_ids("cpu")
    cfg = varsr.cfg
    assert lvl.tolist() == [0] * cfg.first_l + [1] * 4 + [2] * 16
    m = varsr.attn_mask("cpu")
    assert m.dtype == torch.bool and m.shape == (cfg.seq_len, cfg.seq_len)
    for q in range(cfg.seq_len):
        for k in range(cfg.seq_len):
            assert bool(m[q, k]) == bool(lvl[k] <= lvl[q])
    assert m[: cfg.first_l, : cfg.first_l].all()  # level 0 (prefix + class) is bidirectional
    assert not m[: cfg.first_l, cfg.first_l :].any()  # and never sees scale tokens
    # released layout: level token counts of spec Appendix A, and no mask/level buffer in the state dict
    _, big = build(VARSRConfig.preset("d24"), device="meta")
    counts = torch.bincount(big.level_ids("cpu")).tolist()
    assert counts == [1025, 4, 9, 16, 36, 81, 169, 324, 576, 1024]
    keys = big.state_dict().keys()
    assert not any(k.endswith(("lvl_1L", "attn_bias_for_masking", "zero_k_bias")) for k in keys)


def test_d24_parameter_count_matches_spec():
    vqvae, varsr = build(VARSRConfig.preset("d24"), device="meta")
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(varsr) == 1_101_916_448  # spec: 1,101.9 M
    assert round(n(varsr) / 1e6, 1) == 1101.9
    assert all(n(b) == 42_488_856 for b in varsr.blocks)
    per_module = {
        name: round(n(getattr(varsr, name)) / 1e6, 3)
        for name in ["diffloss", "con_embedding", "head", "head_nm", "word_embed", "lvl_embed"]
    }
    assert per_module == dict(
        diffloss=36.586, con_embedding=32.935, head=6.296, head_nm=4.722, word_embed=0.051, lvl_embed=0.015
    )
    assert round(varsr.pos_start.numel() / 1e6, 3) == 1.574
    assert round(n(vqvae) / 1e6, 1) == 108.9
    assert len(varsr.state_dict()) == 405 - 2 - 24  # official entries minus the regenerated buffers


def test_official_key_layout_of_a_block():
    _, varsr = build(VARSRConfig.preset("d24"), device="meta")
    sd = {k: tuple(v.shape) for k, v in varsr.state_dict().items()}
    assert sd["blocks.3.attn.mat_qkv.weight"] == (4608, 1536)
    assert "blocks.3.attn.mat_qkv.bias" not in sd
    assert sd["blocks.3.attn.scale_mul_1H11"] == (1, 24, 1, 1)
    assert sd["blocks.3.ada_lin.1.weight"] == (9216, 1536)
    assert sd["head_nm.ada_lin.1.weight"] == (3072, 1536)
    assert sd["con_embedding.blocks.7.weight"] == (1536, 512, 3, 3)
    assert sd["pos_start"] == (1, 1025, 1536)
    assert sd["class_emb.weight"] == (2, 1536)
    assert sd["diffloss.net.res_blocks.5.adaLN_modulation.1.weight"] == (3072, 1024)


def test_sampler_top_k_top_p():
    logits = torch.tensor([[[0.0, 3.0, 1.0, 2.9]]]).repeat(1, 200, 1)
    g = torch.Generator().manual_seed(0)
    assert torch.all(sample_top_k_top_p(logits, 1, 0.75, g) == 1)  # top-1 = argmax
    draws = sample_top_k_top_p(logits, 2, 0.0, g)
    assert set(draws.unique().tolist()) == {1, 3}  # top-2 keeps exactly the two largest
    # top-p 0.5: sorted probs ~ (0.03, 0.09, 0.42, 0.46): the cumulative mass <= 0.5 removes all but the largest two
    draws = sample_top_k_top_p(logits, 0, 0.5, g)
    assert set(draws.unique().tolist()) == {1, 3}
    with pytest.raises(ValueError, match="top_p"):
        sample_top_k_top_p(logits, 0, 1.5)
    # greedy with tied maxima picks among the tied entries only, at random
    tied = torch.tensor([[[0.0, 3.0, 3.0, 1.0]]]).repeat(1, 200, 1)
    assert set(sample_top_k_top_p(tied, 1, 0.75, g).unique().tolist()) == {1, 2}


def test_generate_shapes_range_and_input_errors():
    vqvae, varsr = _tiny()
    varsr.eval()
    S = varsr.cfg.image_size
    lr = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(0))
    img, info = varsr.generate(lr, generator=torch.Generator().manual_seed(0), return_info=True)
    assert img.shape == (2, 3, S, S) and img.dtype == torch.float32
    assert 0 <= img.min() and img.max() <= 1
    assert [t.shape for t in info.tokens] == [(2, 1), (2, 4), (2, 16)]
    assert set(info.timings()) == {"ar_s", "refiner_s", "decode_s"} and info.decode_s > 0
    f_hat = varsr.generate(lr, generator=torch.Generator().manual_seed(0), return_fhat=True)
    assert f_hat.shape == (2, varsr.cfg.vqvae.z_channels, 4, 4)
    with pytest.raises(ValueError, match=r"shape \(B, 3, 64, 64\)"):
        varsr.generate(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        varsr.generate(lr * 255)
    with pytest.raises(ValueError, match="labels must lie"):
        varsr.generate(lr, label=5)


def test_generate_under_bf16_autocast():
    _, varsr = _tiny()
    varsr.eval()
    lr = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img = varsr.generate(lr, generator=torch.Generator().manual_seed(0))
    assert img.dtype == torch.float32 and torch.isfinite(img).all()


def test_grad_checkpointing_is_numerically_neutral():
    torch.manual_seed(0)
    cfg = VARSRConfig.preset("tiny", init_adaln_gamma=1.0, drop_path_rate=0.0)
    vqvae, varsr = build(cfg)
    hr = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    lr = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    label = torch.tensor([0, 1])
    grads = []
    for ckpt in (False, True):
        varsr.cfg.grad_checkpointing = ckpt
        varsr.zero_grad()
        out = compute_loss(vqvae, varsr, hr, lr, label, generator=torch.Generator().manual_seed(3))
        out.loss.backward()
        grads.append((out.loss.detach(), varsr.blocks[0].attn.mat_qkv.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    assert grads[0][1].abs().sum() > 0


def test_c2i_forward_generate_and_null_class_dropout():
    cfg = VARSRConfig.preset("c2i-tiny", cond_drop_rate=0.5)
    torch.manual_seed(0)
    vqvae, varsr = build(cfg)
    assert varsr.con_embedding is None and varsr.pos_start.shape == (1, 1, cfg.C)
    assert varsr.class_emb.weight.shape[0] == cfg.num_classes + 1
    assert varsr.rope_sides() == list(cfg.patch_nums)
    hr = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = compute_loss(vqvae, varsr, hr, None, torch.tensor([0, 1, 2, 3]))
    assert out.tokens == 4 * cfg.L and torch.isfinite(out.loss)
    # null-class dropout: in training, about half the labels become the null row; in eval none
    seen = []
    orig = varsr.class_emb.forward
    varsr.class_emb.forward = lambda idx: (seen.append(idx.clone()), orig(idx))[1]
    idx_list, R = vqvae.img_to_idxBl(hr * 2 - 1)
    x_in = vqvae.idxBl_to_var_input(idx_list)
    labels = torch.zeros(256, dtype=torch.long)
    varsr.train()
    varsr(x_in.repeat(64, 1, 1), labels, None, R.repeat(64, 1, 1), generator=torch.Generator().manual_seed(0))
    frac = (seen[-1] == cfg.num_classes).float().mean().item()
    assert 0.35 < frac < 0.65 and set(seen[-1].unique().tolist()) <= {0, cfg.num_classes}
    varsr.eval()
    with torch.no_grad():
        varsr(x_in, labels[:4], None, R)
    assert (seen[-1] == 0).all()
    del varsr.class_emb.forward
    img = varsr.generate(None, class_labels=[1, 7], generator=torch.Generator().manual_seed(0))
    assert img.shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="class_labels"):
        varsr.generate(None)
    with pytest.raises(ValueError, match="no LR"):
        varsr.generate(torch.rand(1, 3, 64, 64), class_labels=[0])


def test_the_benchmark_geometry_is_the_issues_research_geometry():
    """benchmarks/model_bench.py --research-geometry: released scales and VQVAE at 512 px, depth 4, width 256."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "model_bench.py"
    spec = importlib.util.spec_from_file_location("model_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = bench.research_config().validate()
    assert (cfg.image_size, cfg.L, cfg.prefix_len, cfg.C, cfg.heads, cfg.depth) == (512, 2240, 1024, 256, 4, 4)
    assert (cfg.refiner_width, cfg.refiner_depth, cfg.vqvae) == (1024, 6, VARSRConfig.preset("d24").vqvae)


def test_segmented_attention_equals_full_level_mask():
    from model.attention import level_segments

    _, varsr = _tiny()
    attn = varsr.blocks[0].attn
    S = varsr.cfg.seq_len
    x = torch.randn(2, S, varsr.C, generator=torch.Generator().manual_seed(0))
    rope = varsr.rope("cpu")
    segs = level_segments(varsr.level_ids("cpu"))
    assert [s[:3] for s in segs] == [(0, 17, 17), (17, 21, 21), (21, 37, 37)]
    assert segs[0][3] is None and segs[2][3] is None
    with torch.no_grad():
        torch.testing.assert_close(attn(x, rope, segs), attn(x, rope, varsr.attn_mask("cpu")), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_the_cpu_presets_lr_prefix_carries_the_lr_at_init(preset):
    """The LR prefix is added to pos_start (docs/MODEL.md §2.4). With the released conv init N(0, 0.02) a narrow
    LR encoder shrinks its input by ~0.02·√fan_in/2 per layer, so at init the prefix is 1e-6..1e-8 of pos_start and a
    short run never learns to read the LR; the CPU presets use the variance-preserving ``lr_encoder_init="fan_in"``."""

    def prefix_spread(cfg):
        torch.manual_seed(0)
        _, varsr = build(cfg)
        S = cfg.image_size
        lr = torch.rand(4, 3, S, S, generator=torch.Generator().manual_seed(1)) * 2 - 1
        with torch.no_grad():
            p = varsr.encode_prefix(lr)
        return float(p.std(0).mean()), float(varsr.pos_start.std())

    cfg = VARSRConfig.preset(preset)
    assert cfg.lr_encoder_init == "fan_in"
    spread, pos = prefix_spread(cfg)
    assert spread > pos  # the LR differences are at least as large as the position embedding they are added to
    spread_up, pos_up = prefix_spread(cfg.replace(lr_encoder_init="upstream"))
    assert spread_up < 1e-3 * pos_up  # the released init on these widths: the LR is invisible
    with pytest.raises(ValueError, match="lr_encoder_init"):
        cfg.replace(lr_encoder_init="kaiming")


def test_ce_weighting_token_is_the_token_mean_and_scale_the_mean_of_scale_means():
    """docs/MODEL.md §5.3: "token" (released) averages CE over all L tokens; "scale" averages the per-scale means."""
    vq, varsr = _tiny()
    S = varsr.cfg.image_size
    g = torch.Generator().manual_seed(3)
    hr, lr = torch.rand(2, 3, S, S, generator=g), torch.rand(2, 3, S, S, generator=g)
    label = torch.zeros(2, dtype=torch.long)
    varsr.eval()
    with torch.no_grad():
        tok = compute_loss(vq, varsr, hr, lr, label, generator=torch.Generator().manual_seed(0))
        varsr.cfg = varsr.cfg.replace(ce_weighting="scale")
        sca = compute_loss(vq, varsr, hr, lr, label, generator=torch.Generator().manual_seed(0))
    n = [pn * pn for pn in varsr.patch_nums]
    per = torch.tensor(tok.ce_per_scale, dtype=torch.float64)
    assert tok.ce_per_scale == pytest.approx(sca.ce_per_scale)
    assert tok.ce.item() == pytest.approx(float((per * torch.tensor(n)).sum() / sum(n)), rel=1e-5)
    assert sca.ce.item() == pytest.approx(float(per.mean()), rel=1e-5)
    assert abs(sca.ce.item() - tok.ce.item()) > 1e-4  # the two weightings differ on these inputs
    assert VARSRConfig.preset("small").ce_weighting == "scale" and VARSRConfig.preset("d24").ce_weighting == "token"


def test_small4_has_four_px_tokens_and_the_sequence_of_small():
    """`small4` (docs/EXPERIMENTS.md): 64-px tiles of 4-px tokens, the 16 x 16 last scale, prefix and sequence of
    `small` (so the transformer costs the same per tile); its stage-1 variant shares the geometry; it generates
    64-px images from 64-px LR inputs and its tokenizer reconstructs 64-px crops."""
    small, s4, c4 = VARSRConfig.preset("small"), VARSRConfig.preset("small4"), VARSRConfig.preset("c2i-small4")
    assert (s4.image_size, s4.vqvae.downsample, s4.lr_encoder_stride) == (64, 4, 4)
    assert s4.pn_last == small.pn_last == 16 and s4.seq_len == small.seq_len and s4.prefix_len == small.prefix_len
    assert (c4.variant, c4.image_size, c4.patch_nums) == ("c2i", 64, s4.patch_nums)
    torch.manual_seed(0)
    vq, var = build(s4)
    lr = torch.rand(2, 3, 64, 64)
    out = var.generate(lr, cfg=0.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()
    idx, R, f_hat = vq.tokenize(lr * 2 - 1)
    assert [i.shape[1] for i in idx] == [p * p for p in s4.patch_nums] and f_hat.shape[-1] == 16
