"""Multi-scale VQVAE (docs/MODEL.md §1): tokeniser identities, phi tables, released key layout, attention, decode,
training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.config import VARSRConfig
from model.quantizer import computed_phi_index
from model.resample import area_down, bicubic_up
from model.vae_layers import AttnBlock
from model.vqvae import VQVAE


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = VARSRConfig.preset("tiny")
    vq = VQVAE(cfg).freeze()
    x = torch.rand(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return cfg, vq, x


def _as_map(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """(B, side², C) raster tokens -> (B, C, side, side)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)


def test_tokeniser_identities(tiny):
    cfg, vq, x = tiny
    K, pnL = cfg.num_scales, cfg.pn_last
    idx_list, R, f_hat_tok = vq.tokenize(x)
    f = vq.encode(x)
    assert [tuple(i.shape) for i in idx_list] == [(2, p * p) for p in cfg.patch_nums]
    assert R.shape == (2, pnL * pnL, cfg.vqvae.z_channels)
    assert all(i.dtype == torch.long and int(i.max()) < cfg.vqvae.vocab_size for i in idx_list)

    # AR accumulation with the GT codes; its next inputs are the teacher-forcing inputs
    f_hat = torch.zeros_like(f)
    nexts = []
    for si, pn in enumerate(cfg.patch_nums):
        h = vq.embed_idx(idx_list[si]).transpose(1, 2).reshape(2, -1, pn, pn)
        if si == K - 1:
            torch.testing.assert_close(f_hat, f - _as_map(R, pnL), atol=1e-5, rtol=1e-5)  # f_hat after K-1 scales
        f_hat, nxt = vq.get_next_autoregressive_input(si, f_hat, h)
        if si < K - 1:
            assert nxt.shape == (2, cfg.vqvae.z_channels, cfg.patch_nums[si + 1], cfg.patch_nums[si + 1])
            nexts.append(nxt.flatten(2).transpose(1, 2))
    torch.testing.assert_close(f_hat, f_hat_tok, atol=1e-5, rtol=1e-5)
    e_last = _as_map(vq.embed_idx(idx_list[-1]), pnL)
    torch.testing.assert_close(f_hat_tok + (_as_map(R, pnL) - e_last), f, atol=1e-5, rtol=1e-5)

    var_in = vq.idxBl_to_var_input(idx_list)
    assert var_in.shape == (2, cfg.L - 1, cfg.vqvae.z_channels)
    torch.testing.assert_close(var_in, torch.cat(nexts, dim=1), atol=1e-6, rtol=1e-6)

    # public pair returned by img_to_idxBl equals tokenize's first two outputs
    idx2, R2 = vq.img_to_idxBl(x)
    assert all(torch.equal(a, b) for a, b in zip(idx2, idx_list)) and torch.equal(R2, R)


def test_first_scale_code_is_nearest_to_the_mean_latent(tiny):
    """Scale 0 (1x1) quantises the area mean of f: check against a brute-force nearest search."""
    cfg, vq, x = tiny
    f = vq.encode(x)
    z = f.mean(dim=(2, 3))  # area down to 1x1
    brute = torch.cdist(z, vq.quantize.embedding.weight).argmin(dim=1)
    assert torch.equal(vq.img_to_idxBl(x)[0][0][:, 0], brute)


def test_tokenisation_is_fp32_under_autocast(tiny):
    cfg, vq, x = tiny
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx, R = vq.img_to_idxBl(x)
    idx_ref, R_ref = vq.img_to_idxBl(x)
    assert R.dtype == torch.float32 and torch.equal(R, R_ref)
    assert all(torch.equal(a, b) for a, b in zip(idx, idx_ref))


def test_phi_tables():
    with torch.device("meta"):
        released = VQVAE(VARSRConfig.preset("d24"))
        c2i = VQVAE(VARSRConfig.preset("c2i-d24"))
    assert [released.phi_index(si) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [c2i.phi_index(si) for si in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # the hard-coded tables agree with the float64 argmin rule they were taken from
    assert [computed_phi_index(si, 10, 4) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [computed_phi_index(si, 12, 4) for si in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # other geometries: computed; every scale gets a valid conv, monotone in si
    other = VARSRConfig.preset("tiny", patch_nums=[1, 2, 3, 4, 5, 6, 8])
    with torch.device("meta"):
        vq = VQVAE(other)
    tab = [vq.phi_index(si) for si in range(7)]
    assert tab == sorted(tab) and tab[0] == 0 and tab[-1] == 3


def test_phi_is_residual_mix(tiny):
    cfg, vq, x = tiny
    h = torch.randn(2, cfg.vqvae.z_channels, 4, 4)
    conv = vq.quantize.quant_resi.qresi_ls[vq.phi_index(1)]
    r = cfg.vqvae.quant_resi
    expect = (1 - r) * h + r * F.conv2d(h, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(vq.phi(1, h), expect)


def test_released_vqvae_keys_shapes_and_count():
    with torch.device("meta"):
        vq = VQVAE(VARSRConfig.preset("d24"))
    sd = vq.state_dict()
    assert len(sd) == 324
    n = sum(p.numel() for p in vq.parameters())
    assert abs(n / 1e6 - 108.9) <= 0.05, n
    spot = {
        "encoder.conv_in.weight": (160, 3, 3, 3),
        "encoder.down.0.block.1.conv2.weight": (160, 160, 3, 3),
        "encoder.down.1.downsample.conv.weight": (160, 160, 3, 3),
        "encoder.down.2.block.0.conv1.weight": (320, 160, 3, 3),
        "encoder.down.2.block.0.nin_shortcut.weight": (320, 160, 1, 1),
        "encoder.down.3.downsample.conv.weight": (320, 320, 3, 3),
        "encoder.down.4.block.0.nin_shortcut.weight": (640, 320, 1, 1),
        "encoder.down.4.attn.1.qkv.weight": (1920, 640, 1, 1),
        "encoder.down.4.attn.1.proj_out.weight": (640, 640, 1, 1),
        "encoder.mid.attn_1.norm.weight": (640,),
        "encoder.mid.block_2.conv1.weight": (640, 640, 3, 3),
        "encoder.norm_out.bias": (640,),
        "encoder.conv_out.weight": (32, 640, 3, 3),
        "decoder.conv_in.weight": (640, 32, 3, 3),
        "decoder.up.4.attn.2.qkv.weight": (1920, 640, 1, 1),
        "decoder.up.4.upsample.conv.weight": (640, 640, 3, 3),
        "decoder.up.3.block.0.nin_shortcut.weight": (320, 640, 1, 1),
        "decoder.up.2.block.2.conv2.weight": (320, 320, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (160, 320, 1, 1),
        "decoder.up.1.upsample.conv.weight": (160, 160, 3, 3),
        "decoder.up.0.block.2.norm2.weight": (160,),
        "decoder.norm_out.weight": (160,),
        "decoder.conv_out.weight": (3, 160, 3, 3),
        "quantize.ema_vocab_hit_SV": (10, 4096),
        "quantize.quant_resi.qresi_ls.3.weight": (32, 32, 3, 3),
        "quantize.embedding.weight": (4096, 32),
        "quant_conv.weight": (32, 32, 3, 3),
        "post_quant_conv.bias": (32,),
    }
    for k, shape in spot.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith("decoder.up.0.upsample") for k in sd)
    assert not any(k.startswith("encoder.down.4.downsample") for k in sd)
    assert sum(k.startswith("decoder.up.4.attn.") and k.endswith("qkv.weight") for k in sd) == 3
    assert sum(".attn." in k and k.startswith("encoder.down.") and k.endswith("qkv.weight") for k in sd) == 2


def test_state_dict_roundtrip_and_foreign_usage_buffer(tiny):
    cfg, vq, x = tiny
    sd = {k: v.clone() for k, v in vq.state_dict().items()}
    other = VQVAE(cfg)
    own_buf = other.quantize.ema_vocab_hit_SV.clone().fill_(7.0)
    other.quantize.ema_vocab_hit_SV.copy_(own_buf)
    sd["quantize.ema_vocab_hit_SV"] = torch.ones(cfg.num_scales + 5, cfg.vqvae.vocab_size)  # other scale count
    other.load_state_dict(sd, strict=True)
    assert torch.equal(other.quantize.ema_vocab_hit_SV, own_buf)
    assert torch.equal(other.quantize.embedding.weight, vq.quantize.embedding.weight)
    sd["quantize.ema_vocab_hit_SV"] = torch.full((cfg.num_scales, cfg.vqvae.vocab_size), 3.0)  # same scale count
    other.load_state_dict(sd, strict=True)
    assert float(other.quantize.ema_vocab_hit_SV.mean()) == 3.0
    bad = dict(sd)
    bad["quant_conv.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="quant_conv.weight"):
        other.load_state_dict(bad)


def test_attention_matches_explicit_softmax():
    torch.manual_seed(3)
    blk = AttnBlock(64)
    x = torch.randn(2, 64, 5, 6)
    C = 64
    qkv = blk.qkv(blk.norm(x))
    q, k, v = qkv.reshape(2, 3, C, 30).unbind(1)
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / C**0.5, dim=-1)  # (B, query, key)
    h = torch.einsum("bij,bcj->bci", w, v).reshape(2, C, 5, 6)
    torch.testing.assert_close(blk(x), x + blk.proj_out(h), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(blk(x.contiguous(memory_format=torch.channels_last)), blk(x), atol=1e-5, rtol=1e-5)


def test_resample_primitives_are_pytorch_semantics():
    f = torch.randn(1, 2, 8, 8)
    torch.testing.assert_close(area_down(f, 3), F.adaptive_avg_pool2d(f, 3))
    h = torch.randn(1, 2, 3, 3)
    up = bicubic_up(h, 8)
    assert up.shape == (1, 2, 8, 8)
    assert area_down(f, 8) is not f  # never aliases the accumulator it reads


def test_decode_shape_clamp_and_bf16(tiny):
    cfg, vq, x = tiny
    _, _, f_hat = vq.tokenize(x)
    img = vq.fhat_to_img(f_hat * 50)
    assert img.shape == x.shape and float(img.abs().max()) <= 1.0
    ref = vq.fhat_to_img(f_hat)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = vq.fhat_to_img(f_hat)
    assert low.shape == ref.shape and torch.isfinite(low).all()
    assert float((low.float() - ref).abs().mean()) < 0.05 * float(ref.abs().mean()) + 1e-3


def test_bad_image_size_is_a_clear_error(tiny):
    cfg, vq, _ = tiny
    with pytest.raises(ValueError, match=r"expected images \(B, 3, 64, 64\)"):
        vq.img_to_idxBl(torch.zeros(1, 3, 32, 32))


def test_training_forward_straight_through_and_usage():
    torch.manual_seed(0)
    cfg = VARSRConfig.preset("tiny")
    vq = VQVAE(cfg).train()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    rec, vq_loss, usage = vq(x)
    assert rec.shape == x.shape and vq_loss.ndim == 0 and len(usage) == cfg.num_scales
    assert all(0.0 <= u <= 100.0 for u in usage)
    assert float(vq.quantize.ema_vocab_hit_SV[0].sum()) == 2.0  # first record copies the batch's hits (B·1²)
    (F.mse_loss(rec, x) + vq_loss).backward()
    for name in (
        "encoder.conv_in.weight",
        "quantize.embedding.weight",
        "quantize.quant_resi.qresi_ls.0.weight",
        "decoder.conv_out.weight",
        "quant_conv.weight",
    ):
        g = dict(vq.named_parameters())[name].grad
        assert g is not None and float(g.abs().sum()) > 0, name


def test_norm_groups_reach_every_groupnorm_and_old_configs_load_as_32():
    """docs/EXPERIMENTS.md: vqvae.norm_groups sets every encoder/decoder GroupNorm; a config written before the field
    (no norm_groups key) is the released 32; channels not divisible by the groups are refused."""
    import json

    from model.config import VARSRConfig
    from model.vqvae import VQVAE

    cfg = VARSRConfig.preset("small")
    for groups in (32, 8):
        c = cfg.replace(vqvae={**cfg.to_dict()["vqvae"], "norm_groups": groups})
        norms = [m for m in VQVAE(c).modules() if isinstance(m, torch.nn.GroupNorm)]
        assert norms and {m.num_groups for m in norms} == {groups}
    old = cfg.to_dict()
    del old["vqvae"]["norm_groups"]
    assert VARSRConfig.from_dict(json.loads(json.dumps(old))).vqvae.norm_groups == 32
    with pytest.raises(ValueError, match="norm_groups"):
        cfg.replace(vqvae={**cfg.to_dict()["vqvae"], "norm_groups": 5})


def test_fan_in_init_keeps_the_trunks_variance_where_the_default_init_shrinks_it():
    """docs/EXPERIMENTS.md, cause 1: ``vqvae.init: fan_in`` draws every encoder/decoder conv from N(0, 1/fan_in) with
    zero biases, so each conv passes its input's variance on; PyTorch's default passes about a third. Checked on the
    weights and on what a stack of the decoder's convs does to a random signal; old configs load as ``upstream``."""
    import json

    small = VARSRConfig.preset("small")
    assert small.vqvae.init == "fan_in" and small.vqvae.norm_groups == 1  # the preset that keeps colour
    cfg = small.replace(vqvae={**small.to_dict()["vqvae"], "init": "upstream"})
    fan = cfg.replace(vqvae={**cfg.to_dict()["vqvae"], "init": "fan_in"})
    torch.manual_seed(0)
    vq_fan, vq_up = VQVAE(fan), VQVAE(cfg)
    convs = [m for m in (*vq_fan.encoder.modules(), *vq_fan.decoder.modules()) if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) > 20
    for m in convs:
        fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        assert abs(float(m.weight.detach().std()) * fan_in**0.5 - 1) < 0.15, m
        assert float(m.bias.detach().abs().max()) == 0.0
    # the quantizer's phi convs and quant convs keep their own init
    assert vq_fan.quant_conv.bias.abs().max() > 0

    def trunk_gain(vq):  # variance gain of the decoder's 3x3 same-width convs applied in sequence
        x = torch.randn(1, cfg.vqvae.ch * 4, 16, 16)
        h = x
        with torch.no_grad():
            for m in vq.decoder.modules():
                if (
                    isinstance(m, torch.nn.Conv2d)
                    and m.in_channels == m.out_channels == x.shape[1]
                    and m.kernel_size == (3, 3)
                ):
                    h = m(h)
        return float(h.var() / x.var())

    g_fan, g_up = trunk_gain(vq_fan), trunk_gain(vq_up)
    assert 0.3 < g_fan < 3.0, g_fan
    assert g_up < 0.05, g_up
    old = cfg.to_dict()
    del old["vqvae"]["init"]
    assert VARSRConfig.from_dict(json.loads(json.dumps(old))).vqvae.init == "upstream"
