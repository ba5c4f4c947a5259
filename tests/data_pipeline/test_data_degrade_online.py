"""On-the-fly degradation in the training reader (data_pipeline/degrade/online.py): HR-only shards from the real
build, a fresh draw per epoch for the same sample, a bit-for-bit replay of the recorded parameters through the
existing replay code, a bit-for-bit resume, and one-line refusals."""

from __future__ import annotations

import copy
import json
import tarfile

import numpy as np
import pytest
import torch

from data_pipeline.degrade import apply_degradation
from data_pipeline.degrade.online import online_seed
from data_pipeline.shards import BatchStream, decode_png, iter_tar, resolve_shards
from data_pipeline.shards.reader import upsample_lr
from infra.core.errors import UserError

# the fast loop leaves out every test that uses these: HR-only shards built by a Ray job (tests/conftest.py)
HEAVY_FIXTURES = {"hr_only"}

SIZE = 64


@pytest.fixture(scope="module")
def hr_only(tmp_path_factory):
    """64-px HR-only shards (shard.lr_variants=0) built by data_pipeline.build on a short-lived local Ray."""
    import ray

    import data_pipeline as dp
    from data_pipeline.sample_corpus import write_sample_corpus

    root = tmp_path_factory.mktemp("hr_only")
    write_sample_corpus(root / "corpus", with_bad_files=False)
    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False
        )
    try:
        cfg = dp.load_build_config(
            None,
            [
                f"shard.crop_size={SIZE}",
                "shard.max_samples_per_shard=4",
                "select.cluster.k=4",
                f"score.weights_dir={root / 'no-iqa'}",
                "shard.lr_variants=0",
            ],
        )
        dp.build(str(root / "corpus"), str(root / "shards"), cfg, print_summary=False)
    finally:
        if started:
            ray.shutdown()
    return root / "shards"


def _stream(shards, degrade="varsr-mild", workers=0, position=None, lr_mode="random", record_draws=None):
    return BatchStream(
        resolve_shards(str(shards)),
        size=SIZE,
        want_lr=True,
        batch_size=2,
        workers=workers,
        seed=7,
        rank=0,
        world=1,
        split="node",
        shuffle_buffer=4,
        position=position,
        lr_mode=lr_mode,
        degrade=degrade,
        record_draws=record_draws,
    )


def _by_key(stream, epochs: int) -> list[dict[str, tuple[torch.Tensor, dict, str]]]:
    """Per epoch: sample key -> (LR as trained on, drawn parameters, resize-back mode)."""
    out: list[dict] = [{} for _ in range(epochs)]
    for b in stream:
        if stream.pos.epoch >= epochs:
            break
        e = stream.pos.epoch
        for i, k in enumerate(b["key"]):
            out[e][k] = (b["lr"][i], b["degradation"][i], b["lr_mode"][i])
    return out


def test_hr_only_build_writes_no_lr(hr_only):
    s = resolve_shards(str(hr_only))
    assert s.manifest.lr_variants == 0 and s.num_samples > 0
    with tarfile.open(s.urls[0]) as t:
        names = t.getnames()
    assert names and not any(n.endswith(".lr.png") for n in names)
    meta = json.loads(next(iter_tar(s.urls[0]))["json"])
    assert meta["degradation"]["hr_only"] is True


def test_two_epochs_draw_differently_and_replay_exactly(hr_only):
    epochs = _by_key(_stream(hr_only), 2)
    common = sorted(set(epochs[0]) & set(epochs[1]))
    assert len(common) >= 4
    hr = {raw["__key__"]: decode_png(raw["hr.png"]) for u in resolve_shards(str(hr_only)).urls for raw in iter_tar(u)}
    for k in common:
        (lr0, p0, m0), (lr1, p1, m1) = epochs[0][k], epochs[1][k]
        assert p0["seed"] == online_seed(7, 0, k) and p1["seed"] == online_seed(7, 1, k)
        assert p0 != p1 and not torch.equal(lr0, lr1), f"{k}: the same degradation in two epochs"
        for lr, p, mode in ((lr0, p0, m0), (lr1, p1, m1)):  # the existing replay code gives the very LR trained on
            replayed = apply_degradation(hr[k], p)
            assert replayed.shape[:2] == (SIZE // 4, SIZE // 4)
            assert torch.equal(upsample_lr(replayed, (SIZE, SIZE), mode), lr)


def test_resume_draws_bit_for_bit(hr_only):
    full = _stream(hr_only)
    it = iter(full)
    for _ in range(3):
        next(it)
    saved = copy.deepcopy(full.pos)
    want = [next(it) for _ in range(4)]  # crosses into the second epoch on these small shards
    resumed = _stream(hr_only, position=saved)
    it2 = iter(resumed)
    for w in want:
        g = next(it2)
        assert g["key"] == w["key"] and g["lr_mode"] == w["lr_mode"] and g["degradation"] == w["degradation"]
        assert torch.equal(g["lr"], w["lr"]) and torch.equal(g["hr"], w["hr"])


def test_draw_is_independent_of_loader_workers(hr_only):
    a = _by_key(_stream(hr_only, workers=0), 1)[0]
    b = _by_key(_stream(hr_only, workers=2), 1)[0]
    common = set(a) & set(b)
    assert len(common) >= 4
    for k in common:
        assert torch.equal(a[k][0], b[k][0]) and a[k][1] == b[k][1]


def test_draw_log_records_every_nth_batch_and_replays(hr_only, tmp_path):
    s = _stream(hr_only, record_draws=(tmp_path / "draws.jsonl", 2), lr_mode="bicubic")
    it = iter(s)
    batches = [next(it) for _ in range(4)]
    rows = [json.loads(x) for x in (tmp_path / "draws.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in rows] == [1, 1, 3, 3]
    assert [r["key"] for r in rows] == batches[0]["key"] + batches[2]["key"]
    hr = {raw["__key__"]: decode_png(raw["hr.png"]) for u in resolve_shards(str(hr_only)).urls for raw in iter_tar(u)}
    lr_of = {k: batches[i]["lr"][j] for i in (0, 2) for j, k in enumerate(batches[i]["key"])}
    for r in rows:
        assert torch.equal(
            upsample_lr(apply_degradation(hr[r["key"]], r["params"]), (SIZE, SIZE), r["lr_mode"]), lr_of[r["key"]]
        )


def test_refusals_are_one_line(hr_only):
    with pytest.raises(UserError, match="HR-only .* set data.degrade") as e:
        _stream(hr_only, degrade="")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="not a degradation preset") as e:
        _stream(hr_only, degrade="no-such-preset")
    assert "\n" not in str(e.value)


def test_online_seed_depends_on_run_seed_epoch_and_key():
    seeds = {online_seed(s, e, k) for s in (1, 2) for e in (0, 1) for k in ("a", "b")}
    assert len(seeds) == 8 and all(0 <= x < 2**63 for x in seeds)
    assert (
        np.random.default_rng(online_seed(1, 0, "a")).random() == np.random.default_rng(online_seed(1, 0, "a")).random()
    )
