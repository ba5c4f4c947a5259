"""The pieces the stages share (issue 31): phase timing as a context manager, stage 0's config with its own
validate(), the shard-owned manifest reference, and the one distinct-sample picker."""

from __future__ import annotations

import pytest
import torch


class _Clock:
    """A perf_counter that moves only when told: timing checked without measuring real time."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_nested_phases_are_charged_once_and_syncs_wrap_each_timed_block(monkeypatch):
    from training import timing

    clock, syncs = _Clock(), []
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    timer = timing.StepTimer(lambda: syncs.append(clock.t))
    with timer("data", sync=False):
        clock.t += 1.0
    with timer("forward"):
        clock.t += 2.0
        with timer("tokenise"):  # inside forward: tokenise's 3 s are not forward's
            clock.t += 3.0
        clock.t += 0.5
    assert timer.seconds == {"data": 1.0, "tokenise": 3.0, "forward": 2.5, "backward": 0.0, "optimizer": 0.0}
    assert syncs == [1.0, 3.0, 6.0, 6.5]  # none around data; before and after forward and tokenise

    class Tok:
        def img_to_idxBl(self, x):
            clock.t += 4.0
            return x

        patch_nums = (1, 2)

    tok = timing.TimedTokenizer(Tok(), timer)
    assert tok.img_to_idxBl(7) == 7 and tok.patch_nums == (1, 2) and tok.seconds == 7.0
    with timing.Stopwatch() as sw:
        clock.t += 1.25
    assert sw.seconds == 1.25


def test_stage0_config_validates_itself_in_one_line_and_loading_does_not():
    from infra.core.config import ConfigError
    from training.config import VQVAETrainConfig, load_vqvae_config

    assert VQVAETrainConfig().validate() == VQVAETrainConfig()
    cfg = load_vqvae_config(None, ["lr=-1", "lowpass_factor=0", "train_parts=decoder"])  # loads: checked at start
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("invalid VQVAE config: ")
    assert "lr must be a finite number > 0" in msg and "lowpass_factor" in msg and "init_from" in msg
    from training import stage0_vqvae

    assert stage0_vqvae.VQVAETrainConfig is VQVAETrainConfig  # one class, in training/config.py


def test_the_manifest_reference_is_the_shard_owners_and_tracking_uses_it(tmp_path):
    from data_pipeline.shards import manifest_ref
    from training.tracking import manifest_source

    assert manifest_ref("s3://bucket/data/") == "s3://bucket/data/manifest.json"
    assert manifest_ref(str(tmp_path / "ds")) == str(tmp_path / "ds" / "manifest.json")
    for spec in ("s3://b/d/*.tar", "a-{0..3}.tar", "a.tar,b.tar", "one.tar", " "):
        assert manifest_ref(spec) is None, spec
        assert manifest_source(spec, str(tmp_path)) is None
    assert manifest_source(str(tmp_path / "ds"), str(tmp_path / "run")) == "../ds/manifest.json"
    assert manifest_source("s3://bucket/data", str(tmp_path)) == "s3://bucket/data/manifest.json"


def test_the_sample_picker_returns_distinct_crops_and_one_per_class_first(shards):
    from data_pipeline.shards import BatchStream, resolve_shards
    from training.validation import distinct_samples

    def stream():
        return BatchStream(
            resolve_shards(str(shards)),
            size=64,
            want_lr=True,
            batch_size=4,
            workers=0,
            seed=0,
            rank=0,
            world=1,
            shuffle_buffer=0,
        )

    checked = []
    picked = distinct_samples(stream(), 5, check=checked.append)
    assert len(picked) == 5 and checked
    hrs = [p["hr"] for p in picked]
    assert all(not torch.equal(a, b) for i, a in enumerate(hrs) for b in hrs[i + 1 :])  # shards repeat HR per LR
    assert all(p["lr"] is not None for p in picked)
    by_class = distinct_samples(stream(), 3, prefer_classes=True)
    classes = [p["class_id"] for p in by_class]
    assert len(by_class) == 3 and len(set(classes)) == len(classes)


def test_stage0_picks_its_device_like_the_trainer_refuses_a_missing_gpu():
    from infra.core.errors import UserError
    from training.run_start import choose_device

    assert choose_device("cpu") == torch.device("cpu")
    assert choose_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            choose_device("cuda")
