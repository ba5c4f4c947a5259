"""The MLflow model end to end: a tiny model registered in a real SQLite registry, served by `varsr serve`
(`mlflow models serve`) on a free loopback port, and real HTTP requests — good and bad."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from skimage import data as skdata

from inference.config import load_inference_config
from inference.pipeline import VARSRPipeline
from inference.registry import register_model
from inference.serve import background_server
from infra.core.net import free_port
from infra.core.tracking import default_tracking_uri
from model import VARSRConfig, build, save_pretrained

# the fast loop leaves out every test that uses these (tests/conftest.py): a model registered in MLflow and served
# by `mlflow models serve`
HEAVY_FIXTURES = {"registry"}

NAME = "varsr-tiny"
LIMITS = [
    "limits.max_payload_bytes=200000",
    "limits.max_input_pixels=65536",
    "limits.max_output_pixels=262144",
    "limits.max_batch_images=4",
    "runtime.cpu_threads=1",
]
# batching: a wide window so that requests sent together reliably meet, generate() calls of exactly 4 crops from
# several requests (not the CPU default of 1), one log line per batch (the tests read it to know batches formed)
SERVING = [
    "serving.max_batch_images=8",
    "serving.batch_wait_ms=300",
    "serving.log_batches=true",
    "serving.generate_batch=4",
    "tiling.batch_size=4",
]


def photo_b64(w: int, h: int, mode: str = "RGB", fmt: str = "PNG") -> str:
    img = Image.fromarray(skdata.chelsea()).resize((w, h), Image.BICUBIC).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    torch.manual_seed(0)
    vqvae, varsr = build(VARSRConfig.preset("tiny"))
    ckpt = save_pretrained(root / "ckpt", vqvae, varsr)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mv = register_model(
        ckpt,
        NAME,
        alias="champion",
        tracking_uri=uri,
        tags={"lineage.run": "test-run"},
        config=load_inference_config(overrides=LIMITS + SERVING),
    )
    return {"root": root, "uri": uri, "version": mv, "ckpt": ckpt}


@pytest.fixture(scope="module")
def server(registry):
    root = registry["root"]
    with background_server(
        f"models:/{NAME}@champion",
        free_port(),
        tracking_uri=registry["uri"],
        log_path=root / "server.log",
        tmp_dir=root / "server-tmp",
        ready_timeout=120,
    ) as url:
        yield url


def invoke(url: str, payload=None, raw: str | None = None, timeout: float = 60):
    body = raw if raw is not None else json.dumps(payload)
    return requests.post(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}, timeout=timeout)


def split(*images: str) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[im] for im in images]}}


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_registry_has_the_version_alias_tags_signature_and_example(registry, monkeypatch):
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=registry["uri"], registry_uri=registry["uri"])
    mv = client.get_model_version_by_alias(NAME, "champion")
    assert mv.version == registry["version"].version and mv.tags["lineage.run"] == "test-run"
    assert client.get_run(mv.run_id).data.tags["lineage.run"] == "test-run"
    assert os.environ.get("MLFLOW_TRACKING_URI") != registry["uri"]  # register_model left the global state alone
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    info = Model.load(f"models:/{NAME}@champion")
    assert info.signature.inputs.input_names() == ["image"]
    assert {p.name: p.default for p in info.signature.params.params} == {
        "scale": 4.0,
        "cfg": 6.0,
        "seed": -1,
        "top_k": 1,
        "top_p": 0.75,
        "tile": -1,
        "color_fix": "adain",
    }
    assert info.saved_input_example_info is not None
    assert (registry["root"] / "mlartifacts").is_dir()  # artifacts beside the SQLite store
    assert default_tracking_uri() == registry["uri"]  # $MLFLOW_TRACKING_URI wins
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert default_tracking_uri() == f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def test_the_served_model_ships_only_the_code_it_runs(registry, tmp_path):
    """The logged model's code folder holds exactly the import closure of inference.mlflow_model: the pipeline, the
    model and the bottom layer, never the CLI, the demo, training or the data pipeline."""
    import mlflow

    from inference.mlflow_model import served_modules
    from infra.core.tracking import tracking_uri_scope

    with tracking_uri_scope(registry["uri"]):
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion", dst_path=str(tmp_path)))
    shipped = sorted(str(p.relative_to(local / "code")) for p in (local / "code").rglob("*.py"))
    expected = sorted(
        m.replace(".", "/") + ("/__init__.py" if (Path(m.replace(".", "/")) / "__init__.py").is_file() else ".py")
        for m in served_modules()
    )
    assert shipped == expected
    assert "inference/mlflow_model.py" in shipped and "model/varsr.py" in shipped
    assert not any(
        p.startswith(("training/", "data_pipeline/")) or p == "infra/cli.py" or p.startswith("infra/demo")
        for p in shipped
    )


def test_good_images_round_trip_with_the_expected_size(server):
    r = invoke(server, {**split(photo_b64(16, 12), photo_b64(10, 10, "L", "JPEG")), "params": {"seed": 0}})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [(p["width"], p["height"]) for p in preds] == [(64, 48), (40, 40)]
    for p in preds:
        img = decode(p["image"])
        assert img.format == "PNG" and img.size == (p["width"], p["height"]) and img.mode == "RGB"
    r = invoke(
        server,
        {
            "dataframe_records": [{"image": photo_b64(24, 20, "RGBA")}],
            "params": {"scale": 2, "seed": 1, "color_fix": "wavelet", "tile": 1},
        },
    )
    assert r.status_code == 200, r.text
    assert (r.json()["predictions"][0]["width"], r.json()["predictions"][0]["height"]) == (48, 40)


def test_served_result_equals_the_pipeline_loaded_from_the_registry(server, registry):
    b64 = photo_b64(16, 16)
    r = invoke(server, {**split(b64), "params": {"seed": 11}})
    assert r.status_code == 200, r.text
    served = np.asarray(decode(r.json()["predictions"][0]["image"]), np.int16)
    pipe = VARSRPipeline.from_pretrained(f"models:/{NAME}@champion", device="cpu", tracking_uri=registry["uri"])
    assert pipe.config.limits.max_batch_images == 4  # the limits logged with the model came along
    local = np.asarray(pipe.upscale(Image.open(io.BytesIO(base64.b64decode(b64))), seed=11), np.int16)
    assert np.abs(served - local).max() <= 2
    import mlflow

    from infra.core.tracking import tracking_uri_scope

    with tracking_uri_scope(registry["uri"]):
        model_dir = mlflow.artifacts.download_artifacts(
            f"models:/{NAME}@champion", dst_path=str(registry["root"] / "dl")
        )
    from_folder = VARSRPipeline.from_pretrained(model_dir, device="cpu")  # a downloaded MLflow model folder
    assert from_folder.config.limits.max_batch_images == 4
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert np.array_equal(np.asarray(from_folder.upscale(img, seed=11), np.int16), local)


def test_concurrent_requests_get_the_same_result_as_one_at_a_time(server):
    payload = {**split(photo_b64(16, 16)), "params": {"seed": 4}}
    first = invoke(server, payload)
    assert first.status_code == 200
    with ThreadPoolExecutor(max_workers=4) as ex:
        rs = list(ex.map(lambda _: invoke(server, payload), range(4)))
    assert all(r.status_code == 200 for r in rs)
    ref = first.json()["predictions"][0]["image"]
    assert all(r.json()["predictions"][0]["image"] == ref for r in rs)


def batches_logged(log_path: Path) -> list[int]:
    """Requests per batch, from the server's ``inference.batching`` log lines so far."""
    return [int(m.group(1)) for m in re.finditer(r"inference\.batching: batch: (\d+) requests", log_path.read_text())]


def send_together(url: str, payloads: list) -> list[requests.Response]:
    """POST every payload from its own thread, all released at once."""
    start = threading.Barrier(len(payloads))

    def one(payload):
        start.wait()
        return invoke(url, payload, timeout=120)

    with ThreadPoolExecutor(max_workers=len(payloads)) as ex:
        return list(ex.map(one, payloads))


def test_requests_sent_together_are_batched_and_byte_identical_to_one_at_a_time(server, registry):
    """Seven requests (same and different seeds, one with two images, one at another scale) one at a time, then all
    at once: the server batches the ones with equal params, and every PNG is byte for byte the one it sent alone."""
    ims = [photo_b64(12 + 2 * i, 16 - i) for i in range(5)]
    payloads = [
        {**split(ims[0]), "params": {"seed": 1}},
        {**split(ims[1]), "params": {"seed": 1}},
        {**split(ims[2], ims[3]), "params": {"seed": 1}},
        {**split(ims[4]), "params": {"seed": 1}},
        {**split(ims[0]), "params": {"seed": 2}},
        {**split(ims[1]), "params": {"seed": 1, "scale": 2}},
        {**split(ims[2]), "params": {"seed": 1}},
    ]
    alone = []
    for payload in payloads:
        r = invoke(server, payload)
        assert r.status_code == 200, r.text
        alone.append([p["image"] for p in r.json()["predictions"]])
    log_path = registry["root"] / "server.log"
    for _ in range(3):  # a loaded machine may spread one round over several batches; three rounds give it a chance
        seen = len(batches_logged(log_path))
        rs = send_together(server, payloads)
        assert all(r.status_code == 200 for r in rs), [r.text[:200] for r in rs if r.status_code != 200]
        for i, (r, ref) in enumerate(zip(rs, alone)):
            assert [p["image"] for p in r.json()["predictions"]] == ref, f"request {i} changed when batched"
        if max(batches_logged(log_path)[seen:], default=0) > 1:
            break
    assert max(batches_logged(log_path)[seen:]) > 1, "no batch of two or more requests formed"
    assert len(alone[2]) == 2 and decode(alone[5][0]).size == (2 * 12 + 4, 2 * 16 - 2)


def test_a_bad_request_in_a_burst_gets_its_400_and_the_others_their_own_images(server):
    good = [{**split(photo_b64(14, 14)), "params": {"seed": 3}}, {**split(photo_b64(10, 12)), "params": {"seed": 3}}]
    refs = [invoke(server, g).json()["predictions"][0]["image"] for g in good]
    bad = [split("@@not*base64@@"), {**split(photo_b64(8, 8)), "params": {"scale": 100}}, split(photo_b64(300, 300))]
    rs = send_together(server, [good[0], bad[0], good[1], bad[1], bad[2]])
    assert [r.status_code for r in rs] == [200, 400, 200, 400, 400], [r.text[:200] for r in rs]
    assert rs[0].json()["predictions"][0]["image"] == refs[0] and rs[2].json()["predictions"][0]["image"] == refs[1]
    for r, needle in zip((rs[1], rs[3], rs[4]), ("not valid base64", "scale must be in", "too large")):
        assert needle in r.json()["message"] and "Traceback" not in r.text


BAD_REQUESTS = [
    ("invalid base64", split("@@not*base64@@"), None, "not valid base64"),
    ("not an image", split(base64.b64encode(b"just some text").decode()), None, "not a recognised image"),
    ("too many pixels", split(photo_b64(300, 300)), None, "too large"),
    ("payload too large", split("A" * 250_000), None, "encoded image is too large"),
    ("output too large", {**split(photo_b64(200, 200)), "params": {"scale": 8}}, None, "output image is too large"),
    ("scale out of range", {**split(photo_b64(8, 8)), "params": {"scale": 100}}, None, "scale must be in"),
    ("wrong param type", {**split(photo_b64(8, 8)), "params": {"top_k": "many"}}, None, "top_k"),
    ("unsupported colour fix", {**split(photo_b64(8, 8)), "params": {"color_fix": "sepia"}}, None, "color_fix"),
    ("bad tile", {**split(photo_b64(8, 8)), "params": {"tile": 50}}, None, "tile overlap"),
    ("too many rows", split(*[photo_b64(8, 8)] * 5), None, "too many images"),
    ("missing column", {"dataframe_split": {"columns": ["picture"], "data": [["x"]]}}, None, "image"),
    ("wrong JSON shape", {"images": ["x"]}, None, "dataframe_split"),
    ("not JSON", None, "{this is not json", "JSON"),
    ("non-string image", {"dataframe_records": [{"image": 12345}]}, None, "image"),
]


@pytest.mark.parametrize("what,payload,raw,needle", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_4xx_with_a_reason(server, what, payload, raw, needle):
    r = invoke(server, payload, raw)
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
    body = r.json()
    assert needle.lower() in body["message"].lower(), body["message"][:500]
    assert "Traceback" not in r.text and "stack_trace" not in body


def test_server_still_answers_after_bad_requests(server):
    for payload, raw in [(None, "garbage"), (split("%%%"), None)]:
        assert invoke(server, payload, raw).status_code == 400
    assert requests.get(f"{server}/ping", timeout=5).status_code == 200
    r = invoke(server, {**split(photo_b64(8, 8)), "params": {"seed": 2}})
    assert r.status_code == 200 and r.json()["predictions"][0]["width"] == 32
