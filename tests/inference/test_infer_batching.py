"""Request batching (inference/batching.py) and the batched pipeline call it drives: batches form from concurrent
requests with the same key, each request gets exactly its own results, a failing request does not take its
batch-mates down, and a request's images are byte-identical alone and batched (fixed seeds, real tiny model)."""

from __future__ import annotations

import dataclasses
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image
from skimage import data as skdata

from inference.batching import RequestBatcher
from inference.config import load_inference_config
from inference.pipeline import VARSRPipeline
from model import VARSRConfig, build

WAIT_LONG = 60.0  # batches below close when full; the wait only bounds a broken test


def run_tagged(key, payloads, deliver):
    """A batch function whose answers show which batch and which request they came from."""
    return [(key, p, len(payloads)) for p in payloads]


def submit_all(batcher: RequestBatcher, jobs: list[tuple], threads: int | None = None) -> list:
    """Submit ``jobs`` [(key, payload, size)] from concurrent threads released together; results in job order."""
    start = threading.Barrier(len(jobs))

    def one(job):
        start.wait()
        try:
            return batcher.submit(*job, timeout=120)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            return e

    with ThreadPoolExecutor(max_workers=threads or len(jobs)) as ex:
        return list(ex.map(one, jobs))


def test_concurrent_requests_with_one_key_form_one_batch_and_get_their_own_results():
    b = RequestBatcher(run_tagged, max_batch=6, wait_s=WAIT_LONG)
    out = submit_all(b, [("k", f"req{i}", 1) for i in range(6)])
    assert [o[1] for o in out] == [f"req{i}" for i in range(6)]  # each got its own answer back
    assert all(o[2] == 6 for o in out)  # ... from one batch of all six
    assert (b.stats.batches, b.stats.requests, b.stats.largest_batch_requests) == (1, 6, 6)
    b.close()


def test_requests_with_different_keys_never_share_a_batch():
    b = RequestBatcher(run_tagged, max_batch=4, wait_s=0.2)
    jobs = [("a", "a0", 1), ("b", "b0", 1), ("a", "a1", 1), ("b", "b1", 1), ("c", "c0", 1)]
    out = submit_all(b, jobs)
    for (key, payload, _), o in zip(jobs, out):
        assert o[0] == key and o[1] == payload
    assert b.stats.requests == 5 and b.stats.batches >= 3  # at least one batch per key
    b.close()


def test_batches_hold_at_most_max_batch_images_and_a_large_request_runs_alone():
    sizes = []
    b = RequestBatcher(lambda k, ps, deliver: sizes.append(sum(p for p in ps)) or list(ps), max_batch=4, wait_s=0.05)
    out = submit_all(b, [("k", s, s) for s in (1, 3, 2, 2, 6, 1)])
    assert out == [1, 3, 2, 2, 6, 1]
    assert sum(sizes) == 15 and max(sizes) == 6  # the 6-image request ran, alone
    assert all(s <= 4 for s in sizes if s != 6)
    b.close()


def test_a_failing_request_gets_its_error_and_its_batch_mates_their_results():
    def run(key, payloads, deliver):
        if "poison" in payloads:
            raise ValueError("poisoned batch")
        return [p.upper() for p in payloads]

    b = RequestBatcher(run, max_batch=5, wait_s=WAIT_LONG)
    out = submit_all(b, [("k", p, 1) for p in ("a", "b", "poison", "c", "d")])
    assert out[:2] == ["A", "B"] and out[3:] == ["C", "D"]
    assert isinstance(out[2], ValueError) and "poisoned" in str(out[2])
    assert b.stats.retried_alone == 5 and b.stats.largest_batch_requests == 5  # it was batched, then split
    b.close()


def test_a_batch_function_that_loses_results_fails_loudly_not_silently():
    b = RequestBatcher(lambda k, ps, deliver: list(ps)[:-1], max_batch=1, wait_s=0)
    with pytest.raises(RuntimeError, match="0 results for 1 requests"):
        b.submit("k", "x")
    b.close()
    with pytest.raises(RuntimeError, match="closed"):
        b.submit("k", "y")
    b = RequestBatcher(lambda k, ps, deliver: None, max_batch=1, wait_s=0)
    with pytest.raises(RuntimeError, match="answered 0 of 1 requests"):
        b.submit("k", "x")
    b.close()


def test_requests_are_answered_as_they_finish_and_a_later_failure_spares_them():
    """Request 0 is delivered while the batch still runs (its client does not wait for the batch), then the batch
    fails: request 0 keeps its result, and only the unanswered ones are retried alone."""
    released = threading.Event()
    calls = []

    def run(key, payloads, deliver):
        calls.append(list(payloads))
        if len(payloads) > 1:
            deliver(0, payloads[0] * 2)
            assert released.wait(60)
            raise RuntimeError("late failure")
        return [payloads[0] * 3]

    b = RequestBatcher(run, max_batch=3, wait_s=WAIT_LONG)
    futures = [b.submit_async("k", x) for x in ("a", "b", "c")]
    assert futures[0].result(timeout=60) == "aa"  # answered before the batch function returned
    assert not futures[1].done()
    released.set()
    assert [f.result(timeout=60) for f in futures] == ["aa", "bbb", "ccc"]
    assert calls == [["a", "b", "c"], ["b"], ["c"]] and b.stats.retried_alone == 2
    b.close()


def test_wait_zero_takes_only_what_is_pending_and_still_serves_everyone():
    b = RequestBatcher(run_tagged, max_batch=8, wait_s=0.0, workers=2)
    out = submit_all(b, [("k", i, 1) for i in range(12)])
    assert [o[1] for o in out] == list(range(12))
    assert b.stats.requests == 12
    b.close()


# ---- the real pipeline behind the batcher ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    vqvae, varsr = build(VARSRConfig.preset("tiny"))
    return VARSRPipeline(vqvae, varsr, device="cpu", config=load_inference_config(overrides=["tiling.batch_size=4"]))


def photos() -> list[Image.Image]:
    """Real photos of several sizes; the 40x24 one needs several latent tiles at scale 4."""
    src = Image.fromarray(skdata.astronaut())
    small = [src.rotate(23 * i).resize((16 + 2 * i, 16 - i), Image.BICUBIC) for i in range(6)]
    return small + [Image.fromarray(skdata.coffee()).resize((40, 24), Image.BICUBIC)]


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def pipeline_batcher(
    pipe, fixed: bool, max_batch: int, wait_s: float, generate_batch: int | None = None
) -> RequestBatcher:
    from inference.pipeline import UpscaleParams

    def run(key, reqs, deliver):
        return pipe.upscale_requests(
            reqs, UpscaleParams(*key), generate_batch=generate_batch, fixed_batch_shape=fixed, on_done=deliver
        )

    return RequestBatcher(run, max_batch=max_batch, wait_s=wait_s)


@pytest.mark.parametrize("generate_batch", [4, 1], ids=["generate_4_crops", "generate_1_crop"])
@pytest.mark.slow
def test_a_request_gives_byte_identical_images_alone_and_batched(pipe, generate_batch):
    """Requests of 1, 2 and 3 images (one of them tiled) with their own seeds and params: run one at a time, then
    all at once through the batcher (same-params requests share generate() calls), then in reverse order."""
    ims = photos()
    requests = [
        ([ims[0]], dict(seed=3)),
        ([ims[1], ims[2]], dict(seed=3)),
        ([ims[6]], dict(seed=3)),
        ([ims[3]], dict(seed=8)),
        ([ims[4], ims[5], ims[0]], dict(seed=3)),
        ([ims[2]], dict(seed=3, scale=2)),
        ([ims[1]], dict(seed=8, color_fix="wavelet")),
    ]
    params = [pipe.make_params(**kw) for _, kw in requests]
    jobs = [(dataclasses.astuple(p), imgs, len(imgs)) for (imgs, _), p in zip(requests, params)]

    alone_b = pipeline_batcher(pipe, fixed=True, max_batch=1, wait_s=0, generate_batch=generate_batch)
    alone = [[png(x) for x in alone_b.submit(*job)] for job in jobs]
    assert alone_b.stats.largest_batch_requests == 1

    n_images = sum(len(r[0]) for r in requests)
    for order in (list(range(len(jobs))), list(range(len(jobs)))[::-1]):
        b = pipeline_batcher(pipe, fixed=True, max_batch=n_images, wait_s=1.0, generate_batch=generate_batch)
        out = submit_all(b, [jobs[i] for i in order])
        together = [None] * len(jobs)
        for i, o in zip(order, out):
            assert not isinstance(o, Exception), o
            together[i] = [png(x) for x in o]
        assert b.stats.largest_batch_requests >= 3  # the four seed-3 requests at scale 4 met in batches
        for i, (got, ref) in enumerate(zip(together, alone)):
            assert len(got) == len(ref) and got == ref, f"request {i} changed when batched"
        b.close()
    # the sizes are the requests' own
    for (imgs, kw), res in zip(requests, alone):
        scale = kw.get("scale", 4)
        assert [Image.open(io.BytesIO(r)).size for r in res] == [
            (round(i.width * scale), round(i.height * scale)) for i in imgs
        ]


def test_upscale_requests_hands_each_request_over_once_all_its_images_are_ready(pipe):
    """With one crop per generate() call, request r is handed over right after its own crops (before later requests
    are generated), with the images the call returns for it."""
    ims = photos()
    p = pipe.make_params(seed=2)
    events = []
    orig = pipe._generate_latents

    def counting(crops, params, keys):
        events.append(("generate", len(crops)))
        return orig(crops, params, keys)

    pipe._generate_latents = counting
    try:
        out = pipe.upscale_requests(
            [[ims[0]], [ims[1], ims[2]], [ims[3]]],
            p,
            generate_batch=1,
            on_done=lambda r, imgs: events.append(("done", r, [png(x) for x in imgs])),
        )
    finally:
        del pipe._generate_latents
    reqs = [[ims[0]], [ims[1], ims[2]], [ims[3]]]
    expected = []
    for r, imgs in enumerate(reqs):
        expected += [("generate", 1)] * sum(len(pipe.plan(im, p).tiles) for im in imgs) + [("done", r)]
    assert len(expected) > 6  # some of these images take several tiles
    assert [e[:2] for e in events] == expected
    assert [e[2] for e in events if e[0] == "done"] == [[png(x) for x in o] for o in out]


def test_seeded_requests_batched_together_still_get_their_own_noise(pipe):
    """Two requests with the same seed but different images come back different, and a request batched with copies
    of itself gets the same image each time (nothing is shared between batch rows except the model)."""
    ims = photos()
    p = pipe.make_params(seed=5)
    out = pipe.upscale_requests([[ims[0]], [ims[1]], [ims[0]], [ims[0]]], p, fixed_batch_shape=True)
    assert png(out[0][0]) != png(out[1][0])
    assert png(out[0][0]) == png(out[2][0]) == png(out[3][0])


def test_the_request_thread_pool_is_widened_inside_the_servers_event_loop():
    """MLflow's server runs predict() with asyncio.to_thread; the model widens that pool from inside the running
    loop (where uvicorn loads it). 40 calls that can only finish together need 40 threads: more than the default
    pool has anywhere (min(32, cpus + 4))."""
    import asyncio

    from inference.mlflow_model import widen_request_threads

    assert widen_request_threads(40) is False  # no running loop here: nothing to widen
    n = 40
    together = threading.Barrier(n, timeout=30)

    async def main():
        assert widen_request_threads(n)
        return await asyncio.gather(*(asyncio.to_thread(together.wait) for _ in range(n)))

    assert sorted(asyncio.run(main())) == list(range(n))
