"""`varsr eval --suite`: one table per model from the real pipeline (inference/eval_suite.py, docs/EVALUATION.md).

* fidelity: the protocol's LR-resized-to-HR-size-then-scale-1 route gives exactly the pipeline's own x4 output with
  the same seed; the colour fix is applied as configured (against that resized LR); the bicubic row is PIL bicubic;
  the table's PSNR-Y of a row equals a plain numpy PSNR-Y over its saved images;
* the table: rows = methods, columns = <set>/<metric>, CSV and Markdown, per-image figures, a worst-images grid, all
  in an MLflow run nested under the registered model's training run;
* the same table from Ray tasks as from one process;
* bad input (an explicitly requested metric without weights, an unknown metric, no method) is one line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from inference.colorfix import color_fix
from inference.eval_sets import prepare_paired
from inference.eval_suite import Method, SuiteConfig, SuiteSetConfig, lr_to_hr_size, run_suite, super_resolve
from inference.images import pil_to_tensor, tensor_to_pil_trunc
from inference.pipeline import VARSRPipeline
from infra.cli import main
from model import VARSRConfig, build, save_pretrained


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    vqvae, varsr = build(VARSRConfig.preset("tiny"))
    return save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny", vqvae, varsr)


@pytest.fixture(scope="module")
def test_set(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pairs")
    (d / "HR").mkdir()
    (d / "LR").mkdir()
    for name, arr in {
        "coffee": skdata.coffee(),
        "chelsea": skdata.chelsea(),
        "moto": skdata.stereo_motorcycle()[0],
    }.items():
        hr = Image.fromarray(arr).resize((160, 128), Image.BICUBIC)
        hr.save(d / "HR" / f"{name}.png")
        hr.resize((40, 32), Image.BICUBIC).save(d / "LR" / f"{name}.png")
    prepare_paired(d / "HR", d / "LR", d / "set", scale=4, lr_size=28, name="mini")
    return d / "set"


def _y(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64) / 255
    return 16 / 255 + (65.481 * a[..., 0] + 128.553 * a[..., 1] + 24.966 * a[..., 2]) / 255


def test_protocol_resize_before_inference_and_colour_fix(ckpt):
    pipe = VARSRPipeline.from_pretrained(ckpt, device="cpu")
    hr = Image.fromarray(skdata.astronaut()).resize((96, 64), Image.BICUBIC)
    lr = hr.resize((24, 16), Image.BICUBIC)
    ours = super_resolve(pipe, lr, hr, seed=3, color_fix="adain")
    direct = pipe.upscale(lr, scale=4, seed=3, color_fix="adain")
    assert ours.size == hr.size and np.array_equal(np.asarray(ours), np.asarray(direct))
    raw = super_resolve(pipe, lr, hr, seed=3, color_fix="none")
    ref = lr_to_hr_size(lr, hr)
    assert np.array_equal(np.asarray(ref), np.asarray(lr.resize(hr.size, Image.Resampling.BICUBIC)))
    # the colour fix: the unfixed SR given the colour statistics of the LR resized to the HR size (not of the LR)
    fixed = tensor_to_pil_trunc(color_fix(pil_to_tensor(raw)[None], pil_to_tensor(ref)[None], "adain")[0])
    assert np.array_equal(np.asarray(fixed), np.asarray(ours))
    assert not np.array_equal(np.asarray(raw), np.asarray(ours))


def _cfg(test_set: Path, **kw) -> SuiteConfig:
    return SuiteConfig(
        name="mini",
        sets=[SuiteSetConfig("mini", str(test_set))],
        metrics=["psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb", "niqe", "brisque", "lpips"],
        worst=2,
        figure_side=64,
        **kw,
    )


@pytest.mark.slow
def test_suite_table_figures_and_nested_mlflow_run(ckpt, test_set, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from inference.registry import register_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mv = register_model(ckpt, "tiny-eval", alias="champion", tracking_uri=uri, validate_example=False)
    suite = tmp_path / "mini.yaml"
    suite.write_text(
        json.dumps(
            {
                "name": "mini",
                "sets": [{"name": "mini", "path": str(test_set)}],
                "metrics": ["psnr_y", "ssim_y", "niqe", "brisque", "lpips", "musiq"],
                "worst": 2,
                "figure_side": 64,
            }
        )
    )
    out = tmp_path / "out"
    rc = main(
        [
            "eval",
            "--suite",
            str(suite),
            "--model-uri",
            "models:/tiny-eval@champion",
            "--checkpoint",
            str(ckpt),
            "--baseline",
            "bicubic",
            "--tracking-uri",
            uri,
            "-o",
            str(out),
            "--seed",
            "0",
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert cap.err.count("notice: skipped") == 2 and "lpips: " in cap.err and "musiq: " in cap.err
    rows = list(csv.reader(open(out / "table.csv")))
    assert rows[0] == ["method", "mini/psnr_y", "mini/ssim_y", "mini/niqe", "mini/brisque"]
    assert [r[0] for r in rows[1:]] == ["tiny-eval@champion", "tiny", "bicubic"]
    md = (out / "table.md").read_text()
    assert "| method | mini/psnr_y ↑ | mini/ssim_y ↑ | mini/niqe ↓ | mini/brisque ↓ |" in md
    # the same model by URI and by folder, same seed: the same numbers
    assert rows[1][1:] == rows[2][1:]
    # bicubic's PSNR-Y recomputed with plain numpy from the files
    es_hr = sorted((test_set / "HR").glob("*.png"))
    psnrs = []
    for hp in es_hr:
        hr = np.asarray(Image.open(hp).convert("RGB"))
        sr = np.asarray(Image.open(out / "sr" / "bicubic" / "mini" / hp.name).convert("RGB"))
        psnrs.append(10 * np.log10(1 / np.mean((_y(hr) - _y(sr)) ** 2)))
    assert float(rows[3][1]) == pytest.approx(np.mean(psnrs), abs=1e-4)
    assert len(list((out / "figures" / "mini").glob("*.png"))) == 3
    worst = Image.open(out / "worst.png")
    fig = Image.open(out / "figures" / "mini" / "coffee.png")
    assert worst.height == 2 * fig.height and fig.width == 5 * 64  # LR | 3 methods | HR, two worst pairs
    per_image = list(csv.DictReader(open(out / "per_image.csv")))
    assert len(per_image) == 9 and {r["method"] for r in per_image} == {"tiny-eval@champion", "tiny", "bicubic"}

    client = MlflowClient(tracking_uri=uri)
    run_id = cap.out.strip().split("MLflow run ")[-1]
    run = client.get_run(run_id)
    assert run.data.tags["mlflow.parentRunId"] == mv.run_id
    assert run.data.metrics["bicubic/mini/psnr_y"] == pytest.approx(float(rows[3][1]), abs=1e-4)
    assert run.data.metrics["tiny-eval_champion/mini/niqe"] == pytest.approx(float(rows[1][3]), abs=1e-4)
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert {"table.csv", "table.md", "per_image.csv", "summary.json", "worst.png", "figures"} <= arts
    assert len(run.inputs.dataset_inputs) == 1


def test_suite_on_ray_gives_the_same_table(ckpt, test_set, tmp_path, ray_local):
    methods = [Method("tiny", str(ckpt), upscale_kwargs={"color_fix": "wavelet"}), Method("bicubic")]
    one = run_suite(_cfg(test_set), methods, tmp_path / "one", log_to_mlflow=False)
    many = run_suite(_cfg(test_set, workers=2, ray_min_pairs=1), methods, tmp_path / "many", log_to_mlflow=False)
    assert one.table == many.table and set(one.metrics) == {
        "psnr_y",
        "ssim_y",
        "psnr_rgb",
        "ssim_rgb",
        "niqe",
        "brisque",
    }
    assert (tmp_path / "one" / "table.csv").read_text() == (tmp_path / "many" / "table.csv").read_text()


def test_suite_bad_input_is_one_line(ckpt, test_set, tmp_path, capsys):
    base = ["eval", "--suite", "bundled", "--checkpoint", str(ckpt), "--no-mlflow", "-o", str(tmp_path / "o")]
    assert main([*base, "--metrics", "psnr_y,lpips", "--weights-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lpips: " in err
    assert main([*base, "--metrics", "psnr_y,bogus"]) == 2
    assert "unknown metric(s) bogus" in capsys.readouterr().err
    assert main(["eval", "--suite", "nope", "--checkpoint", str(ckpt), "--no-mlflow"]) == 2
    assert main(["eval", "--hr", str(tmp_path), "--lr", str(tmp_path)]) == 2
    assert "give one of --checkpoint" in capsys.readouterr().err
    with pytest.raises(Exception, match="nothing to evaluate"):
        run_suite(_cfg(test_set), [], tmp_path / "x", log_to_mlflow=False)


def test_suite_images_too_small_for_a_metric_are_one_line(ckpt, tmp_path):
    d = tmp_path / "small"
    (d / "HR").mkdir(parents=True)
    (d / "LR").mkdir()
    hr = Image.fromarray(skdata.coffee()).resize((64, 64), Image.BICUBIC)
    hr.save(d / "HR" / "a.png")
    hr.resize((16, 16), Image.BICUBIC).save(d / "LR" / "a.png")
    prepare_paired(d / "HR", d / "LR", d / "set", scale=4, lr_size=16)
    cfg = SuiteConfig(name="s", sets=[SuiteSetConfig("s", str(d / "set"))], metrics=["psnr_y", "niqe"])
    with pytest.raises(Exception, match=r"^s/a \(bicubic\): NIQE needs an image of at least 96x96"):
        run_suite(cfg, [Method("bicubic")], tmp_path / "o", log_to_mlflow=False)
