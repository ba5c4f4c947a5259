"""A tiny ISR training on HR-only shards with on-the-fly degradation (data.degrade): it trains, rank 0 records the
drawn parameters as an MLflow artifact, and every recorded draw replays through the existing replay code to the LR
of that sample and epoch; the same shards without a preset are refused in one line. Validation reads the stored-LR
shards (a fixed held-out set)."""

from __future__ import annotations

import json
import math

import pytest

from data_pipeline.degrade import apply_degradation
from data_pipeline.degrade.online import DRAWS, OnlineDegradation
from data_pipeline.shards import decode_png, iter_tar, resolve_shards
from infra.core.config import load_config
from infra.core.errors import UserError
from training.config import TrainConfig

# the fast loop leaves out every test that uses these (tests/conftest.py): HR-only shards built by a Ray job
HEAVY_FIXTURES = {"hr_only"}


@pytest.fixture(scope="module")
def hr_only(tmp_path_factory):
    """64-px HR-only shards (shard.lr_variants=0) from the sample corpus via data_pipeline.build on a local Ray."""
    import ray

    import data_pipeline as dp
    from data_pipeline.sample_corpus import write_sample_corpus

    root = tmp_path_factory.mktemp("train_hr_only")
    write_sample_corpus(root / "corpus", with_bad_files=False)
    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False
        )
    try:
        cfg = dp.load_build_config(
            None,
            [
                "shard.crop_size=64",
                "shard.max_samples_per_shard=4",
                "select.cluster.k=4",
                f"score.weights_dir={root / 'no-iqa'}",
                "shard.lr_variants=0",
            ],
        )
        dp.build(str(root / "corpus"), str(root / "shards"), cfg, print_summary=False)
    finally:
        if started:
            ray.shutdown()
    return root / "shards"


def _cfg(tmp_path, hr_only, shards, *extra):
    return load_config(
        TrainConfig,
        None,
        [
            "stage=isr",
            f"output_dir={tmp_path / 'run'}",
            f"data.shards={hr_only}",
            f"data.val_shards={shards}",
            "data.batch_size=2",
            "data.workers=0",
            "max_steps=3",
            "checkpoint_every=0",
            "validation.num_images=1",
            "validation.batches=1",
            "optim.lr=2e-3",
            *extra,
        ],
    )


def test_online_training_records_replayable_draws(hr_only, shards, tmp_path, dist_port):
    from mlflow.tracking import MlflowClient

    from training.trainer import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = train(
        _cfg(
            tmp_path,
            hr_only,
            shards,
            "data.degrade=varsr-mild",
            "data.degrade_log_every=2",
            f"tracking.tracking_uri={uri}",
        )
    )
    assert r.steps == 3 and all(math.isfinite(x) for x in r.losses)
    local = tmp_path / "run" / DRAWS
    rows = [json.loads(x) for x in local.read_text().splitlines()]
    assert sorted({x["batch"] for x in rows}) == [1, 3] and len(rows) == 4  # every 2nd batch of 2 samples
    client = MlflowClient(uri)
    assert [a.path for a in client.list_artifacts(r.run_id, "degradations")] == [f"degradations/{DRAWS}"]
    logged = client.download_artifacts(r.run_id, f"degradations/{DRAWS}", str(tmp_path / "dl"))
    assert open(logged).read() == local.read_text()
    hr = {raw["__key__"]: decode_png(raw["hr.png"]) for u in resolve_shards(str(hr_only)).urls for raw in iter_tar(u)}
    online = OnlineDegradation.from_preset("varsr-mild")
    for x in rows:  # the replay gives the LR of that sample in that epoch, drawn again from (seed, epoch, key)
        want, params = online.draw(hr[x["key"]], 0, x["epoch"], x["key"])
        assert params == x["params"]
        assert (apply_degradation(hr[x["key"]], x["params"]) == want).all()


def test_hr_only_shards_without_a_preset_are_refused(hr_only, shards, tmp_path, dist_port):
    from training.trainer import train

    with pytest.raises(UserError, match="HR-only") as e:
        train(_cfg(tmp_path, hr_only, shards, "tracking.enabled=false"))
    assert "\n" not in str(e.value)


def test_validation_on_the_hr_only_training_shards_draws_the_presets_lr(hr_only, tmp_path, dist_port):
    """Without data.val_shards, validation reads the HR-only training shards: it degrades them with the run's preset
    (a fixed draw: validation seed, epoch 0) instead of refusing them for lack of a stored LR."""
    from training.trainer import train

    cfg = load_config(
        TrainConfig,
        None,
        [
            "stage=isr",
            f"output_dir={tmp_path / 'run'}",
            f"data.shards={hr_only}",
            "data.batch_size=2",
            "data.workers=0",
            "max_steps=2",
            "checkpoint_every=0",
            "validation.num_images=1",
            "validation.batches=1",
            "data.degrade=varsr-mild",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
    )
    r = train(cfg)
    assert r.steps == 2 and all(math.isfinite(x) for x in r.losses)
    from mlflow.tracking import MlflowClient

    metrics = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(r.run_id).data.metrics
    assert math.isfinite(metrics["val/loss"])  # the end-of-run validation ran on the degraded HR-only shards
