"""Training from the shards' token cache: a step from the cache equals a step that tokenises on the fly (same loss,
gradients and updated weights, with the tokenizer not run at all), the trainer picks the cache and says so, and a
cache made by another tokenizer is ignored with one line saying why.

Ray (the tokenise job) runs in a fixture and is shut down before any DeepSpeed rank starts."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from safetensors.torch import load_file

from data_pipeline.shards import BatchStream, resolve_shards
from data_pipeline.token_cache import TokenizeOptions, tokenize
from infra.core.config import load_config
from model import VARSRConfig, build
from model.checkpoint import load_tokenizer, open_tokenizer, save_tokenizer
from model.losses import compute_loss
from training.config import TrainConfig
from training.trainer import Trainer


def _tokenizer(path, seed):
    torch.manual_seed(seed)
    cfg = VARSRConfig.preset("tiny")
    vq, _ = build(cfg)
    return save_tokenizer(path, vq, cfg)


@pytest.fixture(scope="module")
def cached(shards, tmp_path_factory):
    """A copy of the session's shards with a token cache made by tokenizer 0 (Ray up only inside this fixture)."""
    import ray

    root = tmp_path_factory.mktemp("token_cache")
    ds = root / "shards"
    shutil.copytree(shards, ds)
    tok, other = _tokenizer(root / "tok0", 0), _tokenizer(root / "tok1", 1)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    try:
        tokenize(str(ds), open_tokenizer(str(tok)), TokenizeOptions(batch_size=3))
    finally:
        if started:
            ray.shutdown()
    return ds, tok, other


class CountingTokenizer:
    """The frozen VQVAE, counting how often it encodes an image."""

    def __init__(self, vq):
        self.vq, self.encodes = vq, 0

    def __getattr__(self, name):
        attr = getattr(self.vq, name)
        if name != "img_to_idxBl":
            return attr

        def counted(x):
            self.encodes += x.shape[0]
            return attr(x)

        return counted


def test_a_step_from_the_cache_equals_one_that_tokenises(cached):
    ds, tok, _ = cached
    torch.manual_seed(0)
    vq, var = build(VARSRConfig.preset("tiny"))
    load_tokenizer(vq, str(tok))
    shards = resolve_shards(str(ds))
    kw = dict(size=64, want_lr=True, batch_size=4, workers=0, seed=1, rank=0, world=1, lr_mode="random")
    plain, from_cache = next(iter(BatchStream(shards, **kw))), next(iter(BatchStream(shards, tokens=True, **kw)))
    assert plain["key"] == from_cache["key"]
    runs = []
    for batch in (plain, from_cache):
        model = copy.deepcopy(var)
        model.set_vqvae(vq)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
        counting = CountingTokenizer(vq)
        tokens = (batch["tokens"], batch["resid"]) if "tokens" in batch else None
        out = compute_loss(
            counting,
            model,
            batch["hr"],
            batch["lr"],
            batch["label"],
            generator=torch.Generator().manual_seed(7),
            tokens=tokens,
        )
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        runs.append((out, counting.encodes, grads, {k: v.clone() for k, v in model.state_dict().items()}))
    (a, enc_a, ga, wa), (b, enc_b, gb, wb) = runs
    assert (enc_a, enc_b) == (4, 0)  # on the fly: one encode per sample; from the cache: none
    assert a.loss.item() == b.loss.item() and a.ce.item() == b.ce.item() and a.diff.item() == b.diff.item()
    assert a.acc_per_scale == b.acc_per_scale and a.tokens == b.tokens
    assert ga.keys() == gb.keys() and len(ga) > 10 and all(torch.equal(ga[k], gb[k]) for k in ga)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], v) for k, v in var.state_dict().items())  # the step did move the weights


def _cfg(tmp_path, name, ds, tok, *extra):
    return load_config(
        TrainConfig,
        None,
        [
            "stage=isr",
            f"output_dir={tmp_path / name}",
            f"data.shards={ds}",
            f"model.vqvae_checkpoint={tok}",
            "data.batch_size=4",
            "data.workers=0",
            "optim.lr=2e-3",
            "validation.num_images=1",
            "validation.batches=1",
            "checkpoint_every=0",
            "tracking.enabled=false",
            "seed=2",
            "data.lr_upsample=random",
            *extra,
        ],
    )


def test_training_from_the_cache_equals_training_without(cached, tmp_path, dist_port, monkeypatch, capfd):
    ds, tok, _ = cached
    with_cache = Trainer(_cfg(tmp_path, "cache", ds, tok, "max_steps=3"))
    r1 = with_cache.train()
    err = capfd.readouterr().err
    assert with_cache.token_cache and f"using the token cache of {ds}" in err
    assert all(".tok-" in u for u in with_cache.stream.urls)
    monkeypatch.setenv("MASTER_PORT", str(dist_port + 1))
    without = Trainer(_cfg(tmp_path, "plain", ds, tok, "max_steps=3", "data.token_cache=off"))  # YAML off
    r2 = without.train()
    assert not without.token_cache and "token cache off (data.token_cache=false)" in capfd.readouterr().err
    assert r1.losses == r2.losses and len(r1.losses) == 3  # exactly, not approximately
    w1, w2 = load_file(f"{r1.export_dir}/model.safetensors"), load_file(f"{r2.export_dir}/model.safetensors")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_a_cache_of_another_tokenizer_is_ignored_with_one_line(cached, tmp_path, dist_port, capfd):
    ds, tok, other = cached
    made_by = resolve_shards(str(ds)).token_cache.tokenizer_sha256
    own = open_tokenizer(str(other)).sha256
    t = Trainer(_cfg(tmp_path, "other", ds, other, "max_steps=1"))
    r = t.train()
    lines = [x for x in capfd.readouterr().err.splitlines() if "token cache" in x]
    assert lines == [
        f"[train] token cache of {ds} was made by tokenizer {made_by[:12]} for scales [1, 2, 4], but "
        f"this run's frozen tokenizer is {own[:12]} for scales [1, 2, 4]: ignoring it, tokenising HR "
        f"on the fly"
    ]
    assert not t.token_cache and not any(".tok-" in u for u in t.stream.urls) and r.steps == 1
