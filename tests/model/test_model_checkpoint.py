"""Checkpoints: native round trip, official-format import (trainer-nested and plain), strict key errors, safe
unpickling."""

from __future__ import annotations

import json

import pytest
import torch

from infra.core.errors import UserError
from model import VARSRConfig, build, from_pretrained, import_official, load_stage_weights, save_pretrained
from model.official import infer_config


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build(VARSRConfig.preset("tiny"))


def _official_var_sd(varsr) -> dict:
    """The transformer's state dict in the official layout, with the upstream buffers regenerated as upstream
    stores them."""
    sd = {k: v.clone() for k, v in varsr.state_dict().items()}
    lvl = varsr.level_ids("cpu")
    S = lvl.numel()
    sd["lvl_1L"] = lvl.view(1, S).clone()
    bias = torch.where(lvl[None, :] <= lvl[:, None], 0.0, float("-inf"))
    sd["attn_bias_for_masking"] = bias.view(1, 1, S, S)
    for i in range(len(varsr.blocks)):
        sd[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(varsr.C)
    return sd


def _write_trainer(path, var_sd=None, vae_sd=None):
    trainer = {"config": {"patch_nums": [1, 2, 4], "label_smooth": 0.0}}
    if var_sd is not None:
        trainer["var_wo_ddp"] = var_sd
    if vae_sd is not None:
        trainer["vae_local"] = vae_sd
    torch.save({"epoch": 3, "iter": 120, "args": {"depth": 2, "tblr": 5e-5, "exp_name": "x"}, "trainer": trainer}, path)


def _assert_equal_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_native_round_trip(tiny, tmp_path):
    vqvae, varsr = tiny
    d = save_pretrained(tmp_path / "ckpt", vqvae, varsr, extra={"note": "hi"})
    meta = json.loads((d / "config.json").read_text())
    assert meta["format"] == "varsr-native" and meta["version"] == 1 and meta["note"] == "hi"
    assert meta["config"]["name"] == "tiny"
    vq2, var2 = from_pretrained(d)
    _assert_equal_state(vqvae, vq2)
    _assert_equal_state(varsr, var2)
    assert var2.vqvae is vq2 and not any(p.requires_grad for p in vq2.parameters())
    varsr.eval(), var2.eval()
    lr = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a = varsr.generate(lr, generator=torch.Generator().manual_seed(5))
    b = var2.generate(lr, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_native_checkpoint_of_another_config_fails_clearly(tiny, tmp_path):
    vqvae, varsr = tiny
    d = save_pretrained(tmp_path / "ckpt", vqvae, varsr)
    meta = json.loads((d / "config.json").read_text())
    meta["config"] = VARSRConfig.preset("tiny", embed_dim=64).to_dict()
    (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"does not match its config.*mis-shaped keys.*word_embed\.weight"):
        from_pretrained(d)
    with pytest.raises(UserError, match="config.json is missing"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("layout", ["trainer", "plain"])
def test_import_official_layouts(tiny, tmp_path, layout):
    vqvae, varsr = tiny
    var_sd, vae_sd = _official_var_sd(varsr), vqvae.state_dict()
    if layout == "trainer":
        _write_trainer(tmp_path / "VARSR.pth", var_sd=var_sd)
        _write_trainer(tmp_path / "VQVAE.pth", vae_sd=vae_sd)
    else:
        torch.save(var_sd, tmp_path / "VARSR.pth")
        torch.save(vae_sd, tmp_path / "VQVAE.pth")
    vq2, var2 = import_official(
        tmp_path / "VARSR.pth", tmp_path / "VQVAE.pth", config=varsr.cfg, out_dir=tmp_path / "n"
    )
    _assert_equal_state(vqvae, vq2)
    _assert_equal_state(varsr, var2)
    vq3, var3 = from_pretrained(tmp_path / "n")
    _assert_equal_state(varsr, var3)


def test_import_renamed_and_misshaped_keys_are_named(tiny, tmp_path):
    vqvae, varsr = tiny
    torch.save(vqvae.state_dict(), tmp_path / "vae.pth")
    sd = _official_var_sd(varsr)
    sd["blocks.1.attn.proj_renamed.weight"] = sd.pop("blocks.1.attn.proj.weight")
    _write_trainer(tmp_path / "renamed.pth", var_sd=sd)
    with pytest.raises(UserError) as e:
        import_official(tmp_path / "renamed.pth", tmp_path / "vae.pth", config=varsr.cfg)
    assert "missing keys (1): blocks.1.attn.proj.weight" in str(e.value)
    assert "unexpected keys (1): blocks.1.attn.proj_renamed.weight" in str(e.value)
    sd = _official_var_sd(varsr)
    sd["head.bias"] = torch.zeros(7)
    _write_trainer(tmp_path / "shape.pth", var_sd=sd)
    with pytest.raises(UserError, match=r"mis-shaped keys \(1\): head\.bias: got \(7,\), expected \(64,\)"):
        import_official(tmp_path / "shape.pth", tmp_path / "vae.pth", config=varsr.cfg)
    vsd = dict(vqvae.state_dict())
    vsd.pop("decoder.conv_out.bias")
    torch.save(vsd, tmp_path / "vae_bad.pth")
    torch.save(_official_var_sd(varsr), tmp_path / "ok.pth")
    with pytest.raises(UserError, match=r"missing keys \(1\): decoder\.conv_out\.bias"):
        import_official(tmp_path / "ok.pth", tmp_path / "vae_bad.pth", config=varsr.cfg)


class _Evil:
    """A pickle that, when loaded unsafely, creates a file (i.e. runs code)."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_code_running_pickle_is_refused(tiny, tmp_path):
    vqvae, varsr = tiny
    marker = tmp_path / "pwned.txt"
    torch.save({"trainer": {"var_wo_ddp": _official_var_sd(varsr), "evil": _Evil(marker)}}, tmp_path / "evil.pth")
    torch.save(vqvae.state_dict(), tmp_path / "vae.pth")
    with pytest.raises(UserError, match="refusing to load .*evil.pth"):
        import_official(tmp_path / "evil.pth", tmp_path / "vae.pth", config=varsr.cfg)
    assert not marker.exists()


def test_infer_config_from_released_shapes():
    # a narrow model with the released 10-scale, 512-px geometry: shapes only, so build on the meta device
    cfg = VARSRConfig.from_dict(
        dict(
            name="narrow",
            depth=2,
            embed_dim=64,
            num_heads=1,
            refiner_width=64,
            refiner_depth=3,
            lr_encoder_channels=[8, 16, 16, 32],
            vqvae=dict(vocab_size=128, z_channels=8, ch=32, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=1),
        )
    )
    vqvae, varsr = build(cfg, device="meta")
    got = infer_config(varsr.state_dict(), vqvae.state_dict())
    for f in ["variant", "patch_nums", "depth", "C", "heads", "num_classes", "refiner_width", "refiner_depth"]:
        assert getattr(got, f) == getattr(cfg, f), f
    assert tuple(got.lr_encoder_channels) == (8, 16, 16, 32)
    assert got.vqvae == cfg.vqvae


@pytest.mark.parametrize("preset", ["tiny", "small4", "c2i-tiny"])
def test_a_schedule_outside_the_release_is_read_from_lvl_1L_and_named_by_its_preset(preset):
    """Official-layout files carry lvl_1L: the importer reads the scale schedule from it (the ISR variant's LR prefix
    counted out of level 0) and names the platform preset whose every shape-fixed setting agrees, so that settings
    shapes cannot show (the VQVAE's GroupNorm groups) come from it. Without lvl_1L only the released schedules are
    known, and the error says so."""
    from infra.core.errors import UserError

    vqvae, varsr = build(VARSRConfig.preset(preset), device="meta")
    sd = dict(varsr.state_dict())
    sd["lvl_1L"] = varsr.level_ids("cpu").view(1, -1)
    got = infer_config(sd, vqvae.state_dict())
    assert got.name == preset and got == VARSRConfig.preset(preset)
    del sd["lvl_1L"]
    with pytest.raises(UserError, match="no lvl_1L buffer"):
        infer_config(sd, vqvae.state_dict())


def test_load_stage_weights_truncates_classes_and_drops_mismatches(tmp_path):
    torch.manual_seed(0)
    _, stage1 = build(VARSRConfig.preset("c2i-tiny"))
    _, isr = build(VARSRConfig.preset("tiny"))
    src = dict(stage1.state_dict())
    src["pos_1LC"] = torch.zeros(1, 21, 128)  # a VAR-only key
    rep = load_stage_weights(isr, src)
    assert rep["resized"] == ["class_emb.weight"]
    assert torch.equal(isr.class_emb.weight, stage1.class_emb.weight[:2])
    assert "pos_start" in rep["dropped"] and "pos_1LC" in rep["dropped"]
    assert torch.equal(isr.blocks[1].ffn.fc1.weight, stage1.blocks[1].ffn.fc1.weight)
    assert torch.equal(isr.diffloss.net.input_proj.weight, stage1.diffloss.net.input_proj.weight)
    assert any(k.startswith("con_embedding.") for k in rep["new"]) and "pos_start" in rep["new"]
    assert "blocks.0.attn.mat_qkv.weight" in rep["loaded"]


def test_cli_info_and_import(tiny, tmp_path, capsys):
    from infra.cli import main

    assert main(["model", "info", "--preset", "tiny"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["geometry"]["seq_len"] == 16 + 21 and out["parameters"]["varsr_total"] > 0
    vqvae, varsr = tiny
    torch.save(_official_var_sd(varsr), tmp_path / "VARSR.pth")
    _write_trainer(tmp_path / "VQVAE.pth", vae_sd=vqvae.state_dict())
    assert (
        main(
            [
                "import-checkpoint",
                "--var",
                str(tmp_path / "VARSR.pth"),
                "--vae",
                str(tmp_path / "VQVAE.pth"),
                "-o",
                str(tmp_path / "out"),
                "--preset",
                "tiny",
            ]
        )
        == 0
    )
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert main(["model", "info", "--checkpoint", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "import-checkpoint",
                "--var",
                str(tmp_path / "nope.pth"),
                "--vae",
                str(tmp_path / "VQVAE.pth"),
                "-o",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_import_var_transformer_file_as_stage2_init(tiny, tmp_path):
    vqvae, varsr = tiny
    sd = {
        k: v
        for k, v in _official_var_sd(varsr).items()
        if not k.startswith(("diffloss.", "decoder_norm.", "con_embedding."))
    }
    sd["pos_1LC"] = torch.zeros(1, 21, varsr.C)  # VAR's absolute position table
    sd["pos_start"] = torch.zeros(1, 1, varsr.C)
    sd["class_emb.weight"] = torch.randn(5, varsr.C)  # VAR: classes + null row
    torch.save(sd, tmp_path / "var_d2.pth")
    torch.save(vqvae.state_dict(), tmp_path / "vae.pth")
    with pytest.raises(UserError, match="VAR .*pass a config"):
        import_official(tmp_path / "var_d2.pth", tmp_path / "vae.pth")
    _, var2 = import_official(tmp_path / "var_d2.pth", tmp_path / "vae.pth", config=varsr.cfg, out_dir=tmp_path / "o")
    assert torch.equal(var2.class_emb.weight, sd["class_emb.weight"][:2])
    assert torch.equal(var2.blocks[0].attn.mat_qkv.weight, sd["blocks.0.attn.mat_qkv.weight"])
    rep = json.loads((tmp_path / "o" / "config.json").read_text())["stage_init_report"]
    assert "pos_1LC" in rep["dropped"] and "pos_start" in rep["new"] and rep["resized"] == ["class_emb.weight"]


def test_import_research_checkpoint_whose_lr_encoder_is_wider_than_the_model(tmp_path):
    """Research checkpoints keep the released 1536-wide last LR-encoder stage at every width C: the importer reads
    that width from the file (here 96 at C = 64), builds it, and the weights load strictly and round-trip."""
    cfg = VARSRConfig.from_dict(
        dict(
            name="research-narrow",
            depth=2,
            embed_dim=64,
            num_heads=1,
            refiner_width=64,
            refiner_depth=2,
            lr_encoder_channels=[8, 16, 16, 32],
            lr_encoder_hidden=96,
            patch_nums=[1, 2, 3, 4, 6, 9, 13, 18, 24, 32],
            vqvae=dict(vocab_size=128, z_channels=8, ch=32, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=1),
        )
    )
    torch.manual_seed(0)
    vqvae, varsr = build(cfg)
    sd = _official_var_sd(varsr)
    assert sd["con_embedding.blocks.7.weight"].shape == (96, 32, 3, 3)
    assert sd["con_embedding.conv_out.weight"].shape == (64, 96, 3, 3)
    _write_trainer(tmp_path / "VARSR.pth", var_sd=sd)
    _write_trainer(tmp_path / "VQVAE.pth", vae_sd=vqvae.state_dict())
    vq2, var2 = import_official(tmp_path / "VARSR.pth", tmp_path / "VQVAE.pth", out_dir=tmp_path / "native")
    assert var2.cfg.lr_encoder_hidden == 96 and var2.cfg.C == 64
    _assert_equal_state(varsr, var2)
    _, var3 = from_pretrained(tmp_path / "native")
    assert var3.cfg.lr_encoder_hidden == 96
    _assert_equal_state(varsr, var3)


def test_lr_encoder_hidden_defaults_to_the_released_width_and_legacy_configs_keep_width_c():
    assert VARSRConfig().lr_encoder_hidden == 1536
    assert VARSRConfig.preset("d16").lr_encoder_hidden == 1536  # released code: 1536 whatever the width
    _, d16 = build(VARSRConfig.preset("d16"), device="meta")
    assert tuple(d16.con_embedding.conv_out.weight.shape) == (1024, 1536, 3, 3)
    # a complete config.json written before the field existed described an encoder ending at C
    legacy = VARSRConfig.preset("d16").to_dict()
    del legacy["lr_encoder_hidden"]
    assert VARSRConfig.from_dict(legacy).lr_encoder_hidden == 1024
