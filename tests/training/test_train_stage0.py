"""Stage 0 (tokenizer) helpers: dead-code re-seeding keeps a small VQVAE from collapsing onto a few codes, and the
tokenizer-only export loads into a stage-1/2 model through ``model.vqvae_checkpoint``."""

from __future__ import annotations

import json

import torch

from model import VQVAE, VARSRConfig, build
from model.checkpoint import load_tokenizer, save_tokenizer
from training.stage0_vqvae import restart_dead_codes


def test_restart_reseeds_only_dead_codes_from_encoder_outputs():
    torch.manual_seed(0)
    cfg = VARSRConfig.preset("tiny")
    vq = VQVAE(cfg).train()
    q = vq.quantize
    q.ema_vocab_hit_SV.zero_()
    q.ema_vocab_hit_SV[:, :3] = 10.0  # codes 0..2 alive, the rest dead
    before = q.embedding.weight.detach().clone()
    x = torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1
    n = restart_dead_codes(vq, x)
    V = cfg.vqvae.vocab_size
    assert n == V - 3
    after = q.embedding.weight.detach()
    assert torch.equal(after[:3], before[:3])
    assert not torch.equal(after[3:], before[3:])
    # re-seeded codes lie next to real encoder outputs (nearest-neighbour distance small vs the data spread)
    with torch.no_grad():
        f = vq.encode(x).permute(0, 2, 3, 1).reshape(-1, after.shape[1])
    d = torch.cdist(after[3:], f).min(dim=1).values
    assert float(d.max()) < 0.1 * float(f.std() * f.shape[1] ** 0.5)
    assert restart_dead_codes(vq, x) == 0  # the grace period: nothing is dead right after a restart


def test_tokenizer_export_loads_into_a_model(tmp_path):
    torch.manual_seed(1)
    cfg = VARSRConfig.preset("tiny")
    trained = VQVAE(cfg)
    d = save_tokenizer(tmp_path / "tok", trained, cfg)
    vq, _ = build(cfg)
    load_tokenizer(vq, str(d))
    for (k, a), (_, b) in zip(trained.state_dict().items(), vq.state_dict().items()):
        assert torch.equal(a, b), k
    assert not any(p.requires_grad for p in vq.parameters())


def test_a_tokenizer_with_other_groupnorm_groups_is_refused_not_loaded(tmp_path):
    """GroupNorm's groups and phi's mix ratio do not show in the tensors' shapes: a tokenizer trained with 32 groups
    (the first small base) would load into today's 1-group `small` model and then decode something else. The load
    names the setting instead; the same config loads, and so does one differing only in its init."""
    import pytest

    from infra.core.errors import UserError

    cfg = VARSRConfig.preset("tiny")
    d = save_tokenizer(tmp_path / "tok", VQVAE(cfg), cfg)
    one_group = cfg.replace(vqvae={**cfg.to_dict()["vqvae"], "norm_groups": 1})
    with pytest.raises(UserError, match=r"norm_groups 32 \(model: 1\)"):
        load_tokenizer(VQVAE(one_group), str(d))
    other_resi = cfg.replace(vqvae={**cfg.to_dict()["vqvae"], "quant_resi": 0.25})
    with pytest.raises(UserError, match="quant_resi"):
        load_tokenizer(VQVAE(other_resi), str(d))
    load_tokenizer(VQVAE(cfg.replace(vqvae={**cfg.to_dict()["vqvae"], "init": "fan_in"})), str(d))


def test_an_interrupted_tokenizer_run_resumes_exactly(shards, tmp_path):
    """Stage 0 stopped after 3 steps and resumed (``--resume auto``) gives the uninterrupted losses and weights; a
    checkpoint of another configuration is refused."""
    import pytest
    from safetensors.torch import load_file

    from infra.core.errors import UserError
    from training.stage0_vqvae import load_vqvae_config, train_vqvae

    def cfg(name, steps, *extra):
        return load_vqvae_config(
            None,
            [
                f"output_dir={tmp_path / name}",
                f"data.shards={shards}",
                "model.preset=tiny",
                f"max_steps={steps}",
                "data.batch_size=4",
                "data.workers=0",
                "checkpoint_every=2",
                "restart_dead_codes_every=2",
                "tracking.enabled=false",
                "grid_images=2",
                *extra,
            ],
        )

    full = train_vqvae(cfg("full", 6))
    first = train_vqvae(cfg("split", 3))
    assert first["losses"] == full["losses"][:3]
    assert sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir()) == ["step_00000003"]  # keep 1
    rest = train_vqvae(cfg("split", 6), resume="auto")
    assert rest["resumed_from"].endswith("step_00000003")
    assert rest["losses"] == full["losses"]  # the restored history plus 3 new steps, bit for bit
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "split" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="another config"):
        train_vqvae(cfg("split", 8, "lr=0.5"), resume="auto")


def test_the_end_of_run_colour_check_warns_when_the_tokens_lost_colour(capsys):
    from training.stage0_finish import MIN_CHROMA_GAIN
    from training.stage0_finish import report_colour as _report_colour

    kept = {
        "images": 32,
        "chroma_gain": 0.93,
        "chroma_err": 0.01,
        "chroma_gain_tokens": 0.88,
        "chroma_err_tokens": 0.02,
    }
    _report_colour(kept)
    out = capsys.readouterr().out
    assert "chroma gain 0.88 tokens only / 0.93 reconstruction" in out and "WARNING" not in out
    # about the first small-base tokenizer (0.01 on 32 crops of its shards, docs/EXPERIMENTS.md): colour lost
    _report_colour({**kept, "chroma_gain": 0.04, "chroma_gain_tokens": 0.03})
    out = capsys.readouterr().out
    assert f"WARNING: the tokenizer does not reproduce colour (chroma gain 0.03 < {MIN_CHROMA_GAIN})" in out
    _report_colour({**kept, "images": 1, "chroma_gain": float("nan"), "chroma_gain_tokens": float("nan")})
    assert "WARNING" not in capsys.readouterr().out  # one crop: no slope, no verdict


def test_lowpass_loss_sees_block_colour_but_not_texture_that_averages_out():
    """The stage-0 low-pass term (docs/EXPERIMENTS.md): a tint of d on every pixel costs d², a checkerboard error
    that averages to zero within each block costs nothing, and its gradient on a uniform tint is what MSE on the
    block means gives; bad settings are refused before training."""
    import pytest

    from infra.core.errors import UserError
    from training.stage0_vqvae import VQVAETrainConfig, lowpass_mse, train_vqvae

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    tint = torch.tensor([0.2, -0.1, 0.05]).view(1, 3, 1, 1)
    assert torch.isclose(lowpass_mse(x + tint, x, 8), (tint**2).mean(), rtol=1e-5)
    checker = (torch.arange(32).view(1, 32) + torch.arange(32).view(32, 1)) % 2 * 2 - 1.0
    assert float(lowpass_mse(x + 0.3 * checker, x, 8)) < 1e-10
    assert float(((x + 0.3 * checker - x) ** 2).mean()) > 0.08  # the per-pixel loss does see it
    rec = x.clone().requires_grad_(True)
    lowpass_mse(rec + tint, x, 4).backward()
    assert torch.allclose(rec.grad, (2 * tint / 3 / (32 * 32) / 2).expand_as(rec), rtol=1e-4)
    for bad in ({"lowpass_weight": -1.0}, {"lowpass_factor": 0}):
        with pytest.raises(UserError, match="lowpass"):
            train_vqvae(VQVAETrainConfig(**bad))


def test_augmented_cosine_tokenizer_run_resumes_exactly_and_refuses_another_schedule(shards, tmp_path):
    """Stage 0 with crop augmentation and the cosine lr (training/augment.py, docs/EXPERIMENTS.md): the augmentation
    changes what is trained on, draws are fixed by (seed, step) so a resumed run gives the uninterrupted losses, the lr
    warms up then decays to lr * min_lr_ratio (a run extended to more steps decays over the new span from where it
    resumes), and a resume with another schedule or without augmentation is refused."""
    import pytest

    from infra.core.errors import UserError
    from training.stage0_vqvae import VQVAETrainConfig, load_vqvae_config, lr_factor, train_vqvae

    def cfg(name, steps, *extra):
        return load_vqvae_config(
            None,
            [
                f"output_dir={tmp_path / name}",
                f"data.shards={shards}",
                "model.preset=tiny",
                f"max_steps={steps}",
                "data.batch_size=4",
                "data.workers=0",
                "checkpoint_every=2",
                "tracking.enabled=false",
                "grid_images=2",
                "warmup_steps=3",
                *extra,
            ],
        )

    aug = ("augment=true", "lr_schedule=cosine")  # steps 1-3 are warm-up: the same lr whatever max_steps says
    plain = train_vqvae(cfg("plain", 5, "lr_schedule=cosine"))
    full = train_vqvae(cfg("full", 5, *aug))
    assert full["losses"] != plain["losses"]  # the crops really were augmented
    train_vqvae(cfg("split", 3, *aug))
    rest = train_vqvae(cfg("split", 5, *aug), resume="auto")
    assert rest["losses"] == full["losses"]
    for other in (
        ("lr_schedule=cosine",),
        ("augment=true",),
        ("augment=true", "lr_schedule=cosine", "augment_colour_p=0.5"),
    ):
        with pytest.raises(UserError, match="another config"):
            train_vqvae(cfg("split", 6, *other), resume="auto")
    c = VQVAETrainConfig(lr_schedule="cosine", warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    f = [lr_factor(c, s) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[10] == 1.0
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[60] == pytest.approx(0.55) and f[110] == pytest.approx(0.1)
    assert lr_factor(VQVAETrainConfig(warmup_steps=10, max_steps=110), 100) == 1.0  # constant: the first recipe
    for bad in ({"lr_schedule": "step"}, {"min_lr_ratio": 2.0}, {"augment_colour_p": -0.1}):
        with pytest.raises(UserError, match="lr_schedule|augment_colour_p"):
            train_vqvae(VQVAETrainConfig(**bad))


def test_sharpness_losses_see_edges_and_the_critic_scores_patches():
    """training/patch_gan.py: the high-pass of a flat image is zero, so its L1 ignores a uniform tint but sees a
    blurred edge; the critic maps 128-px crops to a patch grid and its hinge loss is 0 only past the margins."""
    from training.patch_gan import PatchDiscriminator, generator_loss, highpass, highpass_l1, hinge_d_loss

    flat = torch.full((2, 3, 32, 32), 0.3)
    assert float(highpass(flat).abs().max()) < 1e-6
    assert float(highpass_l1(flat + 0.2, flat)) < 1e-6  # a tint is not high-frequency
    edge = torch.zeros(1, 1, 32, 32)
    edge[..., 16:] = 1.0
    blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(edge, (2, 2, 2, 2), mode="replicate"), 5, 1)
    assert float(highpass_l1(blurred, edge)) > 0.01
    d = PatchDiscriminator(16)
    assert tuple(d(torch.zeros(2, 3, 128, 128)).shape) == (2, 1, 14, 14)
    hi, lo = torch.full((4,), 2.0), torch.full((4,), -2.0)
    assert float(hinge_d_loss(hi, lo)) == 0.0 and float(hinge_d_loss(lo, hi)) == 3.0
    assert float(generator_loss(hi)) == -2.0


def test_decoder_finetune_keeps_every_code_and_merges_into_the_full_model(shards, tmp_path):
    """Stage 0b (docs/EXPERIMENTS.md): `train_parts=decoder` from a full checkpoint changes only decoder.* and
    post_quant_conv.*, so a batch tokenizes to the same codes; it resumes exactly with its critic; `with_decoder`
    puts the new decoder beside the old transformer and refuses a tokenizer that encodes differently."""
    import pytest
    from safetensors.torch import load_file

    from infra.core.errors import UserError
    from model import from_pretrained
    from model.checkpoint import DECODER_PREFIXES, save_pretrained, with_decoder
    from training.stage0_vqvae import load_vqvae_config, train_vqvae

    torch.manual_seed(3)
    mcfg = VARSRConfig.preset("tiny")
    vq, var = build(mcfg)
    full = save_pretrained(tmp_path / "full", vq, var)

    def cfg(name, steps, *extra):
        return load_vqvae_config(
            None,
            [
                f"output_dir={tmp_path / name}",
                f"data.shards={shards}",
                "model.preset=tiny",
                f"max_steps={steps}",
                "data.batch_size=4",
                "checkpoint_every=2",
                "tracking.enabled=false",
                "grid_images=2",
                f"init_from={full}",
                "train_parts=decoder",
                "hf_weight=1",
                "gan_weight=0.1",
                "gan_start=1",
                "lr=0.01",
                *extra,
            ],
        )

    done = train_vqvae(cfg("dec", 4))
    split = train_vqvae(cfg("split", 2))
    rest = train_vqvae(cfg("split", 4), resume="auto")
    assert rest["losses"] == done["losses"] and split["losses"] == done["losses"][:2]  # the critic resumes too
    old = {k[6:]: v for k, v in load_file(full / "model.safetensors").items() if k.startswith("vqvae.")}
    new = {k[6:]: v for k, v in load_file(tmp_path / "dec" / "final" / "model.safetensors").items()}
    assert old.keys() == new.keys()
    moved = {k for k in old if not torch.equal(old[k], new[k])}
    assert moved and all(k.startswith(DECODER_PREFIXES) for k in moved)
    assert any(k.startswith("decoder.") for k in moved)

    merged = with_decoder(full, tmp_path / "dec" / "final", tmp_path / "merged", extra={"varsr.decoder.run_id": "x"})
    vq2, var2 = from_pretrained(merged)
    x = torch.rand(2, 3, mcfg.image_size, mcfg.image_size) * 2 - 1
    a, b = vq.tokenize(x), vq2.tokenize(x)
    assert all(torch.equal(i, j) for i, j in zip(a[0], b[0]))  # same codes at every scale
    assert all(torch.equal(p, q) for p, q in zip(var.state_dict().values(), var2.state_dict().values()))
    assert not torch.equal(vq.fhat_to_img(a[2]), vq2.fhat_to_img(b[2]))  # drawn by the new decoder
    assert json.loads((merged / "config.json").read_text())["lineage"]["varsr.decoder.run_id"] == "x"

    train_vqvae(cfg("all", 2, "train_parts=all", "gan_weight=0", "restart_dead_codes_every=0"))
    with pytest.raises(UserError, match="does not encode like"):
        with_decoder(full, tmp_path / "all" / "final", tmp_path / "bad")
    with pytest.raises(UserError, match="init_from"):
        train_vqvae(load_vqvae_config(None, [f"data.shards={shards}", "model.preset=tiny", "train_parts=decoder"]))


def test_residual_mix_decodes_a_share_of_crops_from_the_encoder_latent(shards):
    """Stage 0b's ``residual_mix`` (docs/EXPERIMENTS.md): a crop gets either the token-only f_hat or the encoder
    latent f (= f_hat + the exact last-scale residual, what a perfect refiner adds); 0 gives f_hat for every crop,
    1 gives f for every crop, 0.5 mixes them, and the setting is refused outside [0, 1] or without
    train_parts=decoder."""
    import pytest

    from infra.core.errors import UserError
    from training.stage0_vqvae import decoder_latent, load_vqvae_config, train_vqvae

    torch.manual_seed(5)
    vq = VQVAE(VARSRConfig.preset("tiny")).eval()
    x = torch.rand(16, 3, 64, 64) * 2 - 1
    f, f_hat = vq.encode(x), vq.tokenize(x)[2]
    assert not torch.allclose(f, f_hat, atol=1e-3)
    assert torch.equal(decoder_latent(vq, x, 0.0, torch.Generator().manual_seed(0)), f_hat)
    assert torch.allclose(decoder_latent(vq, x, 1.0, torch.Generator().manual_seed(0)), f, atol=1e-5)
    mixed = decoder_latent(vq, x, 0.5, torch.Generator().manual_seed(0))
    is_f = [bool(torch.allclose(m, a, atol=1e-5)) for m, a in zip(mixed, f)]
    is_hat = [bool(torch.equal(m, b)) for m, b in zip(mixed, f_hat)]
    assert all(a != b for a, b in zip(is_f, is_hat)) and 0 < sum(is_f) < 16
    assert torch.equal(mixed, decoder_latent(vq, x, 0.5, torch.Generator().manual_seed(0)))  # replayable per step
    for bad in (["residual_mix=1.5", "train_parts=decoder", "init_from=x"], ["residual_mix=0.5"]):
        with pytest.raises(UserError, match="residual_mix"):
            train_vqvae(load_vqvae_config(None, [f"data.shards={shards}", "model.preset=tiny", *bad]))
