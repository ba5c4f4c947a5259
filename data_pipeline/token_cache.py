"""``varsr data tokenize``: the token cache in the shards, written by a Ray job.

Training tokenises every HR crop with the frozen VQVAE at every step, although both are fixed: the same work every
epoch (about 40 % of an fp32 step on the research geometry). This job does it once. For every shard listed in a
dataset's manifest it writes a new version beside the original, ``shard-000000.tok-<sha12>.tar``: every member of
the original in order, and per sample the cache members (``TOKEN_MEMBERS`` in ``shards/format.py``): the multi-scale
token indices, the continuous residual left before the last scale (the refiner's target, float32) and the
tokenizer's sha256. The manifest is rewritten last with ``tokens`` filled in: the commit point. Training uses the
cache when that hash equals its own frozen tokenizer's.

The cache holds what depends on the HR crop alone (its tokens and the refiner's residual), never the LR: with
on-the-fly degradation (``data.degrade``, ``data_pipeline/degrade/online.py``) the LR is drawn anew every epoch in the
loader while the cached HR tokens still apply unchanged.

* One Ray task per shard, batched (``batch_size`` HR crops per call), on a GPU when the cluster has them and on CPUs
  otherwise. A task lost with its node is retried; its writes are atomic and deterministic (same source, tokenizer
  and kernels give byte-identical tars), so a retried run equals an uninterrupted one.
* Each task streams its source shard through the storage layer, checks it against the manifest (size and sha256)
  as it goes, and publishes its stats, then its tar (never a partial object under the final name).
* Re-running resumes: a published token shard whose stats name the same source sha256 and tokenizer, and whose
  size and sha256 match them, is kept.
* Local folders and object-store prefixes (``s3://…``) alike.

The tokenizer comes from the caller (the ``varsr`` CLI loads it from a checkpoint through the model package): this
module only needs an object with ``sha256``, ``patch_nums``, ``image_size``, ``to(device)`` and
``__call__(hr (B, 3, S, S) in [0, 1]) -> (indices (B, L), residual (B, pn_last², Cvae) float32)``, shipped to the
tasks through Ray's object store so that no worker needs the checkpoint's location.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tarfile
import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from infra.core import storage
from infra.core.config import build as build_typed
from infra.core.config import to_dict
from infra.core.errors import UserError

from .shards import (
    ShardEntry,
    TarWriter,
    TokenCache,
    TokenShardStats,
    decode_hr,
    encode_token_members,
    iter_tar_stream,
    publish_with_stats,
    read_manifest,
    read_token_stats,
    remove_stale_temporaries,
    token_shard_name,
    token_stats_name,
    write_manifest,
)
from .shards.format import manifest_url

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    """What the job needs from a frozen tokenizer (``model.checkpoint.FrozenTokenizer`` is one)."""

    sha256: str
    patch_nums: tuple[int, ...]
    image_size: int

    def to(self, device: Any) -> "Tokenizer": ...

    def __call__(self, hr: Any) -> tuple[Any, Any]: ...


@dataclass
class TokenizeOptions:
    batch_size: int = 8  # HR crops per tokenizer call
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: GPUs when the Ray cluster has them, else CPUs
    threads: int = 1  # torch threads (= Ray CPUs) per CPU task; cached values equal on-the-fly ones at equal threads
    max_retries: int = 5  # per task, when its worker or node dies

    def validate(self) -> "TokenizeOptions":
        if self.batch_size < 1 or self.threads < 1 or self.max_retries < 0:
            raise UserError("tokenize: batch_size and threads must be >= 1, max_retries >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"tokenize: device must be auto, cpu or cuda, got {self.device!r}")
        return self


# ------------------------------------------------------------------------------------------------------ one task
class _HashingReader:
    """A read-only file wrapper that hashes and counts every byte read through it (the source check)."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.sha.update(b)
        self.bytes += len(b)
        return b

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _device_label(device: str, threads: int) -> str:
    import torch

    if device == "cuda":
        return f"cuda/{torch.cuda.get_device_name()}"
    return f"cpu/{threads}t"


def tokenize_shard(
    src_url: str, source: dict, out_dir: str, tokenizer: Tokenizer, device: str, threads: int, batch_size: int
) -> dict:
    """One Ray task: write the token-cache version of one shard and return its :class:`TokenShardStats` (as a dict).

    ``source`` is the shard's manifest entry (name, samples, bytes, sha256). Samples whose HR does not decode to the
    tokenizer's size are copied without cache members (the reader skips them either way, so the token shard yields
    the same samples as its original)."""
    import torch

    if device == "cpu":
        torch.set_num_threads(threads)
    tok = tokenizer.to(device)
    sha, pn = tokenizer.sha256, list(tokenizer.patch_nums)
    name = token_shard_name(source["name"], sha)
    writer = TarWriter(storage.join(out_dir, name))
    samples = tokenized = 0
    pending: list[tuple[dict, Any]] = []

    def flush() -> None:
        nonlocal tokenized
        good = [hr for _, hr in pending if hr is not None]
        if good:
            idx, resid = tok(torch.stack(good).to(device))
            idx, resid = idx.cpu().numpy(), resid.cpu().numpy()
        j = 0
        for raw, hr in pending:
            key = raw["__key__"]
            for ext, data in raw.items():
                if not ext.startswith("__"):
                    writer.add(f"{key}.{ext}", data)
            if hr is not None:
                for ext, data in encode_token_members(idx[j], resid[j], sha, pn).items():
                    writer.add(f"{key}.{ext}", data)
                j += 1
                tokenized += 1
        pending.clear()

    try:
        with storage.open_url(src_url) as f:
            src = _HashingReader(f)
            for raw in iter_tar_stream(src, src_url):
                samples += 1
                try:
                    hr = decode_hr(raw, tokenizer.image_size)
                except Exception:  # noqa: BLE001 - a bad sample: copied as is, skipped by every reader
                    hr = None
                pending.append((raw, hr))
                if sum(h is not None for _, h in pending) >= batch_size:
                    flush()
            flush()
            src.drain()
        if src.bytes != source["bytes"] or src.sha.hexdigest() != source["sha256"] or samples != source["samples"]:
            raise UserError(
                f"{src_url} does not match its manifest entry (size, sha256 or sample count): the "
                f"dataset changed or is damaged (varsr data verify)"
            )
        stats = TokenShardStats(
            shard=name,
            source=source["name"],
            source_sha256=source["sha256"],
            tokenizer_sha256=sha,
            samples=samples,
            tokenized=tokenized,
            device=_device_label(device, threads),
        )
        publish_with_stats(writer, stats, storage.join(out_dir, token_stats_name(name)))
    except (tarfile.TarError, EOFError) as e:
        writer.abort()
        raise UserError(
            f"cannot read {src_url} as a tar ({type(e).__name__}: {e}): the dataset is damaged (varsr data verify)"
        ) from None
    except BaseException:
        writer.abort()
        raise
    return to_dict(stats)


# ------------------------------------------------------------------------------------------------------- driver
def _complete(out: str, entry: ShardEntry, sha: str) -> TokenShardStats | None:
    """The stats of ``entry``'s token shard when it is published, intact and made from this source and tokenizer."""
    name = token_shard_name(entry.name, sha)
    tar_url, st_url = storage.join(out, name), storage.join(out, token_stats_name(name))
    if not (storage.exists(tar_url) and storage.exists(st_url)):
        return None
    st = read_token_stats(st_url)
    if st.source != entry.name or st.source_sha256 != entry.sha256 or st.tokenizer_sha256 != sha:
        log.info("tokenize: %s was made from another source shard; writing it again", tar_url)
        return None
    if storage.size(tar_url) != st.bytes or storage.sha256(tar_url) != st.sha256:
        log.warning("tokenize: %s does not match its stats (size/sha256); writing it again", tar_url)
        return None
    return st


def _cause(e: BaseException) -> BaseException:
    """The user-facing error inside a Ray task failure (a UserError raised by the task), else ``e``."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, UserError) else e


def _run_tasks(
    todo: list[ShardEntry], out: str, tokenizer: Tokenizer, opts: TokenizeOptions, device: str, on_done
) -> None:
    import ray

    resources = {"num_gpus": 1, "num_cpus": 1} if device == "cuda" else {"num_cpus": opts.threads}
    task = ray.remote(tokenize_shard).options(max_retries=opts.max_retries, **resources)
    tok_ref = ray.put(tokenizer)
    cluster = ray.cluster_resources()
    width = max(1, int(cluster.get("GPU", 0)) if device == "cuda" else int(cluster.get("CPU", 1)) // opts.threads)
    pending: dict
    queue, pending = list(todo), {}
    while queue or pending:
        while queue and len(pending) < width:
            e = queue.pop(0)
            ref = task.remote(
                storage.join(out, e.name), to_dict(e), out, tok_ref, device, opts.threads, opts.batch_size
            )
            pending[ref] = e
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as e:  # a task's own UserError is the message to show
                c = _cause(e)
                if isinstance(c, UserError):
                    raise UserError(str(c)) from None
                raise
            on_done(build_typed(TokenShardStats, result))


def _pick_device(opts: TokenizeOptions) -> str:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if opts.device == "cuda" and gpus < 1:
        raise UserError("tokenize: --device cuda, but the Ray cluster has no GPU")
    return "cuda" if opts.device == "cuda" or (opts.device == "auto" and gpus >= 1) else "cpu"


def tokenize(
    shards: str,
    tokenizer: Tokenizer,
    options: TokenizeOptions | None = None,
    ray_address: str | None = None,
    num_cpus: int | None = None,
) -> dict:
    """Add (or complete) the token cache of the dataset at ``shards`` (a folder or URL prefix with manifest.json)
    for ``tokenizer``; returns a summary. The manifest is rewritten last, only when every shard has its version."""
    from .jobs import ensure_ray

    opts = (options or TokenizeOptions()).validate()
    out = storage.absolute(shards)
    m, m_sha = read_manifest(out)
    sha, pn = tokenizer.sha256, [int(p) for p in tokenizer.patch_nums]
    if m.hr_size != tokenizer.image_size:
        raise UserError(
            f"{shards} holds {m.hr_size}px HR crops but the tokenizer takes {tokenizer.image_size}px "
            f"images (patch_nums {pn}): use a checkpoint of the model these shards are for"
        )
    entries = [e for e in m.shards if e.samples > 0]
    removed = remove_stale_temporaries(out)
    if removed:
        log.info("tokenize: removed %d temporary files of an interrupted run", removed)
    stats: dict[str, TokenShardStats] = {}
    todo = []
    for e in entries:
        st = _complete(out, e, sha)
        if st is None:
            todo.append(e)
        else:
            stats[e.name] = st
    t0 = time.perf_counter()
    device = None
    if todo:
        log.info(
            "tokenize: %d shards, %d already tokenised, %d to write (tokenizer %s)",
            len(entries),
            len(stats),
            len(todo),
            sha[:12],
        )
        ensure_ray(ray_address, num_cpus)
        device = _pick_device(opts)
        n_done = {"shards": 0}

        def on_done(st: TokenShardStats) -> None:
            stats[st.source] = st
            n_done["shards"] += 1
            log.info("tokenize: %s (%d samples) %d/%d", st.shard, st.samples, n_done["shards"], len(todo))

        _run_tasks(todo, out, tokenizer.to("cpu"), opts, device, on_done)
    secs = time.perf_counter() - t0
    ordered = [stats[e.name] for e in entries]
    devices = sorted({s.device for s in ordered})
    cache = TokenCache(
        tokenizer_sha256=sha,
        patch_nums=pn,
        device="; ".join(devices),
        shards=[ShardEntry(name=s.shard, samples=s.samples, bytes=s.bytes, sha256=s.sha256) for s in ordered],
    )
    replaced = m.tokens.tokenizer_sha256 if m.tokens is not None and m.tokens.tokenizer_sha256 != sha else None
    new = dataclasses.replace(m, tokens=cache)
    if new.to_bytes() != m.to_bytes():
        now_sha = hashlib.sha256(storage.read_bytes(manifest_url(out))).hexdigest()
        if now_sha != m_sha:
            raise UserError(f"{manifest_url(out)} changed while tokenising (another build?): run tokenize again")
        write_manifest(out, new)  # the commit point
    _, new_sha = read_manifest(out)
    return {
        "shards": len(entries),
        "written": len(todo),
        "kept": len(entries) - len(todo),
        "samples": sum(s.samples for s in ordered),
        "tokenized": sum(s.tokenized for s in ordered),
        "tokenizer_sha256": sha,
        "patch_nums": pn,
        "device": cache.device,
        "replaced_tokenizer": replaced,
        "seconds": round(secs, 3),
        "manifest_sha256": new_sha,
    }
