"""The model's own sampling defaults (issue 28, finding 5): a checkpoint's ``sampling.json`` (model/checkpoint.py) is
used by the pipeline, `varsr upscale`, the logged pyfunc model and a registered version whenever a call does not give
the param; a call's own params still win; a model without the file keeps the global defaults (the released d24's
cfg 6.0 + AdaIN). Real MLflow (a SQLite store), the tiny model with random weights, on CPU."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from inference.config import COLOR_FIXES, SamplingConfig, load_inference_config
from inference.images import decode_base64_image, encode_png_base64
from inference.pipeline import VARSRPipeline
from infra.core.errors import UserError
from model import VARSRConfig, build, save_pretrained
from model.checkpoint import SAMPLING, SAMPLING_COLOR_FIXES, SAMPLING_FIELDS

# the fast loop leaves out every test that uses these: models registered in MLflow (tests/conftest.py)
HEAVY_FIXTURES = {"plain"}

# far from the global defaults (cfg 6.0, adain), so that a call that ignores them gives another image
OWN = {"cfg": 0.0, "color_fix": "wavelet"}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    torch.manual_seed(0)
    vqvae, varsr = build(VARSRConfig.preset("tiny"))
    return save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny", vqvae, varsr)


@pytest.fixture(scope="module")
def tuned(plain, tmp_path_factory):
    """The same weights with their own sampling defaults."""
    from model import from_pretrained

    vqvae, varsr = from_pretrained(plain)
    return save_pretrained(tmp_path_factory.mktemp("ckpt") / "tuned", vqvae, varsr, sampling=OWN)


def _photo() -> Image.Image:
    return Image.fromarray(skdata.astronaut()).resize((16, 16), Image.BICUBIC)


def _arr(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def _pipe(ckpt) -> VARSRPipeline:
    return VARSRPipeline.from_pretrained(ckpt, device="cpu", dtype="float32")


def test_the_checkpoint_layer_knows_the_pipelines_sampling_fields():
    assert set(SAMPLING_FIELDS) == {f.name for f in dataclasses.fields(SamplingConfig)}
    assert tuple(SAMPLING_COLOR_FIXES) == tuple(COLOR_FIXES)


def test_pipeline_uses_the_models_defaults_unless_a_call_overrides_them(plain, tuned):
    own, glob = _pipe(tuned), _pipe(plain)
    assert (own.sampling.cfg, own.sampling.color_fix) == (0.0, "wavelet")
    assert (glob.sampling.cfg, glob.sampling.color_fix) == (6.0, "adain")  # no file: the released d24's
    img = _photo()
    implicit = _arr(own.upscale(img, seed=0))
    assert np.array_equal(implicit, _arr(own.upscale(img, seed=0, **OWN)))
    assert not np.array_equal(implicit, _arr(glob.upscale(img, seed=0)))
    # an explicit param wins over the model's default
    assert np.array_equal(_arr(own.upscale(img, seed=0, cfg=6.0, color_fix="adain")), _arr(glob.upscale(img, seed=0)))
    assert own.describe()["sampling_source"] == "model" and glob.describe()["sampling_source"] == "config"


def test_defaults_the_model_cannot_use_are_refused_at_load(plain, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(plain, bad)
    (bad / SAMPLING).write_text(json.dumps({"top_k": 10**6}))  # beyond the tiny model's vocabulary
    with pytest.raises(UserError, match=rf"{SAMPLING}.*top_k"):
        _pipe(bad)


def test_cli_upscale_uses_the_models_defaults_and_flags_override(plain, tuned, tmp_path, capsys):
    from infra.cli import main

    _photo().save(tmp_path / "in.png")

    def run(ckpt, name, *extra):
        assert (
            main(
                [
                    "upscale",
                    str(tmp_path / "in.png"),
                    "-o",
                    str(tmp_path / f"{name}.png"),
                    "--checkpoint",
                    str(ckpt),
                    "--seed",
                    "0",
                    "--dtype",
                    "float32",
                    "--device",
                    "cpu",
                    *extra,
                ]
            )
            == 0
        )
        return _arr(Image.open(tmp_path / f"{name}.png"))

    implicit = run(tuned, "implicit")
    assert np.array_equal(implicit, run(plain, "explicit", "--cfg", "0", "--color-fix", "wavelet"))
    assert not np.array_equal(implicit, run(plain, "global"))
    assert np.array_equal(run(tuned, "flags", "--cfg", "6", "--color-fix", "adain"), run(plain, "global2"))
    # --set sampling.* is as explicit as a flag
    assert np.array_equal(
        run(tuned, "set", "--set", "sampling.cfg=6", "--set", "sampling.color_fix=adain"), run(plain, "global3")
    )
    capsys.readouterr()


def _predict(model, params):
    df = pd.DataFrame({"image": [encode_png_base64(_photo())]})
    out = model.predict(df, params=params)
    return _arr(decode_base64_image(out["image"][0]))


def test_a_registered_version_carries_its_defaults_in_the_model_and_its_tags(plain, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from inference.registry import register_model

    monkeypatch.chdir(tmp_path)
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "VARSR_PARENT_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_inference_config()
    own = register_model(plain, "own", tracking_uri=uri, validate_example=False, config=cfg, sampling=OWN)
    glob = register_model(plain, "glob", tracking_uri=uri, validate_example=False, config=cfg)
    assert not (plain / SAMPLING).exists()  # set at registration: the source folder is left as it was
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    tags = client.get_model_version("own", own.version).tags
    assert tags["varsr.sampling.cfg"] == "0.0" and tags["varsr.sampling.color_fix"] == "wavelet"
    assert tags["varsr.sampling.top_k"] == "1" and tags["varsr.sampling.source"] == "model"
    gtags = client.get_model_version("glob", glob.version).tags
    assert gtags["varsr.sampling.cfg"] == "6.0" and gtags["varsr.sampling.source"] == "global"

    mlflow.set_tracking_uri(uri)
    try:
        m_own = mlflow.pyfunc.load_model("models:/own@champion")
        m_glob = mlflow.pyfunc.load_model("models:/glob@champion")
        params = m_own.metadata.get_params_schema().to_dict()
        assert {p["name"]: p["default"] for p in params}["cfg"] == 0.0  # what MLflow fills in for a bare request
        implicit = _predict(m_own, {"seed": 0})
        assert np.array_equal(implicit, _predict(m_own, {"seed": 0, **OWN}))
        assert np.array_equal(implicit, _predict(m_glob, {"seed": 0, **OWN}))
        assert not np.array_equal(implicit, _predict(m_glob, {"seed": 0}))
        # a request's own params win
        assert np.array_equal(
            _predict(m_own, {"seed": 0, "cfg": 6.0, "color_fix": "adain"}), _predict(m_glob, {"seed": 0})
        )
    finally:
        mlflow.set_tracking_uri(None)


def test_register_refuses_bad_defaults_by_name(plain, tmp_path, monkeypatch, capsys):
    from infra.cli import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for item, words in [("cfg=.nan", "cfg"), ("temperature=1", "temperature"), ("color_fix=sepia", "color_fix")]:
        rc = main(["register", str(plain), "--name", "bad", "--tracking-uri", uri, "--no-validate", "--sampling", item])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and words in err and len(err.splitlines()) == 1, err
