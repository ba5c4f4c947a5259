"""`varsr demo pretrain` pieces that run without the network: config loading, the MLflow parent run that adopts
every stage run as its child (and survives a restart of the recipe), and the commands it issues."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.core.config import ConfigError
from infra.demo.pretrain import EXPERIMENT, Pretrain, cmd_corpus, cmd_train_stage, cmd_train_vqvae, load_pretrain_config


def test_default_recipe_trains_on_photos_and_holds_out_lomiri_and_ukui():
    cfg = load_pretrain_config(None)
    train = {p.name for p in cfg.corpus.packages}
    held = {p.name for p in cfg.corpus.eval_packages}
    assert not train & held
    assert all(not n.startswith(("lomiri-", "ukui-")) for n in train)
    assert held and all(n.startswith(("lomiri-", "ukui-")) for n in held)
    # the recipe's pieces agree: its shards are of its preset's tile size, cut from corpus tiles at least that big,
    # and the shipped base it makes is of that preset
    import yaml

    from infra.demo.pretrain import ROOT, _repo_path
    from model.checkpoint import read_config
    from model.config import VARSRConfig

    crop = yaml.safe_load(_repo_path(cfg.data_config).read_text())["shard"]["crop_size"]
    assert crop == VARSRConfig.preset(cfg.preset).image_size <= cfg.corpus.tile
    assert read_config(ROOT / "model" / "pretrained" / f"{cfg.preset}-base")[0].name == cfg.preset
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
    assert parser.parse_args(cmd).overrides == ["max_steps=3"]  # the real CLI reads the overrides
    vq = cmd_train_vqvae(Path("v.yaml"), ["lr=1"])
    assert vq[:2] == ["train", "vqvae"] and parser.parse_args(vq).overrides == ["lr=1"]
    assert vq[-2:] == ["--resume", "auto"] and parser.parse_args(vq).resume == "auto"
    # the corpus step as the model card prints it (it once printed `pretrain corpus`, which the CLI refuses)
    corpus = parser.parse_args(cmd_corpus(Path("w")))
    assert (corpus.step, corpus.only, corpus.workdir) == ("pretrain", "corpus", "w")


def test_an_unknown_colour_fix_is_refused_before_any_step_runs(tmp_path):
    """A typo in the recipe's eval_color_fix would otherwise surface at the export, after every training stage."""
    from infra.core.errors import UserError
    from infra.demo.demo import Demo, DemoConfig
    from infra.demo.pretrain import Pretrain, load_pretrain_config

    pcfg = load_pretrain_config(None, ["eval_color_fix=wavlet"])
    with pytest.raises(UserError, match="eval_color_fix must be one of adain, wavelet, none, got 'wavlet'"):
        Pretrain(pcfg, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()
    with pytest.raises(UserError, match="color_fix must be one of"):
        Demo(DemoConfig(workdir=str(tmp_path / "d"), color_fix="sepia"))
    Pretrain(load_pretrain_config(None, ["eval_color_fix=wavelet"]), str(tmp_path / "w"))  # a known one is taken


def test_the_recipe_stops_after_a_tokenizer_that_failed_its_colour_check(tmp_path):
    """Stage 0 stores its colour check in the export's config.json; the recipe refuses to spend stages 1-2 on a
    tokenizer whose verdict is ``lost`` unless told to (``require_colour=false``), and records the figures."""
    import json

    from infra.core.errors import UserError
    from training.stage0_finish import colour_verdict

    lost = {
        "images": 32,
        "chroma_gain": 0.02,
        "chroma_err": 0.17,
        "chroma_gain_tokens": 0.01,
        "chroma_err_tokens": 0.17,
        "min_chroma_gain": 0.5,
    }
    assert colour_verdict(lost) == "lost"
    assert colour_verdict({**lost, "chroma_gain_tokens": 0.8}) == "kept"
    assert colour_verdict({**lost, "chroma_gain_tokens": float("nan")}) == "undetermined"
    final = tmp_path / "pt" / "runs" / "vqvae" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text(
        json.dumps({"lineage": {"mlflow_run_id": "r0"}, "colour_check": {**lost, "verdict": "lost"}})
    )
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


def test_the_cli_offers_every_recipe_step_and_the_decoder_step_finetunes_stage_2s_tokenizer(tmp_path):
    """`varsr demo pretrain --only STEP` accepts exactly the recipe's steps (the CLI keeps its own light list so
    `--help` does not import the recipe; it once lacked `tokens`); stage 0b is issued with the decoder config, the
    recipe's steps and lr, from stage 2's checkpoint, and is skipped with `decoder.steps=0`."""
    import json

    from infra.cli import build_parser
    from infra.demo import cli
    from infra.demo.pretrain import PRETRAIN_STEPS

    assert cli.PRETRAIN_STEPS == PRETRAIN_STEPS
    for step in PRETRAIN_STEPS:
        assert build_parser().parse_args(["demo", "pretrain", "--only", step]).only == step
    issued = []

    def recipe(*overrides):
        p = Pretrain(load_pretrain_config(None, list(overrides)), str(tmp_path / "pt"), log=lambda s: None)
        p.train_step = lambda *cmd: issued.append(cmd)
        return p

    assert recipe("decoder.steps=0").step_decoder()["checkpoint"] is None and not issued
    final = tmp_path / "pt" / "runs" / "vqvae_decoder" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text(json.dumps({"lineage": {"mlflow_run_id": "d0"}}))
    info = recipe("decoder.steps=5", "decoder.lr=0.001").step_decoder()
    assert info == {"checkpoint": str(final), "mlflow_run_id": "d0"}
    step, *cmd = issued[0]
    assert step == "decoder" and cmd[:4] == ["train", "vqvae", "--config", str(Path(cmd[3]))]
    assert cmd[3].endswith("configs/demo/pretrain_decoder.yaml")
    over = build_parser().parse_args(cmd).overrides
    assert {"max_steps=5", "lr=0.001", "init_from=runs/stage2/final"} <= set(over)


def test_continuing_a_base_keeps_its_stages_0_and_1_and_starts_stage_2_from_it(tmp_path):
    """`continue_from`: stages 0-1 are not retrained (recorded as the base's, with its lineage run ids), the token
    cache uses the base's tokenizer, and stage 2 initialises from the base with the base's tokenizer; a
    tokenizer-only checkpoint is refused."""
    import json

    import torch

    from infra.core.errors import UserError
    from infra.demo.pretrain import shipping_commit
    from model import VARSRConfig, build
    from model.checkpoint import save_pretrained, save_tokenizer

    torch.manual_seed(0)
    cfg = VARSRConfig.preset("tiny")
    vq, var = build(cfg)
    base = save_pretrained(
        tmp_path / "base", vq, var, extra={"lineage": {"varsr.tokenizer.run_id": "tok0", "varsr.parent.run_id": "c2i0"}}
    )
    issued = []
    p = Pretrain(
        load_pretrain_config(None, [f"continue_from={base}", "stage2.steps=3"]),
        str(tmp_path / "pt"),
        log=lambda s: None,
    )
    p.train_step = lambda *cmd: issued.append(cmd)
    p.varsr = lambda *cmd: issued.append(cmd)
    v, s1 = p.step_vqvae(), p.step_stage1()
    assert v["from_base"] and v["mlflow_run_id"] == "tok0" and s1["mlflow_run_id"] == "c2i0"
    assert v["checkpoint"] == str(base) and not issued and p.commands["stage1"] == []
    (tmp_path / "pt" / "shards").mkdir(parents=True)
    (tmp_path / "pt" / "shards" / "manifest.json").write_text(json.dumps({"tokens": {}}))
    p.step_tokens()
    assert issued[-1][0] == "tokens" and issued[-1][-1] == str(base)
    s2 = tmp_path / "pt" / "runs" / "stage2"
    s2.mkdir(parents=True)
    (s2 / "summary.json").write_text(json.dumps({"mlflow_run_id": "r2", "steps": 3}))
    assert p.step_stage2()["mlflow_run_id"] == "r2"
    step, *cmd = issued[-1]
    from infra.cli import build_parser

    over = build_parser().parse_args(cmd).overrides
    assert step == "stage2" and {f"model.init_from={base}", "model.vqvae_checkpoint=", "max_steps=3"} <= set(over)
    assert shipping_commit(tmp_path / "nowhere") is None
    tok = save_tokenizer(tmp_path / "tok", vq, cfg)
    bad = Pretrain(load_pretrain_config(None, [f"continue_from={tok}"]), str(tmp_path / "pt2"), log=lambda s: None)
    with pytest.raises(UserError, match="tokenizer-only"):
        bad.step_vqvae()
    # a base that is itself a continuation names no stage-0 run: its tokenizer's record is its stage 0b's run
    again = save_pretrained(
        tmp_path / "again", vq, var, extra={"lineage": {"varsr.decoder.run_id": "dec1", "varsr.parent.run_id": "c2i0"}}
    )
    p3 = Pretrain(load_pretrain_config(None, [f"continue_from={again}"]), str(tmp_path / "pt3"), log=lambda s: None)
    assert p3.step_vqvae()["mlflow_run_id"] == "dec1" and p3.step_stage1()["mlflow_run_id"] == "c2i0"


def test_the_model_card_of_a_continued_base_names_it_and_lists_the_decoder_stage(tmp_path):
    from infra.demo.pretrain import model_card

    pcfg = load_pretrain_config(None, ["continue_from=model/pretrained/small4-base"])
    pkg = {"name": "mate-backgrounds", "version": "1", "licenses": ["GPL-2+"], "images": ["a.jpg"]}
    st = {
        "corpus": {
            "seconds": 1.0,
            "command": f"varsr demo pretrain --only corpus --workdir {tmp_path / 'w'}",
            "info": {"photos": 1, "tiles": 4, "packages": [pkg], "eval_packages": [pkg]},
        },
        "data": {
            "seconds": 2.0,
            "command": "varsr data build",
            "info": {
                "inputs": 4,
                "kept": 4,
                "rejected": {},
                "samples": 8,
                "shard_files": 1,
                "manifest_sha256": "ab" * 32,
                "shards": str(tmp_path / "w" / "shards"),
            },
        },
        "vqvae": {
            "seconds": 0.1,
            "command": "",
            "info": {
                "checkpoint": "/x/model/pretrained/small4-base",
                "from_base": True,
                "base_commit": "c0ffee" * 6,
                "mlflow_run_id": "tok0",
            },
        },
        "stage1": {"seconds": 0.1, "command": "", "info": {"from_base": True, "mlflow_run_id": "c2i0"}},
        "stage2": {
            "seconds": 600.0,
            "command": "varsr train isr",
            "info": {"steps": 400, "first_loss": 2.0, "last_loss": 1.5, "mlflow_run_id": "r2"},
        },
        "decoder": {
            "seconds": 300.0,
            "command": "varsr train vqvae",
            "info": {"checkpoint": "runs/vqvae_decoder/final", "mlflow_run_id": "d0"},
        },
    }
    keys = ["psnr_y", "ssim_y", "hf_energy", "hf_gap_db"]
    mean = {
        **{f"{a}_{k}": 1.0 for a in ("bicubic", "varsr") for k in keys},
        **{
            f"ceiling_{k}": 1.0
            for k in ("psnr_y_tokens", "ssim_y_tokens", "psnr_y_tokens_residual", "ssim_y_tokens_residual")
        },
    }
    card = model_card(
        pcfg, st, {"mean": mean, "config": {"n": 6, "hr_side": 256, "cfg": 0.0}}, [], "p0", tmp_path / "pretrain.yaml"
    )
    assert "| vqvae | from the continued base | | | | `tok0` |" in card
    assert "| stage1 | from the continued base | | | | `c2i0` |" in card
    assert "| stage2 | `varsr train isr` | 400 | 600.0 | 2.000 -> 1.500 | `r2` |" in card
    assert "| decoder | `varsr train vqvae` | 600 | 300.0 |  | `d0` |" in card
    assert f"as shipped at commit `{'c0ffee' * 6}`" in card and "with 15 more minutes of training" in card
    # the per-step commands name the work folder as the card's command line does, not this machine's path
    assert "varsr demo pretrain --only corpus --workdir varsr-pretrain\n" in card and str(tmp_path / "w") not in card
    # the base's own sampling defaults (its sampling.json) are shown (issue 28, finding 5)
    assert "## Sampling defaults" in card and "cfg **0.75**, color_fix **wavelet**" in card
