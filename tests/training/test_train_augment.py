"""Training-crop augmentation (training/augment.py): every crop gets one of the 6 channel orders x 8 flips/turns, the
same one for its HR and its LR (so the pair stays a valid SR pair), draws are fixed by (seed, step), and a stage-2
run with ``data.augment`` really trains on augmented crops, bypasses the token cache with one line saying why, and
resumes exactly."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from infra.core.config import ConfigError, load_config
from model.sampling import stream_generator
from training.augment import augment_crops
from training.config import TrainConfig
from training.trainer import train


def _candidates(img: torch.Tensor) -> list[torch.Tensor]:
    """All 48 images a crop can become: channel order x flip x quarter turns."""
    out = []
    for perm in itertools.permutations(range(3)):
        for flip in (False, True):
            for k in range(4):
                x = img[list(perm)]
                out.append(torch.rot90(x.flip(-1) if flip else x, k, dims=(-2, -1)))
    return out


def test_each_crop_gets_one_transform_applied_alike_to_its_hr_and_lr():
    torch.manual_seed(0)
    hr = torch.rand(64, 3, 16, 16)
    lr = F.avg_pool2d(hr, 4)  # the LR of each HR crop
    a_hr, a_lr = augment_crops([hr, lr], stream_generator(5, 11))
    assert a_hr.shape == hr.shape and a_lr.shape == lr.shape
    # still a valid pair: the augmented LR is the LR of the augmented HR
    assert torch.allclose(F.avg_pool2d(a_hr, 4), a_lr, atol=1e-6)
    perms = set()
    for b in range(64):
        hits = [i for i, c in enumerate(_candidates(hr[b])) if torch.equal(c, a_hr[b])]
        assert len(hits) == 1  # exactly one of the 48 transforms (random crops have no symmetry)
        perms.add(hits[0] // 8)
    assert len(perms) == 6  # all channel orders drawn over 64 crops
    again = augment_crops([hr, lr], stream_generator(5, 11))
    assert torch.equal(again[0], a_hr) and torch.equal(again[1], a_lr)  # fixed by (seed, step)
    assert not torch.equal(augment_crops([hr], stream_generator(5, 12))[0], a_hr)  # another step, other draws


def test_colour_p_zero_keeps_the_channel_order_and_non_square_crops_are_not_turned():
    torch.manual_seed(1)
    hr = torch.rand(32, 3, 8, 12)
    out = augment_crops([hr], stream_generator(0, 1), colour_p=0.0)[0]
    assert out.shape == hr.shape
    for b in range(32):
        assert torch.equal(out[b], hr[b]) or torch.equal(out[b], hr[b].flip(-1))
    with pytest.raises(ValueError, match="batch sizes differ"):
        augment_crops([hr, hr[:3]], stream_generator(0, 1))


def _cfg(tmp_path, name, shards, extra=()):
    return load_config(
        TrainConfig,
        None,
        [
            "stage=isr",
            f"output_dir={tmp_path / name}",
            f"data.shards={shards}",
            "data.batch_size=4",
            "data.workers=0",
            "total_steps=4",
            "optim.lr=2e-3",
            "tracking.enabled=false",
            "validation.num_images=1",
            "validation.batches=1",
            "seed=3",
            *extra,
        ],
    )


def test_stage2_with_augment_trains_on_augmented_crops_and_resumes_exactly(
    shards, tmp_path, dist_port, monkeypatch, capfd
):
    plain = train(_cfg(tmp_path, "plain", shards, ["max_steps=4"]))
    monkeypatch.setenv("MASTER_PORT", str(dist_port + 1))
    full = train(_cfg(tmp_path, "full", shards, ["max_steps=4", "data.augment=true"]))
    assert "data.augment=true: augmented HR crops have no cached tokens" in capfd.readouterr().err
    assert full.losses != pytest.approx(plain.losses, rel=1e-6)  # the crops really were changed
    monkeypatch.setenv("MASTER_PORT", str(dist_port + 2))
    first = train(_cfg(tmp_path, "split", shards, ["max_steps=2", "data.augment=true"]))
    monkeypatch.setenv("MASTER_PORT", str(dist_port + 3))
    rest = train(_cfg(tmp_path, "split", shards, ["max_steps=4", "data.augment=true"]), resume="auto")
    assert first.losses + rest.losses == pytest.approx(full.losses, rel=1e-6, abs=1e-7)
    monkeypatch.setenv("MASTER_PORT", str(dist_port + 4))
    with pytest.raises(Exception, match="another config|augment"):  # a resume without augmentation is refused
        train(_cfg(tmp_path, "split", shards, ["max_steps=5"]), resume="auto")
    with pytest.raises(ConfigError, match="augment_colour_p"):
        _cfg(tmp_path, "bad", shards, ["data.augment_colour_p=1.5"]).validate()
