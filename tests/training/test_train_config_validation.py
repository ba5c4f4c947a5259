"""Optimiser numbers that make no sense (issue 28, finding 11): NaN, inf or negative learning rates and friends are
refused by the config's validation, with one line naming the key, before any model is built or any folder written
(they used to end in a torch traceback mid-run, or train on NaN)."""

from __future__ import annotations

import pytest

from infra.core.config import ConfigError
from training.config import load_train_config


@pytest.mark.parametrize(
    "item, key",
    [
        ("optim.lr=.nan", "optim.lr"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=.inf", "optim.lr"),
        ("optim.eps=-1e-8", "optim.eps"),
        ("optim.weight_decay=.nan", "optim.weight_decay"),
        ("optim.weight_decay=-0.1", "optim.weight_decay"),
        ("optim.betas=[0.9, 1.5]", "optim.betas"),
        ("optim.betas=[.nan, 0.95]", "optim.betas"),
        ("optim.grad_clip=-2", "optim.grad_clip"),
        ("optim.grad_clip=.nan", "optim.grad_clip"),
        ("optim.warmup_epochs=-1", "optim.warmup_epochs"),
        ("optim.warmup_start=.nan", "optim.warmup_start"),
        ("optim.end_factor=-0.5", "optim.end_factor"),
        ("optim.plateau=.nan", "optim.plateau"),
        ("epochs=.nan", "epochs"),
        ("epochs=-3", "epochs"),
        ("validation.cfg=.nan", "validation.cfg"),
        ("validation.top_p=2", "validation.top_p"),
        ("register.sampling.cfg=.nan", "cfg"),
        ("register.sampling.color_fix=sepia", "color_fix"),
    ],
)
def test_bad_optimiser_numbers_are_refused_naming_the_key(item, key):
    with pytest.raises(ConfigError) as e:
        load_train_config(None, [item])
    msg = str(e.value)
    assert key in msg and "\n" not in msg, msg


def test_sensible_values_still_load():
    cfg = load_train_config(
        None,
        [
            "optim.lr=1e-4",
            "optim.grad_clip=0",
            "optim.warmup_epochs=0",
            "optim.weight_decay=0",
            "register.sampling.cfg=0.75",
            "register.sampling.color_fix=wavelet",
        ],
    )
    assert cfg.optim.lr == 1e-4 and cfg.register.sampling.values() == {"cfg": 0.75, "color_fix": "wavelet"}
    assert load_train_config(None, []).register.sampling.values() == {}


def test_the_cli_prints_one_line_and_starts_nothing(tmp_path, capsys, monkeypatch):
    from infra.cli import main

    monkeypatch.chdir(tmp_path)
    for item in ("optim.lr=.nan", "optim.lr=-1"):
        rc = main(["train", "isr", "--set", f"output_dir={tmp_path / 'run'}", "--set", item])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "optim.lr" in err and len(err.splitlines()) == 1, err
        assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "item, key",
    [
        ("lr=.nan", "lr"),
        ("lr=-1", "lr"),
        ("weight_decay=-1", "weight_decay"),
        ("grad_clip=.nan", "grad_clip"),
        ("disc_lr=-1e-4", "disc_lr"),
    ],
)
def test_the_tokenizer_trainer_refuses_them_too(item, key, tmp_path):
    from infra.core.errors import UserError
    from training.stage0_vqvae import load_vqvae_config, train_vqvae

    cfg = load_vqvae_config(None, [item, f"output_dir={tmp_path / 'vq'}"])
    with pytest.raises(UserError, match=rf"\b{key} must be a finite number"):
        train_vqvae(cfg)
    assert not (tmp_path / "vq").exists()
