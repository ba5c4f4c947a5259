"""`varsr demo pretrain`: the recipe of the shipped base model (``model/pretrained/small4-base``), as one command.

    varsr demo pretrain [--config configs/demo/pretrain.yaml] [--workdir varsr-pretrain]
                        [--ship model/pretrained/small4-base] [--set KEY=VALUE ...]

Steps (each a plain `varsr` command run in the work folder, like `varsr demo`):

  1. corpus   Debian photo wallpapers: `apt-get download` + extraction (data_pipeline.corpus_debian), tiled at
              several scales; the held-out lomiri-*/ukui-* packages go to eval/ (never to training)
  2. data     `varsr data build`   curate the tiles into WebDataset shards of the preset's tile size (64 px)
  3. vqvae    `varsr train vqvae`  stage 0: the preset's tokenizer (`small4`: 4-px tokens)
  4. tokens   `varsr data tokenize` the token cache of the shards for that tokenizer (stages 1-2 then skip the
              tokenizer's forward pass: about 1.5x faster steps, same losses)
  5. stage1   `varsr train c2i`    stage 1: class-to-image pretraining on the corpus' clusters
  6. stage2   `varsr train isr`    stage 2: ISR training from stage 1
  7. decoder  `varsr train vqvae`  stage 0b: the tokenizer's decoder finetuned (half its crops from the exact
              latent; sharpness losses available) with encoder and codebook frozen, so the codes stage 2 learned
              stay bit-identical
              (configs/demo/pretrain_decoder.yaml; ``decoder.steps: 0`` skips it)
  8. export   base weights = stage 2's transformer + stage 0b's decoder (model.safetensors + config.json, tokenizer
              included), metrics on the held-out photos, the MLflow record (runs' params and metrics as JSON) and
              MODEL_CARD.md; copied to --ship when given

Continuing a base (``continue_from: model/pretrained/small4-base``): stages 0 and 1 are that base's (not retrained),
the token cache is made with its tokenizer, and stage 2 starts from its weights; steps 6-8 then run as above. The
model card names the continued base and the commit that shipped it, whose own card holds the earlier stages' record.

MLflow: one parent run (experiment ``varsr-pretrain``) with every stage's run as its child. Resumable: finished
steps are recorded in state.json and skipped by a re-run; a killed stage (0, 1 or 2) resumes from its last complete
checkpoint (``--resume auto``).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Sequence

from data_pipeline.shards import read_manifest
from infra.core.config import to_dict
from infra.core.errors import UserError
from infra.core.log import summary
from infra.core.tracking import resolve_ref
from infra.demo.demo import Demo, DemoConfig, check_color_fix
from infra.demo.recipe import DEFAULT_CONFIG, ROOT, PretrainConfig, StageSection, load_pretrain_config  # noqa: F401 (re-exported: infra.demo.cli, tests)
from model.checkpoint import (
    WEIGHTS,
    copy_checkpoint,
    read_config,
    read_metadata,
    validate_sampling_defaults,
    write_sampling_defaults,
)

log = logging.getLogger(__name__)

PRETRAIN_STEPS = ("corpus", "data", "vqvae", "tokens", "stage1", "stage2", "decoder", "export")
EXPERIMENT = "varsr-pretrain"


def _repo_path(p: str) -> Path:
    """A path from the recipe's config: relative to the repository, ``<repo>/…`` as runs record it, or absolute."""
    return Path(resolve_ref(p, ROOT))


class Pretrain(Demo):
    """The recipe as resumable steps; shares the `varsr` subprocess runner and state file with the demo."""

    steps = PRETRAIN_STEPS

    def __init__(
        self,
        pcfg: PretrainConfig,
        workdir: str,
        ship: str | None = None,
        fresh: bool = False,
        config_path: str | Path | None = None,
        overrides: Sequence[str] = (),
        log: Callable[[str], None] = summary,
    ):
        super().__init__(DemoConfig(workdir=workdir, fresh=fresh, batch_size=pcfg.batch_size), log=log)
        check_color_fix(pcfg.eval_color_fix, "eval_color_fix")  # before hours of training, not at the export
        validate_sampling_defaults(to_dict(pcfg.sampling), "sampling")
        self.p = pcfg
        self.ship = Path(ship).resolve() if ship else None
        self.config_path = Path(config_path or DEFAULT_CONFIG).resolve()
        self.overrides = list(overrides)
        self.model_uri = str(self.ship or self.w / "base")  # the summary's "model" line: a file checkpoint here

    # ---- MLflow: one parent run, the stages' runs as its children ----------------------------------------------------
    def parent_run_id(self) -> str:
        import mlflow

        rid_file = self.w / "parent_run_id"  # beside state.json, which the step loop rewrites
        if rid_file.is_file():
            return rid_file.read_text().strip()
        mlflow.set_tracking_uri(self.tracking_uri)
        from infra.core.tracking import ensure_experiment

        exp = ensure_experiment(self.tracking_uri, EXPERIMENT)
        with mlflow.start_run(experiment_id=exp, run_name=f"pretrain-{self.p.preset}-base") as run:
            mlflow.log_params(
                {
                    "preset": self.p.preset,
                    "batch_size": self.p.batch_size,
                    "vqvae.steps": self.p.vqvae.steps,
                    "stage1.steps": self.p.stage1.steps,
                    "stage2.steps": self.p.stage2.steps,
                    "config": str(self.config_path),
                    "overrides": " ".join(self.overrides),
                }
            )
            mlflow.log_dict(to_dict(self.p), "config/pretrain.json")
            mlflow.set_tags({"varsr.recipe": "varsr demo pretrain", "varsr.git_commit": git_commit()})
            rid = run.info.run_id
        mlflow.tracking.MlflowClient(self.tracking_uri).set_terminated(rid, "RUNNING")
        rid_file.write_text(rid + "\n")
        return rid

    def adopt_children(self) -> list[str]:
        """Tag every run of the experiment (but the parent) as a child of the parent run; returns their ids."""
        from mlflow.tracking import MlflowClient

        parent = self.parent_run_id()
        client = MlflowClient(self.tracking_uri)
        exp = client.get_experiment_by_name(EXPERIMENT)
        kids: list[str] = []
        if exp is None:  # no run of the recipe yet
            return kids
        for r in client.search_runs([exp.experiment_id], max_results=1000):
            if r.info.run_id == parent:
                continue
            if r.data.tags.get("mlflow.parentRunId") != parent:
                client.set_tag(r.info.run_id, "mlflow.parentRunId", parent)
            kids.append(r.info.run_id)
        return kids

    def train_step(self, step: str, *args: str) -> None:
        self.parent_run_id()
        try:
            self.varsr(step, *args)
        finally:
            self.adopt_children()

    # ---- steps ------------------------------------------------------------------------------------------------------
    def step_corpus(self) -> dict:
        from data_pipeline.corpus_debian import check_training_packages, fetch_and_extract, tile_images

        c = self.p.corpus
        check_training_packages(c.packages)
        self.commands["corpus"] = ["varsr", *cmd_corpus(self.w)]
        train = fetch_and_extract(c.packages, self.w / "debs", self.w / "corpus" / "images")
        held = fetch_and_extract(c.eval_packages, self.w / "debs", self.w / "eval" / "images")
        files = [f for i in train for f in i.images]
        tiles_dir = self.w / "corpus" / "tiles"
        if tiles_dir.exists():
            shutil.rmtree(tiles_dir)
        tiles = tile_images(files, tiles_dir, list(c.short_sides), c.tile)
        return dict(
            packages=[_pkg(i) for i in train],
            eval_packages=[_pkg(i) for i in held],
            photos=len(files),
            tiles=len(tiles),
            tiles_dir=str(tiles_dir),
            eval_images=[f for i in held for f in i.images],
        )

    def step_data(self) -> dict:
        self.varsr("data", *cmd_data_build("corpus/tiles", "shards", _repo_path(self.p.data_config)))
        manifest, sha = read_manifest(str(self.w / "shards"))
        c = manifest.counts
        return dict(
            shards=str(self.w / "shards"),
            inputs=c.inputs,
            kept=c.kept,
            rejected=c.rejected_by_reason,
            failed=c.failed_by_reason,
            samples=c.samples,
            shard_files=len(manifest.shards),
            manifest_sha256=sha,
        )

    def _continued(self) -> Path | None:
        """The base this run continues (``continue_from``), checked to be a full native checkpoint."""
        if not self.p.continue_from:
            return None
        base = _repo_path(self.p.continue_from)
        if read_config(base)[1].get("contents") == "tokenizer":
            raise UserError(f"continue_from={base} is a tokenizer-only checkpoint: a base to continue needs stages 1-2")
        return base

    def _from_base(self, step: str) -> dict:
        """Stage 0 or 1 of a continued base: nothing is trained; the card names the base and the commit that
        shipped its weights."""
        base = self._continued()
        assert base is not None  # _from_base runs only for a continued base
        self.commands[step] = []
        lineage = read_metadata(base).get("lineage", {})
        # a base that is itself a continuation records no stage-0 run: its tokenizer was last trained by its stage 0b
        run = (
            lineage.get("varsr.tokenizer.run_id") or lineage.get("varsr.decoder.run_id")
            if step == "vqvae"
            else lineage.get("varsr.parent.run_id")
        )
        return dict(
            checkpoint=str(base), from_base=True, base_commit=shipping_commit(base / WEIGHTS), mlflow_run_id=run
        )

    def step_vqvae(self) -> dict:
        p = self.p
        if self._continued():
            return self._from_base("vqvae")
        self.train_step(
            "vqvae",
            *cmd_train_vqvae(
                DEMO_CONFIGS_DIR / "pretrain_vqvae.yaml",
                [
                    f"max_steps={p.vqvae.steps}",
                    f"lr={p.vqvae.lr}",
                    f"data.batch_size={p.vqvae.batch_size or p.batch_size}",
                    f"model.preset={p.preset}",
                ],
            ),
        )
        meta = read_metadata(self.w / "runs" / "vqvae" / "final")
        # stage 0's end-of-run colour check (training/stage0_finish.py); None for a tokenizer exported before it existed
        colour = meta.get("colour_check")
        if colour and colour["verdict"] == "lost" and p.require_colour:
            raise UserError(
                f"the tokenizer failed its colour check: chroma gain {colour['chroma_gain_tokens']:.2f} < "
                f"{colour['min_chroma_gain']} on {colour['images']} held-out crops, so stages 1-2 would "
                f"learn near-grey images (docs/EXPERIMENTS.md); train it longer or change its preset, or "
                f"go on anyway with --set require_colour=false"
            )
        return dict(
            checkpoint=str(self.w / "runs" / "vqvae" / "final"),
            mlflow_run_id=meta.get("lineage", {}).get("mlflow_run_id"),
            colour=colour,
        )

    def step_tokens(self) -> dict:
        base = self._continued()
        self.varsr("tokens", *cmd_tokenize("shards", str(base) if base else "runs/vqvae/final"))
        try:  # what the state file records of the cache; stages 1-2 check it themselves (training/steps.py)
            manifest, sha = read_manifest(str(self.w / "shards"))
        except UserError as e:
            log.warning("token step: the shards' manifest says nothing usable about its token cache (%s)", e)
            return dict(tokenizer_sha256=None, patch_nums=None, manifest_sha256=None)
        tok = manifest.tokens
        return dict(
            tokenizer_sha256=tok.tokenizer_sha256 if tok else None,
            patch_nums=tok.patch_nums if tok else None,
            manifest_sha256=sha,
        )

    def _stage(self, step: str, yaml_name: str, s: StageSection) -> dict:
        p = self.p
        base = self._continued() if step == "stage2" else None
        init = [f"model.init_from={base}", "model.vqvae_checkpoint="] if base else []  # tokenizer: the base's
        self.train_step(
            step,
            *cmd_train_stage(
                "c2i" if step == "stage1" else "isr",
                DEMO_CONFIGS_DIR / yaml_name,
                [
                    f"max_steps={s.steps}",
                    f"optim.lr={s.lr}",
                    f"data.batch_size={p.batch_size}",
                    f"model.preset={p.preset}",
                    *init,
                ],
            ),
        )
        out = self.w / "runs" / step
        summary = json.loads((out / "summary.json").read_text())
        return dict(
            checkpoint=str(out / "final"),
            mlflow_run_id=summary.get("mlflow_run_id"),
            steps=summary.get("steps"),
            first_loss=summary.get("first_loss"),
            last_loss=summary.get("last_loss"),
            wall_s=summary.get("wall_s"),
        )

    def step_stage1(self) -> dict:
        if self._continued():
            return self._from_base("stage1")
        return self._stage("stage1", "pretrain_stage1.yaml", self.p.stage1)

    def step_stage2(self) -> dict:
        return self._stage("stage2", "pretrain_stage2.yaml", self.p.stage2)

    def step_decoder(self) -> dict:
        """Stage 0b: finetune the decoder of stage 2's tokenizer (its codes frozen) for sharper images."""
        p = self.p
        if p.decoder.steps <= 0:
            self.commands["decoder"] = []
            return dict(checkpoint=None, note="decoder.steps is 0: the base keeps stage 0's decoder")
        self.train_step(
            "decoder",
            *cmd_train_vqvae(
                DEMO_CONFIGS_DIR / "pretrain_decoder.yaml",
                [
                    f"max_steps={p.decoder.steps}",
                    f"lr={p.decoder.lr}",
                    f"data.batch_size={p.decoder.batch_size or p.batch_size}",
                    f"model.preset={p.preset}",
                    "init_from=runs/stage2/final",
                ],
            ),
        )
        out = self.w / "runs" / "vqvae_decoder" / "final"
        meta = read_metadata(out)
        return dict(checkpoint=str(out), mlflow_run_id=meta.get("lineage", {}).get("mlflow_run_id"))

    def step_export(self) -> dict:
        """Base folder = stage 2's transformer with stage 0b's decoder + held-out metrics + the MLflow record + the
        model card."""
        import mlflow

        from infra.demo.quality import bundled_table, evaluate_checkpoint
        from model.checkpoint import with_decoder

        st = self.state()
        base = self.w / "base"
        if base.exists():
            shutil.rmtree(base)
        base.mkdir(parents=True)
        src = Path(st["stage2"]["info"]["checkpoint"])
        decoder = (st.get("decoder") or {}).get("info", {}).get("checkpoint")
        if decoder:  # refuses a tokenizer whose codes differ from those stage 2 learned
            with_decoder(
                src,
                decoder,
                base,
                extra={
                    "varsr.decoder.checkpoint": "runs/vqvae_decoder/final",
                    "varsr.decoder.run_id": st["decoder"]["info"]["mlflow_run_id"],
                },
            )
        else:
            copy_checkpoint(src, base)
        write_sampling_defaults(base, to_dict(self.p.sampling))  # the base's own defaults (model/checkpoint.py)
        self.log("    scoring the base model on held-out photos (tokenizer ceiling, SR vs bicubic) ...")
        figures = evaluate_checkpoint(
            base,
            _photos(st["corpus"]["info"]["eval_images"]),
            self.p.eval_images,
            self.p.eval_hr_side,
            self.p.eval_cfg,
            self.p.eval_color_fix,
        )  # infra/demo/quality.py
        self.log("    scoring the base model on the small real set (varsr eval --suite bundled) ...")
        suite = bundled_table(base, self.w / "eval-bundled", cfg=self.p.eval_cfg, color_fix=self.p.eval_color_fix)
        figures["suite_table"] = (Path(suite.out_dir) / "table.md").read_text()
        (base / "eval.json").write_text(json.dumps(figures, indent=2) + "\n")
        parent = self.parent_run_id()
        kids = self.adopt_children()
        mlflow.set_tracking_uri(self.tracking_uri)
        client = mlflow.tracking.MlflowClient(self.tracking_uri)
        for k, v in figures["mean"].items():
            client.log_metric(parent, f"heldout/{k}", float(v))
        for name in STAGE_WALL_KEYS:
            if name in st:
                client.log_metric(parent, f"wall_s/{name}", float(st[name]["seconds"]))
        record = mlflow_record(self.tracking_uri, [parent, *kids])
        (base / "mlflow_runs.json").write_text(json.dumps(record, indent=2) + "\n")
        card = model_card(self.p, st, figures, record, parent, self.config_path, self.overrides)
        (base / "MODEL_CARD.md").write_text(card)
        client.log_artifact(parent, str(base / "MODEL_CARD.md"))
        client.log_artifact(parent, str(base / "eval.json"))
        client.set_terminated(parent, "FINISHED")
        shipped = None
        if self.ship:
            self.ship.mkdir(parents=True, exist_ok=True)
            for f in base.iterdir():
                shutil.copy2(f, self.ship / f.name)
            shipped = str(self.ship)
        size_mb = sum(f.stat().st_size for f in base.iterdir()) / 1e6
        return dict(
            base=str(base), shipped=shipped, size_mb=round(size_mb, 2), parent_run_id=parent, heldout=figures["mean"]
        )

    # ---- driver ------------------------------------------------------------------------------------------------------
    def run(self, only: list[str] | None = None) -> dict:
        summary = super().run(only)
        return summary


DEMO_CONFIGS_DIR = ROOT / "configs" / "demo"
STAGE_WALL_KEYS = ("corpus", "data", "vqvae", "tokens", "stage1", "stage2", "decoder")


# ---- the `varsr` commands the recipe runs (one place, so their syntax is ported in one place) ------------------------
def cmd_corpus(workdir: Path) -> list[str]:
    return ["demo", "pretrain", "--only", "corpus", "--workdir", str(workdir)]


def cmd_data_build(inp: str, out: str, config: Path) -> list[str]:
    return ["data", "build", "--input", inp, "--output", out, "--config", str(config)]


def cmd_tokenize(shards: str, vqvae: str) -> list[str]:
    return ["data", "tokenize", "--shards", shards, "--vqvae", vqvae]


def _sets(overrides: list[str]) -> list[str]:
    return [a for kv in overrides for a in ("--set", kv)]


def cmd_train_vqvae(config: Path, overrides: list[str]) -> list[str]:
    return cmd_train_stage("vqvae", config, overrides)


def cmd_train_stage(stage: str, config: Path, overrides: list[str]) -> list[str]:
    return ["train", stage, "--config", str(config), *_sets(overrides), "--resume", "auto"]


# ---- export helpers --------------------------------------------------------------------------------------------------
def _photos(files: list[str]) -> list[str]:
    """Held-out files that are photographs: the lomiri packages (ukui ships drawings only)."""
    return [f for f in files if "/lomiri-" in f]


def mlflow_record(tracking_uri: str, run_ids: list[str]) -> list[dict]:
    """Params, final metrics and tags of each run (the MLflow record kept beside the model card)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    out = []
    for rid in run_ids:
        r = client.get_run(rid)
        out.append(
            {
                "run_id": rid,
                "run_name": r.info.run_name,
                "status": r.info.status,
                "start_time": r.info.start_time,
                "end_time": r.info.end_time,
                "tags": {k: v for k, v in r.data.tags.items() if k.startswith(("varsr.", "mlflow.parentRunId"))},
                "params": dict(r.data.params),
                "metrics": dict(r.data.metrics),
            }
        )
    return out


def shipping_commit(path: Path) -> str | None:
    """The last commit that changed ``path`` (the commit that shipped a base's weights), or None outside git."""
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%H", "--", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return (sha.stdout.strip() or "unknown") + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _pkg(info) -> dict:
    return {
        "name": info.name,
        "version": info.version,
        "licenses": info.licenses,
        "sha256": info.sha256,
        "images": [Path(x).name for x in info.images],
    }


def _tile(preset: str) -> int:
    """The preset's tile side in HR pixels (the size of its shard crops)."""
    from model.config import VARSRConfig

    return VARSRConfig.preset(preset).image_size


def _preset_summary(preset: str) -> str:
    """The model card's one-line geometry of a preset, read from its config (model/config.py)."""
    from model.config import VARSRConfig

    c = VARSRConfig.preset(preset)
    return (
        f"preset `{preset}`: {c.image_size}-px tiles, {c.vqvae.downsample}-px tokens, {len(c.patch_nums)} scales "
        f"({','.join(map(str, c.patch_nums))}), codebook {c.vqvae.vocab_size} x {c.vqvae.z_channels}, "
        f"transformer depth {c.depth} / width {c.embed_dim}"
    )


def model_card(
    p: PretrainConfig,
    st: dict,
    figures: dict,
    record: list[dict],
    parent: str,
    config_path: Path,
    overrides: Sequence[str] = (),
) -> str:
    """MODEL_CARD.md of the base: data, steps, wall times, metrics, MLflow runs, commit and the command."""
    c = st["corpus"]["info"]
    d = st["data"]["info"]
    m = figures["mean"]
    tile = _tile(p.preset)
    lines = [
        f"# `{p.preset}-base`: the VARSR base model shipped with the platform",
        "",
        f"A CPU-sized VARSR ({_preset_summary(p.preset)}) trained by the platform's own commands: tokenizer (stage 0), "
        "class-to-image (stage 1), ISR (stage 2), and a decoder finetune of the tokenizer (stage 0b, codes "
        "unchanged) when the recipe has one. `varsr demo` finetunes its stage 2 on the demo corpus.",
        (
            f"It continues a shipped base (see Training) with {_train_minutes(st):.0f} more minutes of training on a "
            "two-core CPU machine: it "
            if st["vqvae"]["info"].get("from_base")
            else f"It is a small model trained for {_train_minutes(st):.0f} minutes on a two-core CPU machine: it "
        )
        + "demonstrates the platform and gives the demo's finetuning a real starting point; it is not a competitive "
        "super-resolution model.",
        "",
        "## Files",
        "",
        "- `model.safetensors`, `config.json`: native checkpoint (`model.from_pretrained`), tokenizer included",
        "- `sampling.json`: the model's own sampling defaults (below)",
        "- `eval.json`: per-image figures on the held-out photos; `mlflow_runs.json`: the MLflow runs' params, "
        "metrics and tags",
        "",
        "## Sampling defaults",
        "",
        "`sampling.json` holds the settings `varsr upscale`, the pyfunc model and the served endpoint use when a "
        "call does not give them (a request's or command's own params still win; a model without the file uses the "
        "global defaults of the released d24, cfg 6.0 and AdaIN): "
        + ", ".join(f"{k} **{v}**" for k, v in to_dict(p.sampling).items())
        + ". They are what `varsr demo` "
        "upscales with, and a registered version shows them as its `varsr.sampling.*` tags.",
        "",
        "## Command",
        "",
        "```",
        f"varsr demo pretrain --config {_rel(config_path)} --workdir varsr-pretrain "
        f"--ship model/pretrained/{p.preset}-base" + "".join(f" --set {o}" for o in overrides),
        "```",
        "",
        f"Code: git commit `{git_commit()}`. Every stage as a `varsr` command (run in the work folder):",
        "",
        "```",
        *[
            _rel_cmd(st[k]["command"], Path(d["shards"]).parent if d.get("shards") else None)
            for k in PRETRAIN_STEPS
            if k in st and st[k].get("command")
        ],
        "```",
        "",
        "## Data",
        "",
        f"{c['photos']} photographs from Debian (bookworm) wallpaper packages, fetched with `apt-get download`; "
        f"each resized to short sides {p.corpus.short_sides} and cut into {p.corpus.tile}-px tiles "
        f"({c['tiles']} tiles), curated by `varsr data build` ({_rel(_repo_path(p.data_config))}): "
        f"{d['inputs']} inputs -> {d['kept']} kept (rejected {d['rejected']}), {d['samples']} samples "
        f"({tile}-px HR, {tile // 4}-px LR, varsr-mild degradation) in {d['shard_files']} shards, "
        "manifest sha256 "
        f"`{d['manifest_sha256'][:16]}`.",
        "",
        "| package | version | licences | images used |",
        "|---|---|---|---|",
        *[
            f"| {k['name']} | {k['version']} | {', '.join(k['licenses'])} | "
            f"{len(k['images'])}: {', '.join(k['images'])} |"
            for k in c["packages"]
        ],
        "",
        "Held out (never trained on; fetched by the same recipe into `eval/`): "
        + ", ".join(f"{k['name']} {k['version']} ({', '.join(k['licenses'])})" for k in c["eval_packages"])
        + ". The photographs among them (the lomiri packages; ukui ships drawings) are the evaluation set.",
        "",
        "## Training",
        "",
        "| stage | command | steps | wall time (s) | first -> last loss | MLflow run |",
        "|---|---|---|---|---|---|",
    ]
    for k in ("vqvae", "stage1", "stage2", "decoder"):
        if k not in st or (k == "decoder" and not st[k]["info"].get("checkpoint")):
            continue
        info = st[k]["info"]
        if info.get("from_base"):
            lines.append(f"| {k} | from the continued base | | | | `{info.get('mlflow_run_id')}` |")
            continue
        loss = f"{info['first_loss']:.3f} -> {info['last_loss']:.3f}" if info.get("first_loss") is not None else ""
        steps = info.get("steps", getattr(p, k).steps)
        cmd = {"stage1": "c2i", "stage2": "isr"}.get(k, "vqvae")
        lines.append(
            f"| {k} | `varsr train {cmd}` | {steps} | {st[k]['seconds']} | {loss} | `{info.get('mlflow_run_id')}` |"
        )
    cont = st["vqvae"]["info"]
    if cont.get("from_base"):
        lines += [
            "",
            f"Continued from `{_rel(Path(cont['checkpoint']))}` as shipped at commit "
            f"`{cont.get('base_commit')}`: its stages 0 and 1 are kept, stage 2 goes on from its weights. "
            f"That base's own card (`git show {(cont.get('base_commit') or 'COMMIT')[:12]}:"
            f"{_rel(Path(cont['checkpoint']))}/MODEL_CARD.md`) and `mlflow_runs.json` hold the record of "
            "the earlier stages.",
        ]
    colour = st["vqvae"]["info"].get("colour")  # absent in state files written before the colour check
    if colour:
        gain = colour["chroma_gain_tokens"]
        lines += [
            "",
            f"Tokenizer colour check (stage 0, {colour['images']} held-out crops): chroma gain "
            f"{'n/a' if gain is None else f'{gain:.2f}'} from tokens only (1 = each crop keeps its colour, "
            f"0 = one tint for all), verdict **{colour['verdict']}**.",
        ]
    total = sum(st[k]["seconds"] for k in STAGE_WALL_KEYS if k in st)
    lines += [
        "",
        f"Batch {p.batch_size} (tokenizer {p.vqvae.batch_size or p.batch_size}), fp32, DeepSpeed ZeRO-1 "
        f"on CPU (gloo). Wall time of corpus + data + stages 0-2: {total:.0f} s on a 2-core machine.",
        "",
        "## Held-out metrics",
        "",
        f"{figures['config']['n']} lomiri photographs, square {figures['config']['hr_side']}-px HR crops, LR = "
        f"x4 bicubic; cfg {figures['config']['cfg']}, seed 0, "
        f"{figures['config'].get('color_fix', 'adain')} colour fix. PSNR/SSIM on Y (BT.601); "
        "HF = mean squared high-pass of Y (Y minus its Gaussian blur, sigma 1 px), "
        "gap = |10 log10(HF_sr/HF_hr)|.",
        "",
        "| | PSNR-Y (dB) | SSIM-Y | HF energy | HF gap to HR (dB) |",
        "|---|---|---|---|---|",
        f"| bicubic | {m['bicubic_psnr_y']:.2f} | {m['bicubic_ssim_y']:.3f} | {m['bicubic_hf_energy']:.1f} | "
        f"{m['bicubic_hf_gap_db']:.2f} |",
        f"| base model | {m['varsr_psnr_y']:.2f} | {m['varsr_ssim_y']:.3f} | {m['varsr_hf_energy']:.1f} | "
        f"{m['varsr_hf_gap_db']:.2f} |",
        f"| tokenizer ceiling: tokens only | {m['ceiling_psnr_y_tokens']:.2f} | {m['ceiling_ssim_y_tokens']:.3f} | | |",
        f"| tokenizer ceiling: tokens + exact residual | {m['ceiling_psnr_y_tokens_residual']:.2f} | "
        f"{m['ceiling_ssim_y_tokens_residual']:.3f} | | |",
        "",
        *(
            [
                "## The small real set",
                "",
                "Five held-out 256-px crops of scikit-image's photos, LR = bicubic /4, scored by "
                "`varsr eval --suite bundled` (docs/EVALUATION.md) against bicubic:",
                "",
                figures["suite_table"].strip(),
                "",
            ]
            if figures.get("suite_table")
            else []
        ),
        "## MLflow",
        "",
        f"Parent run `{parent}` (experiment `{EXPERIMENT}`), children:",
        "",
    ]
    for r in record:
        if r["run_id"] == parent:
            continue
        keys = [
            k
            for k in ("loss", "ce", "acc", "val/loss", "val/psnr", "vqvae/psnr", "vqvae/loss", "vqvae/usage")
            if k in r["metrics"]
        ]
        lines.append(f"- `{r['run_id']}` {r['run_name']}: " + ", ".join(f"{k} {r['metrics'][k]:.4g}" for k in keys))
    lines += ["", "Full params/metrics/tags: `mlflow_runs.json`.", ""]
    return "\n".join(lines)


def _train_minutes(st: dict) -> float:
    return sum(st[k]["seconds"] for k in ("vqvae", "stage1", "stage2", "decoder") if k in st) / 60


def _rel_cmd(cmd: str, workdir: Path | None = None) -> str:
    """A recorded command with repository paths made relative and the work folder named as in the card's command
    line (``varsr-pretrain``)."""
    if workdir is not None:
        cmd = cmd.replace(f"--workdir {workdir}", "--workdir varsr-pretrain")
    return cmd.replace(f"{ROOT}/", "")


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)
