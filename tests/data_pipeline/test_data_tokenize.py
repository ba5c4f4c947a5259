"""The token cache in the shards (`varsr data tokenize`), on shards built by the real pipeline and a real Ray runtime:
cached tokens and residuals equal tokenising on the fly bit for bit, token shards follow the contract (every
original member, in order, plus the cache members), the reader returns the cache fields in the same batches, the job
resumes, and the CLI runs it and reports clear errors."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import data_pipeline as dp
from data_pipeline.sample_corpus import write_sample_corpus
from data_pipeline.shards import (
    TOKEN_MEMBERS,
    BatchStream,
    ShardStream,
    TarWriter,
    decode_hr,
    iter_tar,
    read_manifest,
    read_token_stats,
    resolve_shards,
    token_shard_name,
    token_stats_name,
)
from data_pipeline.token_cache import TokenizeOptions, tokenize, tokenize_shard
from infra.cli import main as varsr_main
from infra.core.errors import UserError
from model import VARSRConfig, build
from model.checkpoint import open_tokenizer, save_tokenizer, tokenizer_sha256
from model.losses import tokenize_hr

SIZE = 64  # the tiny preset's image size


def _tokenizer_ckpt(path: Path, seed: int, **overrides) -> Path:
    torch.manual_seed(seed)
    cfg = VARSRConfig.preset("tiny", **overrides)
    vq, _ = build(cfg)
    return save_tokenizer(path, vq, cfg)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_local):
    """Built 64-px shards (pristine copy kept aside) and a tiny tokenizer checkpoint."""
    root = tmp_path_factory.mktemp("tokenize")
    write_sample_corpus(root / "corpus", with_bad_files=False)
    cfg = dp.load_build_config(
        None,
        [
            "shard.crop_size=64",
            "shard.max_samples_per_shard=4",
            "select.cluster.k=4",
            f"score.weights_dir={root / 'no-iqa'}",
            "shard.lr_variants=2",
        ],
    )
    dp.build(str(root / "corpus"), str(root / "pristine"), cfg, print_summary=False)
    return root, root / "pristine", _tokenizer_ckpt(root / "tok0", seed=0)


@pytest.fixture(scope="module")
def tokenised(dataset):
    """A copy of the dataset tokenised by the job (batches of 3, so the job's batches differ from any reader's)."""
    root, pristine, ckpt = dataset
    out = root / "tokenised"
    shutil.copytree(pristine, out)
    summary = tokenize(str(out), open_tokenizer(str(ckpt)), TokenizeOptions(batch_size=3, device="auto"))
    return out, ckpt, summary


def _tree(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_cached_tokens_and_residuals_equal_on_the_fly_bit_for_bit(tokenised):
    """Every cached sample equals the frozen tokenizer run on the fly on the same HR crop, in a batch of another
    size and composition than the job used (the tokenizer works per sample, so batches cannot change a value)."""
    out, ckpt, summary = tokenised
    tok = open_tokenizer(str(ckpt))
    shards = resolve_shards(str(out))
    assert summary["tokenized"] == summary["samples"] == shards.num_samples > 8
    n = 0
    for url in shards.token_urls():
        raws = list(iter_tar(url))
        hr = torch.stack([decode_hr(r, SIZE) for r in raws])
        idx_list, R = tokenize_hr(tok.vqvae, hr.flip(0))  # on the fly, one batch, reversed order
        idx, R = torch.cat(idx_list, 1).flip(0), R.flip(0)
        for i, raw in enumerate(raws):
            t = np.load(io.BytesIO(raw["tokens.npy"]))
            r = np.load(io.BytesIO(raw["resid.npy"]))
            assert t.dtype == np.int16 and r.dtype == np.float32  # lossless: vocabulary 64 fits int16
            assert np.array_equal(t.astype(np.int64), idx[i].numpy())
            assert r.tobytes() == R[i].numpy().tobytes()  # bit for bit, not merely close
            assert json.loads(raw["tokens.json"]) == {"tokenizer_sha256": tok.sha256, "patch_nums": [1, 2, 4]}
            n += 1
    assert n == shards.num_samples


def test_reader_returns_the_cache_fields_in_the_same_batches(tokenised):
    out, ckpt, _ = tokenised
    shards = resolve_shards(str(out))
    kw = dict(size=SIZE, want_lr=True, batch_size=4, workers=0, seed=3, rank=0, world=1, lr_mode="random")
    plain, cached = iter(BatchStream(shards, **kw)), iter(BatchStream(shards, tokens=True, **kw))
    vq = open_tokenizer(str(ckpt)).vqvae
    for _ in range(2 * shards.num_samples // 4):  # two epochs
        a, b = next(plain), next(cached)
        assert a["key"] == b["key"] and a["lr_mode"] == b["lr_mode"]
        assert torch.equal(a["hr"], b["hr"]) and torch.equal(a["lr"], b["lr"]) and "tokens" not in a
        assert b["tokens"].dtype == torch.long and b["tokens"].shape == (4, 1 + 4 + 16)
        assert b["resid"].dtype == torch.float32 and b["resid"].shape == (4, 16, 8)
        idx_list, R = tokenize_hr(vq, a["hr"])
        assert torch.equal(torch.cat(idx_list, 1), b["tokens"]) and torch.equal(R, b["resid"])
    # the per-node split picks the same samples from the token shards as from the originals
    for rank in range(2):
        common = dict(size=SIZE, want_lr=False, seed=0, epoch=1, rank=rank, world=2)
        keys = [s["key"] for s in ShardStream(shards.urls, **common)]
        tkeys = [s["key"] for s in ShardStream(shards.token_urls(), tokens=shards.token_cache, **common)]
        assert keys == tkeys and keys


def test_token_shards_follow_the_contract_and_leave_the_originals_alone(dataset, tokenised):
    root, pristine, _ = dataset
    out, ckpt, summary = tokenised
    m, _ = read_manifest(str(out))
    pm, _ = read_manifest(str(pristine))
    sha = tokenizer_sha256(open_tokenizer(str(ckpt)).vqvae)
    assert m.tokens.tokenizer_sha256 == sha == summary["tokenizer_sha256"]
    assert m.tokens.patch_nums == [1, 2, 4] and m.tokens.device == "cpu/1t"
    assert [(m.shards, m.counts, m.config_hash) for _ in "x"] == [(pm.shards, pm.counts, pm.config_hash)]
    files = _tree(out)
    for name, data in _tree(pristine).items():
        if name != "manifest.json":
            assert files[name] == data  # originals, stats and tables untouched
    assert len(m.tokens.shards) == len([e for e in m.shards if e.samples])
    for e, t in zip([e for e in m.shards if e.samples], m.tokens.shards):
        assert t.name == token_shard_name(e.name, sha) == e.name.replace(".tar", f".tok-{sha[:12]}.tar")
        assert t.samples == e.samples
        st = read_token_stats(str(out / token_stats_name(t.name)))
        assert (st.source, st.source_sha256, st.bytes, st.sha256) == (e.name, e.sha256, t.bytes, t.sha256)
        with tarfile.open(out / e.name) as a, tarfile.open(out / t.name) as b:
            orig = [(x.name, a.extractfile(x).read()) for x in a.getmembers()]
            new = [(x.name, b.extractfile(x).read()) for x in b.getmembers()]
            assert all((x.mtime, x.uid, x.mode) == (0, 0, 0o644) for x in b.getmembers())
        # every original member in order, each sample followed by its cache members
        assert [x for x in new if not x[0].endswith(TOKEN_MEMBERS)] == orig
        keys = list(dict.fromkeys(n.split(".", 1)[0] for n, _ in orig))
        expect = []
        for k in keys:
            expect += [n for n, _ in orig if n.split(".", 1)[0] == k] + [f"{k}.{x}" for x in TOKEN_MEMBERS]
        assert [n for n, _ in new] == expect
    # a folder listed without its manifest still means the originals only
    assert sorted(resolve_shards(",".join(str(out / e.name) for e in m.shards)).urls) == sorted(
        u for u in resolve_shards(str(out)).urls
    )
    assert rc_of(["data", "verify", str(out)]) == 0


def rc_of(argv: list[str]) -> int:
    return varsr_main(argv)


def test_rerun_resumes_and_rewrites_byte_identical_shards(dataset, tokenised, tmp_path):
    """An interrupted run (no manifest update yet, one token shard missing, one damaged) is completed by a re-run
    that keeps the intact shards untouched and rewrites the others byte for byte."""
    root, pristine, ckpt = dataset
    ref_dir = tokenised[0]
    ref_manifest = (ref_dir / "manifest.json").read_bytes()
    out = tmp_path / "ds"
    shutil.copytree(ref_dir, out)
    shutil.copy(pristine / "manifest.json", out / "manifest.json")  # the commit point was never reached
    m, _ = read_manifest(str(ref_dir))
    names = [t.name for t in m.tokens.shards]
    (out / names[0]).unlink()
    data = (out / names[1]).read_bytes()
    (out / names[1]).write_bytes(data[: len(data) // 2])  # damaged (cannot happen through the writer, but disks do)
    (out / ".tmp-leftover.tar").write_bytes(b"partial")
    before = {n: os.stat(out / n).st_ino for n in names[2:]}
    r = tokenize(str(out), open_tokenizer(str(ckpt)), TokenizeOptions(batch_size=5))
    assert (r["written"], r["kept"]) == (2, len(names) - 2)
    assert {n: os.stat(out / n).st_ino for n in names[2:]} == before  # kept, not rewritten
    assert not (out / ".tmp-leftover.tar").exists()
    for n in names:
        assert (out / n).read_bytes() == (ref_dir / n).read_bytes()  # deterministic: batch size changes nothing
    assert (out / "manifest.json").read_bytes() == ref_manifest
    again = tokenize(str(out), open_tokenizer(str(ckpt)))
    assert (again["written"], again["kept"]) == (0, len(names)) and again["manifest_sha256"] == r["manifest_sha256"]


def test_another_tokenizer_writes_new_versions_beside_the_old(dataset, tokenised, tmp_path):
    root, _, _ = dataset
    out = tmp_path / "ds"
    shutil.copytree(tokenised[0], out)
    old = read_manifest(str(out))[0].tokens
    other = open_tokenizer(str(_tokenizer_ckpt(tmp_path / "tok1", seed=1)))
    r = tokenize(str(out), other)
    new = read_manifest(str(out))[0].tokens
    assert r["replaced_tokenizer"] == old.tokenizer_sha256 != new.tokenizer_sha256 == other.sha256
    assert r["written"] == len(new.shards) and all((out / t.name).is_file() for t in old.shards + new.shards)


def test_a_bad_sample_is_copied_without_cache_members(dataset, tmp_path):
    """Tokenise one hand-made shard in-process: an undecodable HR is copied as is, the reader skips it either way."""
    _, _, ckpt = dataset
    tok = open_tokenizer(str(ckpt))
    src = tmp_path / "shard-000000.tar"
    good = next(iter_tar(str(next(Path(dataset[1]).glob("shard-*.tar")))))
    w = TarWriter(str(src))
    for key, hr in (("a", good["hr.png"]), ("b", b"not a png"), ("c", good["hr.png"])):
        for ext, data in (("hr.png", hr), ("json", good["json"]), ("lr.png", good["lr.png"])):
            w.add(f"{key}.{ext}", data)
    size, sha = w.finish()
    w.publish()
    entry = {"name": src.name, "samples": 3, "bytes": size, "sha256": sha}
    st = tokenize_shard(str(src), entry, str(tmp_path), tok, "cpu", 1, 2)
    assert (st["samples"], st["tokenized"]) == (3, 2)
    samples = {s["__key__"]: s for s in iter_tar(str(tmp_path / st["shard"]))}
    assert "tokens.npy" not in samples["b"] and all(m in samples["a"] and m in samples["c"] for m in TOKEN_MEMBERS)
    (tmp_path / "x").mkdir()
    with pytest.raises(UserError, match="does not match its manifest entry"):
        tokenize_shard(str(src), {**entry, "sha256": "0" * 64}, str(tmp_path / "x"), tok, "cpu", 1, 2)
    assert not any((tmp_path / "x").iterdir())  # nothing published, no temporary left


def test_cli_tokenize_inspect_and_clear_errors(dataset, tmp_path, capsys):
    root, pristine, ckpt = dataset
    out = tmp_path / "ds"
    shutil.copytree(pristine, out)
    assert varsr_main(["data", "tokenize", "--shards", str(out), "--vqvae", str(ckpt), "--batch-size", "4"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["written"] == r["shards"] > 1 and r["kept"] == 0 and r["tokenized"] == r["samples"]
    assert varsr_main(["data", "inspect", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["token_cache"]["tokenizer_sha256"] == r["tokenizer_sha256"]
    assert info["token_cache"]["shards"] == r["shards"]
    # errors are one line, exit 2: no manifest, a tokenizer for another image size, a folder that is no checkpoint
    big = _tokenizer_ckpt(tmp_path / "tok128", seed=0, patch_nums=(1, 2, 4, 8))
    for argv, msg in (
        ([str(tmp_path / "nothing"), str(ckpt)], "has no manifest.json"),
        ([str(out), str(big)], "holds 64px HR crops but the tokenizer takes 128px"),
        ([str(out), str(tmp_path)], "is not a native VARSR checkpoint"),
    ):
        assert varsr_main(["data", "tokenize", "--shards", argv[0], "--vqvae", argv[1]]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err


def test_rebuilding_intact_shards_keeps_their_token_cache(dataset, tokenised, tmp_path):
    """`varsr data build` re-run over a tokenised folder whose shards are intact rewrites the manifest with the
    same token cache; the cache goes only when the shards it was made from change."""
    root, _, _ = dataset
    out = tmp_path / "again"
    shutil.copytree(tokenised[0], out)
    before, _ = read_manifest(str(out))
    cfg = dp.load_build_config(
        None,
        [
            "shard.crop_size=64",
            "shard.max_samples_per_shard=4",
            "select.cluster.k=4",
            f"score.weights_dir={root / 'no-iqa'}",
            "shard.lr_variants=2",
        ],
    )
    r = dp.shard(str(out / "selection.parquet"), str(out), cfg)
    assert r["written"] == 0 and r["skipped"] == r["shards"]
    after, _ = read_manifest(str(out))
    assert before.tokens is not None and after.tokens == before.tokens
