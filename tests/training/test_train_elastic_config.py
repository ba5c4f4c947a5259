"""``ray.num_workers`` as a number or an elastic ``[min, max]`` range (docs/ELASTIC.md, "Elastic Ray Train"): the
range is parsed from YAML and ``--set``, a range Ray Train cannot honour is refused in one line, and the
``ScalingConfig`` handed to Ray's ``TorchTrainer`` is the installed Ray's own (v2: elastic for a range, fixed for a
number). No Ray cluster is started: ``ScalingConfig`` is a plain dataclass."""

from __future__ import annotations

import pytest

from infra.core.errors import UserError
from training.config import RaySection, load_train_config
from training.launch import scaling_config

RECIPE = "configs/train/stage1_c2i_tiny.yaml"


def _cfg(*overrides: str):
    return load_train_config(RECIPE, list(overrides))


def test_a_number_stays_a_fixed_worker_group():
    r = _cfg("ray.num_workers=3").ray
    assert not r.elastic and r.workers_range == (3, 3)
    sc = scaling_config(r)
    assert sc.num_workers == 3 and not sc.elasticity_enabled
    assert sc.resources_per_worker == {"CPU": 1.0} and not sc.use_gpu


def test_a_range_from_set_or_yaml_becomes_an_elastic_scaling_config(tmp_path):
    r = _cfg("ray.num_workers=[2, 8]", "ray.resize_check_s=15").ray
    assert r.elastic and r.workers_range == (2, 8)
    sc = scaling_config(r)
    assert sc.elasticity_enabled and sc.num_workers == (2, 8)
    assert (sc.min_workers, sc.max_workers) == (2, 8)
    assert sc.elastic_resize_monitor_interval_s == 15.0
    # YAML block style, as in a recipe, with GPU workers
    y = tmp_path / "elastic.yaml"
    y.write_text(
        "ray: {num_workers: [1, 4], use_gpu: true, gpus_per_worker: 1, cpus_per_worker: 8}\n"
        "zero_stage: 2\nprecision: bf16\n"
    )
    cfg = load_train_config(y)
    sc = scaling_config(cfg.ray)
    assert sc.num_workers == (1, 4) and sc.use_gpu
    assert sc.resources_per_worker == {"CPU": 8.0, "GPU": 1.0}
    assert sc.elastic_resize_monitor_interval_s == 60.0  # Ray's own default unless set


def test_an_equal_range_is_still_elastic():
    sc = scaling_config(_cfg("ray.num_workers=[2,2]").ray)
    assert sc.elasticity_enabled and (sc.min_workers, sc.max_workers) == (2, 2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ray.num_workers=[3,1]"], "ray.num_workers range [3, 1]: min 3 is above max 1"),
        (["ray.num_workers=[0,2]"], "ray.num_workers range [0, 2]: min must be >= 1"),
        (["ray.num_workers=[1,2,3]"], "a [min, max] range of two integers, got [1, 2, 3]"),
        (["ray.num_workers=[4]"], "a [min, max] range of two integers, got [4]"),
        (["ray.num_workers=0"], "ray.num_workers must be >= 1, got 0"),
        (["ray.resize_check_s=-1"], "ray.resize_check_s must be a finite number >= 0"),
        (["ray.num_workers=[1,2]", "zero_stage=3"], "ray.num_workers range needs zero_stage 0-2"),
        (["ray.num_workers=[1,2]", "precision=bf16"], "with zero_stage 0 needs precision fp32"),
    ],
)
def test_a_range_ray_cannot_honour_is_refused_in_one_line(overrides, message):
    with pytest.raises(UserError) as e:
        _cfg(*overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_scaling_config_refuses_an_unvalidated_bad_range_too():
    # a RaySection built without TrainConfig.validate (e.g. in code) is checked again where Ray is called
    with pytest.raises(UserError, match=r"min 5 is above max 2"):
        scaling_config(RaySection(num_workers=[5, 2]))


def test_a_range_with_ray_train_v1_selected_is_refused(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "0")
    with pytest.raises(UserError) as e:
        scaling_config(_cfg("ray.num_workers=[1,2]").ray)
    assert "needs Ray Train v2" in str(e.value) and "RAY_TRAIN_V2_ENABLED=0" in str(e.value)
    assert "\n" not in str(e.value)
    # a number is still fine under v1 (nothing elastic asked for)
    assert scaling_config(_cfg("ray.num_workers=2").ray).num_workers == 2


def test_the_range_survives_the_resolved_config_the_workers_read(tmp_path):
    from infra.core.config import load_config, save_config, to_dict
    from training.config import TrainConfig

    cfg = _cfg("ray.num_workers=[1,2]")
    back = load_config(TrainConfig, save_config(cfg, tmp_path / "config.yaml")).validate()
    assert back.ray.num_workers == [1, 2] and back.ray.elastic
    assert load_config(TrainConfig, base=to_dict(cfg)).ray.workers_range == (1, 2)  # what _ray_worker loads
