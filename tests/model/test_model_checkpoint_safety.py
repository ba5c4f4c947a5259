"""Checkpoint inputs a careless or hostile user may give (issue 28, findings 5, 10, 11): weights that are NaN or not
floating point, files that are not PyTorch checkpoints at all, and the model's own sampling defaults
(``sampling.json``) kept beside its weights. Each bad input ends in one line that names what is wrong."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from infra.core.errors import UserError
from model import VARSRConfig, build, from_pretrained, import_official, save_pretrained
from model.checkpoint import (
    SAMPLING,
    read_parts,
    read_sampling_defaults,
    validate_sampling_defaults,
    write_sampling_defaults,
)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build(VARSRConfig.preset("tiny"))


@pytest.fixture
def ckpt(tiny, tmp_path):
    vqvae, varsr = tiny
    return save_pretrained(tmp_path / "ckpt", vqvae, varsr)


def _rewrite(d, key, fn):
    t = load_file(str(d / "model.safetensors"))
    t[key] = fn(t[key])
    save_file(t, str(d / "model.safetensors"), metadata={"format": "varsr-native"})


# ---- finding 10: NaN / integer weights ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, words",
    [
        (lambda t: t.clone().fill_(float("nan")), "not finite"),
        (lambda t: torch.where(torch.arange(t.numel()).view(t.shape) == 0, float("inf"), t), "not finite"),
        (lambda t: t.to(torch.int32), "int32"),
    ],
)
def test_nan_inf_and_integer_weights_are_refused_naming_the_tensor(ckpt, bad, words):
    key = "varsr.blocks.0.ffn.fc1.weight"
    _rewrite(ckpt, key, bad)
    for load in (from_pretrained, read_parts):
        with pytest.raises(UserError) as e:
            load(ckpt)
        msg = str(e.value)
        assert key in msg and words in msg and "\n" not in msg, msg


def test_a_nan_tokenizer_weight_is_refused_too(ckpt):
    key = "vqvae.decoder.conv_out.weight"
    _rewrite(ckpt, key, lambda t: t.clone().fill_(float("nan")))
    with pytest.raises(UserError, match=r"vqvae\.decoder\.conv_out\.weight.*not finite"):
        from_pretrained(ckpt)


def test_clean_weights_still_load(ckpt, tiny):
    _, var2 = from_pretrained(ckpt)
    assert torch.equal(var2.blocks[0].ffn.fc1.weight, tiny[1].blocks[0].ffn.fc1.weight)


def test_import_refuses_an_official_file_with_nan_weights(tiny, tmp_path):
    vqvae, varsr = tiny
    sd = {k: v.clone() for k, v in varsr.state_dict().items()}
    sd["blocks.1.attn.proj.weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "VARSR.pth")
    torch.save(vqvae.state_dict(), tmp_path / "VQVAE.pth")
    with pytest.raises(UserError, match=r"blocks\.1\.attn\.proj\.weight.*not finite"):
        import_official(tmp_path / "VARSR.pth", tmp_path / "VQVAE.pth", config=varsr.cfg, out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ---- finding 11: files that are not checkpoints ---------------------------------------------------------------------
def _import_cli(tmp_path, capsys, var, vae):
    from infra.cli import main

    rc = main(["import-checkpoint", "--var", str(var), "--vae", str(vae), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    return rc, err


def test_import_checkpoint_says_what_each_bad_file_is(tiny, tmp_path, capsys):
    vqvae, varsr = tiny
    good = tmp_path / "VQVAE.pth"
    torch.save(vqvae.state_dict(), good)
    (tmp_path / "notes.txt").write_text("hello, this is a text file and not a checkpoint\n")
    (tmp_path / "garbage.bin").write_bytes(bytes((i * 7919 + 13) % 251 for i in range(4096)))
    (tmp_path / "empty.pth").write_bytes(b"")
    whole = tmp_path / "whole.pth"
    torch.save(varsr.state_dict(), whole)
    (tmp_path / "truncated.pth").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"w": torch.zeros(1), "x": Evil()}, tmp_path / "evil.pth")
    cases = {
        "notes.txt": "not a PyTorch checkpoint",
        "garbage.bin": "not a PyTorch checkpoint",
        "empty.pth": "is empty",
        "truncated.pth": "corrupt",
        "evil.pth": "could run arbitrary code",
    }
    for name, words in cases.items():
        rc, err = _import_cli(tmp_path, capsys, tmp_path / name, good)
        assert rc == 2 and words in err and len(err.splitlines()) == 1, (name, err)
        assert "Traceback" not in err and "KeyError" not in err, (name, err)
        if name != "evil.pth":
            assert "run arbitrary code" not in err and "pickled objects" not in err, (name, err)
    assert not (tmp_path / "out").exists()


# ---- finding 5: the model's own sampling defaults -------------------------------------------------------------------
def test_sampling_defaults_round_trip_and_absence(ckpt):
    assert read_sampling_defaults(ckpt) == {}
    write_sampling_defaults(ckpt, {"cfg": 0.75, "color_fix": "wavelet"})
    assert json.loads((ckpt / SAMPLING).read_text()) == {"cfg": 0.75, "color_fix": "wavelet"}
    assert read_sampling_defaults(ckpt) == {"cfg": 0.75, "color_fix": "wavelet"}
    write_sampling_defaults(ckpt, {"top_k": 2})  # replaces, does not merge: the file is the whole set
    assert read_sampling_defaults(ckpt) == {"top_k": 2}


@pytest.mark.parametrize(
    "values, words",
    [
        ({"cfg": float("nan")}, "cfg"),
        ({"cfg": -1}, "cfg"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"temperature": 1.0}, "temperature"),
        ({"color_fix": "sepia"}, "color_fix"),
        ({"scale": 0}, "scale"),
        ({"cfg": "high"}, "cfg"),
    ],
)
def test_bad_sampling_defaults_are_refused_by_name(ckpt, values, words):
    with pytest.raises(UserError, match=words):
        validate_sampling_defaults(values, "test")
    with pytest.raises(UserError, match=words):
        write_sampling_defaults(ckpt, values)
    assert not (ckpt / SAMPLING).exists()
    (ckpt / SAMPLING).write_text(json.dumps(values))
    with pytest.raises(UserError, match=rf"{SAMPLING}.*{words}"):
        read_sampling_defaults(ckpt)


def test_a_sampling_file_that_is_not_json_is_one_clear_line(ckpt):
    (ckpt / SAMPLING).write_text("cfg: 0.75\n")
    with pytest.raises(UserError, match="not valid JSON"):
        read_sampling_defaults(ckpt)
    (ckpt / SAMPLING).write_text("[0.75]")
    with pytest.raises(UserError, match="JSON object"):
        read_sampling_defaults(ckpt)


def test_the_shipped_base_carries_its_tuned_sampling_defaults():
    from infra.demo.recipe import ROOT, PretrainConfig

    shipped = read_sampling_defaults(ROOT / "model" / "pretrained" / "small4-base")
    recipe = PretrainConfig().sampling
    assert shipped == {"cfg": recipe.cfg, "color_fix": recipe.color_fix} == {"cfg": 0.75, "color_fix": "wavelet"}
