"""`varsr eval-prepare`: test sets with manifests (inference/eval_sets.py, docs/EVALUATION.md).

* paired: the HR crop covers exactly the LR crop's area (checked on a pair whose LR is the HR's 4x4 box mean), every
  file's sha256 is in the manifest and checked on reading; a missing LR or a size mismatch is one line;
* synthetic: the data pipeline's real presets make the LR, the same seed makes the same set, and every LR is remade
  bit-exactly from its HR and the recorded parameters (`eval-prepare verify`);
* bundled: the small real set comes from package photos that no training recipe names.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from inference.eval_sets import BUNDLED, load_set, prepare_bundled, prepare_paired, replay_check
from infra.cli import degrade_preset, main, replay_degradation
from infra.core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def _pairs(tmp_path: Path, sizes: dict[str, tuple[int, int]]) -> tuple[Path, Path]:
    hr_dir, lr_dir = tmp_path / "HR", tmp_path / "LR"
    hr_dir.mkdir()
    lr_dir.mkdir()
    src = skdata.astronaut()
    for name, (w, h) in sizes.items():
        hr = Image.fromarray(src).resize((w, h), Image.BICUBIC)
        hr.save(hr_dir / f"{name}.png")
        hr.reduce(4).save(lr_dir / f"{name}.png")  # 4x4 box means: an LR pixel = the mean of its HR block
    return hr_dir, lr_dir


def test_paired_centre_crops_align_and_are_hashed(tmp_path):
    hr_dir, lr_dir = _pairs(tmp_path, {"a": (200, 160), "b": (176, 256)})
    es = prepare_paired(hr_dir, lr_dir, tmp_path / "set", scale=4, lr_size=32)
    assert [p.name for p in es.pairs] == ["a", "b"] and es.manifest["protocol"]["hr_size"] == 128
    for p in es.pairs:
        hr, lr = p.load()
        assert hr.size == (128, 128) and lr.size == (32, 32)
        assert np.array_equal(np.asarray(hr.reduce(4)), np.asarray(lr))  # same area of the scene
    box = es.manifest["pairs"][0]["source"]["lr_box"]
    assert box == [(50 - 32) // 2, (40 - 32) // 2, (50 - 32) // 2 + 32, (40 - 32) // 2 + 32]
    Image.new("RGB", (128, 128)).save(tmp_path / "set" / "HR" / "a.png")  # a file changed behind the manifest
    with pytest.raises(UserError, match="HR/a.png differs from the manifest"):
        load_set(tmp_path / "set")
    with pytest.raises(UserError, match="already holds a test set"):
        prepare_paired(hr_dir, lr_dir, tmp_path / "set", scale=4, lr_size=32)


def test_paired_bad_input_is_one_line(tmp_path):
    hr_dir, lr_dir = _pairs(tmp_path, {"a": (200, 160), "b": (176, 256)})
    (lr_dir / "b.png").unlink()
    with pytest.raises(UserError, match="no LR in .* for HR b.png"):
        prepare_paired(hr_dir, lr_dir, tmp_path / "s1")
    Image.new("RGB", (40, 64)).save(lr_dir / "b.png")
    with pytest.raises(UserError, match="b.png: HR 176x256 is not 4 x its LR 40x64"):
        prepare_paired(hr_dir, lr_dir, tmp_path / "s2", lr_size=32)
    with pytest.raises(UserError, match="smaller than the 128-px crop"):
        prepare_paired(hr_dir, lr_dir, tmp_path / "s3", lr_size=128)
    assert not any((tmp_path / s).exists() for s in ("s1", "s2", "s3"))  # nothing written for bad input
    assert main(["eval-prepare", "paired", "--hr", str(hr_dir), "-o", str(tmp_path / "s4")]) == 2


@pytest.mark.parametrize("preset", ["varsr-mild", "realesrgan-x4plus"])
def test_synthetic_set_is_seeded_recorded_and_replayable(tmp_path, preset, capsys):
    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    Image.fromarray(skdata.coffee()).save(hr_dir / "coffee.png")
    Image.fromarray(skdata.chelsea()).save(hr_dir / "chelsea.png")
    args = [
        "eval-prepare",
        "synthetic",
        "--hr",
        str(hr_dir),
        "--n",
        "3",
        "--preset",
        preset,
        "--hr-size",
        "96",
        "--seed",
        "7",
    ]
    assert main([*args, "-o", str(tmp_path / "s1")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["pairs"] == 3 and printed["protocol"]["preset"] == preset
    assert main([*args, "-o", str(tmp_path / "s2")]) == 0
    a, b = load_set(tmp_path / "s1"), load_set(tmp_path / "s2")
    assert [p.meta["lr_sha256"] for p in a.pairs] == [p.meta["lr_sha256"] for p in b.pairs]
    assert [p.meta["source"]["hr"] for p in a.pairs] == ["chelsea.png", "chelsea.png", "coffee.png"]
    for p in a.pairs:
        hr, lr = p.load()
        assert hr.size == (96, 96) and lr.size == (24, 24) and p.meta["degradation"]["seed"] == p.meta["seed"]
        assert not np.array_equal(np.asarray(lr), np.asarray(hr.resize((24, 24), Image.BICUBIC)))
    assert replay_check(a, replay_degradation) == 3
    assert main(["eval-prepare", "verify", "-o", str(tmp_path / "s1")]) == 0
    capsys.readouterr()
    lr0 = tmp_path / "s1" / a.pairs[0].lr.relative_to(a.root)
    # an LR re-saved from other parameters no longer replays (and its hash no longer matches)
    other, _ = degrade_preset(np.asarray(a.pairs[0].load()[0]), preset, 12345)
    Image.fromarray(other).save(lr0)
    assert main(["eval-prepare", "verify", "-o", str(tmp_path / "s1")]) == 2
    assert "differs from the manifest" in capsys.readouterr().err


def test_bundled_set_uses_photos_no_recipe_trains_on(tmp_path):
    es = prepare_bundled(tmp_path / "bundled", hr_size=128)
    assert len(es.pairs) == sum(len(b) for _, b in BUNDLED) == 5
    assert all(p.load()[0].size == (128, 128) and p.load()[1].size == (32, 32) for p in es.pairs)
    training = "".join(p.read_text() for p in (ROOT / "configs").rglob("*.yaml") if "eval" not in p.parts)
    training += (ROOT / "data_pipeline" / "sample_corpus.py").read_text()
    for fname, _ in BUNDLED:
        stem = Path(fname).stem
        assert fname not in training and f"{stem}()" not in training, fname
    assert "stereo_motorcycle" not in (ROOT / "data_pipeline" / "sample_corpus.py").read_text()
    again = prepare_bundled(tmp_path / "again", hr_size=128)
    assert [p.meta["hr_sha256"] for p in again.pairs] == [p.meta["hr_sha256"] for p in es.pairs]
