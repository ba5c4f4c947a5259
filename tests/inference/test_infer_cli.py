"""`varsr upscale` and `varsr eval` on real files (tiny model checkpoint, local SQLite MLflow store)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from infra.cli import main
from model import VARSRConfig, build, save_pretrained


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    vqvae, varsr = build(VARSRConfig.preset("tiny"))
    return save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny", vqvae, varsr)


def test_upscale_files_and_folders_skips_and_reports_unreadable(ckpt, tmp_path, capsys):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(skdata.camera()).resize((16, 12)).save(src / "grey.png")
    rgba = Image.fromarray(skdata.coffee()).resize((10, 10)).convert("RGBA")
    rgba.save(src / "sub" / "alpha.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (src / "notes.txt").write_text("not an image, not picked up")
    single = tmp_path / "one.jpg"
    Image.fromarray(skdata.chelsea()).resize((8, 8)).save(single)
    out = tmp_path / "out"
    rc = main(
        ["upscale", str(src), str(single), "-o", str(out), "--checkpoint", str(ckpt), "--seed", "0", "--scale", "2"]
    )
    captured = capsys.readouterr()
    assert rc == 1  # some images were skipped
    assert Image.open(out / "grey.png").size == (32, 24)
    assert Image.open(out / "sub" / "alpha.png").size == (20, 20)
    assert Image.open(out / "one.png").size == (16, 16)
    assert "broken.jpg" in captured.err and "skipped 1" in captured.out and "upscaled 3" in captured.out
    assert not (out / "notes.png").exists()


def test_upscale_rejects_bad_options_with_one_line(ckpt, tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    assert main(["upscale", str(img), "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt), "--scale", "99"]) == 2
    assert "scale must be in" in capsys.readouterr().err
    assert main(["upscale", str(img), "-o", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "nope")]) == 2


def _y(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64) / 255
    return 16 / 255 + (65.481 * a[..., 0] + 128.553 * a[..., 1] + 24.966 * a[..., 2]) / 255


def test_eval_reproduces_independent_psnr_ssim_and_logs_to_mlflow(ckpt, tmp_path, capsys):
    hr_dir, lr_dir = tmp_path / "HR", tmp_path / "LR"
    hr_dir.mkdir()
    lr_dir.mkdir()
    for name, arr in {"astronaut": skdata.astronaut(), "coffee": skdata.coffee(), "chelsea": skdata.chelsea()}.items():
        hr = Image.fromarray(arr).resize((64, 48), Image.BICUBIC)
        hr.save(hr_dir / f"{name}.png")
        hr.resize((16, 12), Image.BICUBIC).save(lr_dir / f"{name}.png")
    out, uri = tmp_path / "eval", f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(
        [
            "eval",
            "--hr",
            str(hr_dir),
            "--lr",
            str(lr_dir),
            "--checkpoint",
            str(ckpt),
            "--baseline",
            "bicubic",
            "-o",
            str(out),
            "--seed",
            "0",
            "--tracking-uri",
            uri,
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0 and "varsr" in printed and "bicubic" in printed and "psnr_y" in printed
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 6
    kw = dict(data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    for row in rows:
        hr = np.asarray(Image.open(hr_dir / f"{row['image']}.png").convert("RGB"))
        if row["method"] == "varsr":
            img = np.asarray(Image.open(out / "sr" / f"{row['image']}.png").convert("RGB"))
        else:
            img = np.asarray(Image.open(lr_dir / f"{row['image']}.png").convert("RGB").resize((64, 48), Image.BICUBIC))
        assert float(row["psnr_y"]) == pytest.approx(peak_signal_noise_ratio(_y(hr), _y(img), data_range=1.0), abs=1e-6)
        assert float(row["ssim_y"]) == pytest.approx(structural_similarity(_y(hr), _y(img), **kw), abs=1e-6)
        assert float(row["psnr_rgb"]) == pytest.approx(peak_signal_noise_ratio(hr, img, data_range=255), abs=1e-6)
        assert float(row["ssim_rgb"]) == pytest.approx(
            structural_similarity(hr / 255.0, img / 255.0, channel_axis=2, **kw), abs=1e-6
        )
    summary = json.loads((out / "summary.json").read_text())["summary"]
    mean_bic = np.mean([float(r["psnr_y"]) for r in rows if r["method"] == "bicubic"])
    assert summary["bicubic"]["psnr_y"] == pytest.approx(mean_bic, abs=1e-9)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("varsr")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.metrics["varsr/psnr_y"] == pytest.approx(summary["varsr"]["psnr_y"], abs=1e-6)
    assert run.data.metrics["bicubic/ssim_y"] == pytest.approx(summary["bicubic"]["ssim_y"], abs=1e-6)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.csv", "summary.json", "crops"} <= names
    assert len(client.list_artifacts(run.info.run_id, "crops")) == 3


@pytest.mark.slow
def test_register_command_logs_registers_and_sets_the_alias(ckpt, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(
        [
            "register",
            str(ckpt),
            "--name",
            "cli-model",
            "--alias",
            "staging-candidate",
            "--tracking-uri",
            uri,
            "--tag",
            "source=test",
            "--set",
            "limits.max_scale=4",
            "--no-validate",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["uri"] == "models:/cli-model@staging-candidate" and out["version"] == 1

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version_by_alias("cli-model", "staging-candidate")
    assert int(mv.version) == 1 and mv.tags["source"] == "test"
    assert main(["register", str(tmp_path / "missing"), "--name", "x", "--tracking-uri", uri]) == 2
    assert "not a native VARSR checkpoint" in capsys.readouterr().err


def test_eval_on_paired_shards(ckpt, tmp_path, capsys):
    import io
    import tarfile

    def png(img: Image.Image) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    shard = tmp_path / "eval-000000.tar"
    with tarfile.open(shard, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for key, arr in (("s0", skdata.astronaut()), ("s1", skdata.coffee())):
            hr = Image.fromarray(arr).resize((64, 64), Image.BICUBIC)
            add(f"{key}.hr.png", png(hr))
            add(f"{key}.lr.png", png(hr.resize((16, 16), Image.BICUBIC)))
            add(f"{key}.json", b"{}")
        add("s2.hr.png", png(Image.new("RGB", (64, 64))))
        add("s2.lr.png", b"\x89PNG truncated")  # unreadable: reported, the rest goes on
        add("s3.hr.png", png(Image.new("RGB", (64, 64))))  # no LR: not a pair
    out = tmp_path / "eval"
    rc = main(["eval", "--shards", str(shard), "--checkpoint", str(ckpt), "-o", str(out), "--seed", "0", "--no-mlflow"])
    captured = capsys.readouterr()
    assert rc == 0 and "s2" in captured.err
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert sorted(r["image"] for r in rows) == ["s0", "s1"]
    for r in rows:
        sr = np.asarray(Image.open(out / "sr" / f"{r['image']}.png").convert("RGB"))
        assert sr.shape == (64, 64, 3)
    assert json.loads((out / "summary.json").read_text())["failed"][0].startswith("s2")
