"""`varsr demo pretrain` pieces that run without the network: config loading, the MLflow parent run that adopts
every stage run as its child (and survives a restart of the recipe), and the commands it issues."""
from __future__ import annotations

from pathlib import Path

import pytest

from infra.core.config import ConfigError
from infra.demo.pretrain import (EXPERIMENT, Pretrain, cmd_corpus, cmd_train_stage, cmd_train_vqvae,
                                 load_pretrain_config)


def test_default_recipe_trains_on_photos_and_holds_out_lomiri_and_ukui():
    cfg = load_pretrain_config(None)
    train = {p.name for p in cfg.corpus.packages}
    held = {p.name for p in cfg.corpus.eval_packages}
    assert not train & held
    assert all(not n.startswith(("lomiri-", "ukui-")) for n in train)
    assert held and all(n.startswith(("lomiri-", "ukui-")) for n in held)
    assert cfg.preset == "small"
    over = load_pretrain_config(None, ["stage2.steps=7"])
    assert over.stage2.steps == 7
    with pytest.raises(ConfigError):
        load_pretrain_config(None, ["stage2.stepz=7"])


def test_parent_run_adopts_stage_runs_and_is_reused_on_resume(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    w = tmp_path / "pt"
    p = Pretrain(load_pretrain_config(None), str(w), log=lambda s: None)
    w.mkdir()
    parent = p.parent_run_id()
    mlflow.set_tracking_uri(p.tracking_uri)
    mlflow.set_experiment(EXPERIMENT)
    kids = []
    for name in ("pretrain-stage0-vqvae", "pretrain-stage1-c2i"):
        with mlflow.start_run(run_name=name) as r:
            mlflow.log_metric("loss", 1.0)
            kids.append(r.info.run_id)
    assert sorted(p.adopt_children()) == sorted(kids)
    client = MlflowClient(p.tracking_uri)
    assert all(client.get_run(k).data.tags["mlflow.parentRunId"] == parent for k in kids)
    assert client.get_run(parent).info.status == "RUNNING"
    # a restarted recipe (new process, same work folder) keeps the same parent run
    again = Pretrain(load_pretrain_config(None), str(w), log=lambda s: None)
    assert again.parent_run_id() == parent


def test_training_commands_resume_and_carry_overrides():
    from infra.cli import build_parser

    cmd = cmd_train_stage("isr", Path("c.yaml"), ["max_steps=3"])
    assert cmd[:2] == ["train", "isr"] and cmd[-2:] == ["--resume", "auto"]
    parser = build_parser()
    assert parser.parse_args(cmd).overrides == ["max_steps=3"]          # the real CLI reads the overrides
    vq = cmd_train_vqvae(Path("v.yaml"), ["lr=1"])
    assert vq[:2] == ["train", "vqvae"] and parser.parse_args(vq).overrides == ["lr=1"]
    assert vq[-2:] == ["--resume", "auto"] and parser.parse_args(vq).resume == "auto"
    # the corpus step as the model card prints it (it once printed `pretrain corpus`, which the CLI refuses)
    corpus = parser.parse_args(cmd_corpus(Path("w")))
    assert (corpus.step, corpus.only, corpus.workdir) == ("pretrain", "corpus", "w")


def test_the_recipe_stops_after_a_tokenizer_that_failed_its_colour_check(tmp_path):
    """Stage 0 stores its colour check in the export's config.json; the recipe refuses to spend stages 1-2 on a
    tokenizer whose verdict is ``lost`` unless told to (``require_colour=false``), and records the figures."""
    import json

    from infra.core.errors import UserError
    from training.stage0_vqvae import colour_verdict

    lost = {"images": 32, "chroma_gain": 0.02, "chroma_err": 0.17, "chroma_gain_tokens": 0.01,
            "chroma_err_tokens": 0.17, "min_chroma_gain": 0.5}
    assert colour_verdict(lost) == "lost"
    assert colour_verdict({**lost, "chroma_gain_tokens": 0.8}) == "kept"
    assert colour_verdict({**lost, "chroma_gain_tokens": float("nan")}) == "undetermined"
    final = tmp_path / "pt" / "runs" / "vqvae" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text(json.dumps({"lineage": {"mlflow_run_id": "r0"},
                                                   "colour_check": {**lost, "verdict": "lost"}}))
    issued = []

    def recipe(*overrides):
        p = Pretrain(load_pretrain_config(None, list(overrides)), str(tmp_path / "pt"), log=lambda s: None)
        p.train_step = lambda *cmd: issued.append(cmd)  # stage 0 itself is not rerun here
        return p

    with pytest.raises(UserError, match=r"failed its colour check: chroma gain 0\.01 < 0\.5 on 32 held-out crops"):
        recipe().step_vqvae()
    assert issued and issued[0][0] == "vqvae"
    info = recipe("require_colour=false").step_vqvae()
    assert info["colour"]["verdict"] == "lost" and info["mlflow_run_id"] == "r0"
    # a tokenizer exported before the check existed is not refused
    (final / "config.json").write_text(json.dumps({"lineage": {"mlflow_run_id": "r0"}}))
    assert recipe().step_vqvae()["colour"] is None
