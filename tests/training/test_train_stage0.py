"""Stage 0 (tokenizer) helpers: dead-code re-seeding keeps a small VQVAE from collapsing onto a few codes, and the
tokenizer-only export loads into a stage-1/2 model through ``model.vqvae_checkpoint``."""
from __future__ import annotations

import torch

from model import VARSRConfig, VQVAE, build

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
