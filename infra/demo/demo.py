"""`varsr demo`: the whole platform on embedded defaults, on one machine, with no services started by hand.

Steps (each one is a plain `varsr` command, run here as a subprocess in the work folder so the demo proves the
commands a user would type):

  1. corpus    bundled real photos (scikit-image, scikit-learn, matplotlib) + crafted bad files; one held-out photo
  2. data      `varsr data build`      local Ray: score -> select -> degrade -> WebDataset shards + reject report
  3. vqvae     `varsr train vqvae`     stage 0: the tokenizer (no released tiny VQVAE exists)
  4. stage1    `varsr train c2i`       class-to-image pretraining (DeepSpeed), tracked in MLflow
  5. stage2    `varsr train isr`       ISR finetuning from stage 1, registered as models:/NAME@champion
  6. serve     `varsr serve`           `mlflow models serve` on 127.0.0.1 answers one real HTTP request
  7. upscale   `varsr upscale`         the held-out photo, beside a bicubic baseline and the HR reference
Everything lands under the work folder; state.json records finished steps so a re-run resumes (``--fresh`` restarts).

MLflow (``<workdir>/mlflow.db``, artifacts in ``<workdir>/mlartifacts``): one experiment ``varsr-demo`` and one parent
run (``demo <preset> seed<N> <time>``) whose children are every run the steps make — the stage-2 training run (which
also holds the logged and registered model), the serving check and the held-out upscale. The folder is portable:
move it anywhere and ``varsr demo --workdir NEW`` (or :func:`infra.core.tracking.relocate_local_store`) re-points the
store before anything reads it.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from infra.core.errors import UserError
from infra.core.log import summary
from infra.core.net import free_port
from infra.core.tracking import resolve_ref
from infra.demo.recipe import ROOT, load_pretrain_config

DEMO_CONFIGS = ROOT / "configs" / "demo"
STEPS = ("corpus", "data", "vqvae", "stage1", "stage2", "serve", "upscale")
FROM_SCRATCH_PRESET = "small"  # the preset of configs/demo/{vqvae,stage1,stage2}.yaml (128-px tiles)
# the demo photos' short side before the random model-sized crop when training from scratch (the `small` preset's
# 128-px crops, the data build's default resize of 1.25); finetuning the base uses its corpus's scale instead
# (Demo.photo_short_side)
PHOTO_SHORT_SIDE = 160
EXPERIMENT = "varsr-demo"


@dataclass
class DemoConfig:
    """Knobs of the demo; defaults finish in well under 15 minutes on 2 idle CPU cores."""

    workdir: str = "varsr-demo"
    base: str = "model/pretrained/small4-base"  # shipped base (relative to the repository); stage 2 finetunes it
    from_scratch: bool = False  # train tokenizer, stage 1 and stage 2 from nothing instead of finetuning the base
    vqvae_steps: int = 300  # from scratch only
    stage1_steps: int = 100  # from scratch only
    stage2_steps: int = 100  # finetuning steps from the base (or stage-2 steps from scratch)
    stage2_lr: float | None = None  # None: 2e-4 when finetuning the base, 1e-3 from scratch
    batch_size: int = 8
    # guidance of the upscaled result (t = cfg·si/9 per scale, docs/MODEL.md §2.11): 0.75 trades 0.3 dB of PSNR-Y for
    # 2.4x the high-frequency energy of cfg 0 on the held-out motorcycle with the shipped base (docs/EXPERIMENTS.md)
    cfg: float = 0.75
    # colour fix of the upscaled result against the bicubic LR (inference/colorfix.py): the release ships both and
    # calls AdaIN; the wavelet fix (the LR's low frequencies under the SR's high ones) scores higher PSNR-Y on the
    # held-out photos with the shipped base (docs/EXPERIMENTS.md)
    color_fix: str = "wavelet"
    register_name: str = "varsr-demo"
    alias: str = "champion"
    port: int | None = None  # serving port; None = a free one
    seed: int = 0
    holdout_lr_side: int = 64  # held-out LR long side; x4 upscaling gives a multi-tile output (64/128-px model tiles)
    # short side each demo photo is resized to before its crops are cut; None = the smallest short side of the base's
    # corpus (configs/demo/pretrain.yaml corpus.short_sides: 256) when finetuning the base, 160 from scratch. Denser
    # crops than the base saw (160) teach the finetune to draw more detail than the photo has: 0.35-0.8 dB less PSNR-Y
    # on the held-out photos than at 256, for 1.4-1.8x the high-frequency energy (docs/EXPERIMENTS.md)
    photo_short_side: int | None = None
    fresh: bool = False

    def base_dir(self) -> Path:
        return Path(resolve_ref(self.base, ROOT))  # repository-relative, ``<repo>/…`` or absolute


def check_color_fix(value: str, key: str) -> None:
    """Refuse an unknown colour fix up front (the pipeline would only refuse it at the first upscale)."""
    from inference.config import COLOR_FIXES

    if value not in COLOR_FIXES:
        raise UserError(f"{key} must be one of {', '.join(COLOR_FIXES)}, got {value!r}")


class Demo:
    steps: tuple[str, ...] = STEPS

    def __init__(self, cfg: DemoConfig, log: Callable[[str], None] = summary):
        check_color_fix(cfg.color_fix, "color_fix")
        self.cfg = cfg
        self.w = Path(cfg.workdir).resolve()
        self.log = log
        self.state_path = self.w / "state.json"
        self.tracking_uri = f"sqlite:///{self.w / 'mlflow.db'}"
        self.model_uri = f"models:/{cfg.register_name}@{cfg.alias}"
        self.commands: dict[str, list[str]] = {}
        self.t0 = time.monotonic()

    # ---- bookkeeping ----------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def _save_state(self, st: dict) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(st, indent=2))
        tmp.replace(self.state_path)

    # ---- MLflow: one parent run, every step's run as its child ------------------------------------------------------
    def parent_run_id(self) -> str:
        """The demo's parent run, created on the first step and kept (in state.json) across resumed re-runs."""
        from infra.core.tracking import run_name, start_run

        st = self.state()
        if st.get("mlflow", {}).get("parent_run_id"):
            return st["mlflow"]["parent_run_id"]
        preset = self.preset() if not self.cfg.from_scratch else f"{FROM_SCRATCH_PRESET}-from-scratch"
        run = start_run(
            self.tracking_uri,
            run_name("demo", preset, f"seed{self.cfg.seed}"),
            experiment=EXPERIMENT,
            tags={
                "varsr.stage": "demo",
                "varsr.model_uri": self.model_uri,
                "varsr.demo.from_scratch": str(self.cfg.from_scratch),
            },
            source="varsr demo",
        )
        st["mlflow"] = {"parent_run_id": run.info.run_id, "experiment": EXPERIMENT}
        self._save_state(st)
        return run.info.run_id

    def child_run(self, kind: str, *details, tags: dict | None = None) -> str:
        from infra.core.tracking import run_name, start_run

        return start_run(
            self.tracking_uri,
            run_name(kind, *details),
            experiment=EXPERIMENT,
            parent_run_id=self.parent_run_id(),
            tags=tags,
            source=f"varsr demo {kind}",
        ).info.run_id

    def env(self) -> dict:
        from infra.core.tracking import EXPERIMENT_ENV, PARENT_RUN_ENV

        env = dict(os.environ)
        env.update({PARENT_RUN_ENV: self.parent_run_id(), EXPERIMENT_ENV: EXPERIMENT})  # every varsr run nests here
        env.update(
            MLFLOW_TRACKING_URI=self.tracking_uri,
            RAY_USAGE_STATS_ENABLED="0",
            NO_ALBUMENTATIONS_UPDATE="1",
            MLFLOW_DISABLE_TELEMETRY="true",
            DO_NOT_TRACK="true",
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
        )
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
        return env

    def varsr(self, step: str, *args: str) -> None:
        """Run one `varsr ...` command in the work folder; its output streams to the terminal and logs/<step>.log."""
        cmd = ["varsr", *args]
        self.commands[step] = cmd
        (self.w / "logs").mkdir(exist_ok=True)
        logf = self.w / "logs" / f"{step}.log"
        self.log(f"    $ {' '.join(cmd)}")
        with open(logf, "w") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "infra.cli", *args],
                cwd=self.w,
                env=self.env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                fh.write(line)
                if _interesting(line):
                    self.log(f"    | {line.rstrip()[:160]}")
            rc = proc.wait()
        if rc != 0:
            raise UserError(f"demo step '{step}' failed (exit {rc}); see {logf}")

    # ---- steps ----------------------------------------------------------------------------------------------------
    def step_corpus(self) -> dict:
        from data_pipeline.sample_corpus import write_sample_corpus

        files = write_sample_corpus(self.w / "corpus")
        self.commands["corpus"] = ["varsr", "demo", "corpus", "--workdir", str(self.w)]
        hr, lr = write_holdout(self.w / "holdout", self.cfg.holdout_lr_side)
        bad = sorted(k for k, v in files.items() if not v["expect"].startswith("ok"))
        return dict(
            corpus=str(self.w / "corpus"), files=len(files), bad_files=bad, holdout_hr=str(hr), holdout_lr=str(lr)
        )

    def preset(self) -> str:
        """The model preset the demo trains: the shipped base's (its config.json), or the from-scratch configs'."""
        if self.cfg.from_scratch:
            return FROM_SCRATCH_PRESET
        from inference.pipeline import model_geometry

        return model_geometry(self._check_base())[0]

    def tile_size(self) -> int:
        """The model's tile side in HR pixels: the size of the demo's shard crops."""
        from inference.pipeline import model_geometry

        return 128 if self.cfg.from_scratch else model_geometry(self._check_base())[1]

    def photo_short_side(self) -> int:
        """Short side of the demo photos before cropping: the scale of the base's corpus when finetuning it, so that
        the finetune sees crops as dense in detail as those the base learned from (docs/EXPERIMENTS.md)."""
        if self.cfg.photo_short_side:
            return self.cfg.photo_short_side
        if self.cfg.from_scratch:
            return PHOTO_SHORT_SIDE
        return min(load_pretrain_config(None).corpus.short_sides)

    def step_data(self) -> dict:
        crop = self.tile_size()  # shards of the model's tile size
        side = self.photo_short_side()
        self.varsr(
            "data",
            "data",
            "build",
            "--input",
            "corpus",
            "--output",
            "shards",
            "--config",
            str(DEMO_CONFIGS / "data.yaml"),
            "--set",
            f"shard.crop_size={crop}",
            "--set",
            f"shard.resize_short_factor={side / crop:g}",
        )
        from mlflow.tracking import MlflowClient

        from data_pipeline.shards import read_manifest

        manifest, _ = read_manifest(str(self.w / "shards"))
        c = manifest.counts
        client = MlflowClient(tracking_uri=self.tracking_uri)  # the data behind every stage, on the parent run
        for k in ("inputs", "kept", "rejected", "failed", "samples"):
            client.log_metric(self.parent_run_id(), f"data/{k}", float(getattr(c, k)))
        return dict(
            shards=str(self.w / "shards"),
            inputs=c.inputs,
            kept=c.kept,
            rejected=c.rejected_by_reason,
            failed=c.failed_by_reason,
            samples=c.samples,
            shard_files=len(manifest.shards),
            photo_short_side=side,
        )

    def _check_base(self) -> Path:
        from infra.demo.base import check_base

        return check_base(self.cfg.base_dir())

    def step_vqvae(self) -> dict:
        if not self.cfg.from_scratch:
            base = self._check_base()
            self.commands["vqvae"] = []
            return dict(checkpoint=str(base), from_base=True, note="tokenizer of the shipped base")
        self.varsr(
            "vqvae",
            "train",
            "vqvae",
            "--config",
            str(DEMO_CONFIGS / "vqvae.yaml"),
            "--set",
            f"max_steps={self.cfg.vqvae_steps}",
            "--set",
            f"data.batch_size={self.cfg.batch_size}",
            "--resume",
            "auto",
        )
        return dict(checkpoint=str(self.w / "runs" / "vqvae" / "final"))

    def step_stage1(self) -> dict:
        if not self.cfg.from_scratch:
            base = self._check_base()
            self.commands["stage1"] = []
            return dict(checkpoint=str(base), from_base=True, note="stage 1 + 2 pretrained in the shipped base")
        self.varsr(
            "stage1",
            "train",
            "c2i",
            "--config",
            str(DEMO_CONFIGS / "stage1.yaml"),
            "--set",
            f"max_steps={self.cfg.stage1_steps}",
            "--set",
            f"data.batch_size={self.cfg.batch_size}",
            "--set",
            f"seed={self.cfg.seed}",
            "--resume",
            "auto",
        )
        return dict(checkpoint=str(self.w / "runs" / "stage1" / "final"))

    def step_stage2(self) -> dict:
        c = self.cfg
        if c.from_scratch:
            init = ["model.init_from=runs/stage1/final", "model.vqvae_checkpoint=runs/vqvae/final"]
            lr = c.stage2_lr or 1e-3
        else:
            init = [f"model.init_from={self._check_base()}"]
            lr = c.stage2_lr or 2e-4
        sets = [
            *init,
            f"model.preset={self.preset()}",
            f"max_steps={c.stage2_steps}",
            f"optim.lr={lr}",
            f"data.batch_size={c.batch_size}",
            f"seed={c.seed}",
            f"register.name={c.register_name}",
            f"register.alias={c.alias}",
            # the registered version carries the demo's sampling settings as its own defaults (sampling.json):
            # `varsr upscale` and the endpoint use them when a call gives no params
            f"register.sampling.cfg={c.cfg}",
            f"register.sampling.color_fix={c.color_fix}",
        ]
        self.varsr(
            "stage2",
            "train",
            "isr",
            "--config",
            str(DEMO_CONFIGS / "stage2.yaml"),
            *[a for kv in sets for a in ("--set", kv)],
            "--resume",
            "auto",
        )
        return dict(
            checkpoint=str(self.w / "runs" / "stage2" / "final"),
            model_uri=self.model_uri,
            init=init[0].split("=", 1)[1],
            lr=lr,
        )

    def step_serve(self) -> dict:
        """Serve the registered model on loopback and send one real HTTP request with the held-out LR."""
        import requests
        from PIL import Image

        from inference.serve import background_server

        port = self.cfg.port or free_port()
        self.commands["serve"] = ["varsr", "serve", self.model_uri, "--port", str(port), "--host", "127.0.0.1"]
        self.log(f"    $ {' '.join(self.commands['serve'])}   (background)")
        try:
            server = background_server(
                self.model_uri,
                port,
                cwd=self.w,
                env=self.env(),
                log_path=self.w / "logs" / "serve.log",
                tmp_dir=self.w / "tmp-serve",
            )
            with server as url:
                lr_path = Path(self.state()["corpus"]["info"]["holdout_lr"])
                payload: dict[str, Any] = {
                    "dataframe_split": {
                        "columns": ["image"],
                        "data": [[base64.b64encode(lr_path.read_bytes()).decode()]],
                    },
                    "params": {"scale": 4, "seed": self.cfg.seed, "cfg": self.cfg.cfg, "color_fix": self.cfg.color_fix},
                }
                t = time.monotonic()
                r = requests.post(f"{url}/invocations", json=payload, timeout=600)
                latency = time.monotonic() - t
                if r.status_code != 200:
                    raise UserError(f"the served model answered HTTP {r.status_code}: {r.text[:300]}")
                # and a bad request is refused with a reason, not a stack trace
                bad = requests.post(
                    f"{url}/invocations",
                    json={"dataframe_split": {"columns": ["image"], "data": [["not base64!"]]}},
                    timeout=60,
                )
        except RuntimeError as e:
            raise UserError(f"serving step failed: {e}") from None
        pred = r.json()["predictions"][0]
        img = Image.open(io.BytesIO(base64.b64decode(pred["image"])))
        out = self.w / "outputs" / "http_response.png"
        out.parent.mkdir(exist_ok=True)
        img.save(out)
        lr = Image.open(lr_path)
        expect = (lr.width * 4, lr.height * 4)
        if img.size != expect:
            raise UserError(f"HTTP answer has size {img.size}, expected {expect}")
        self._log_child(
            "serve",
            [self.model_uri],
            tags={"varsr.model_uri": self.model_uri},
            params={
                "endpoint": "/invocations",
                "scale": 4,
                "seed": self.cfg.seed,
                "cfg": self.cfg.cfg,
                "color_fix": self.cfg.color_fix,
            },
            metrics={
                "http/status": r.status_code,
                "http/latency_s": latency,
                "http/bad_request_status": bad.status_code,
            },
            artifacts={"serve": [out]},
        )
        return dict(
            url=url,
            status=r.status_code,
            latency_s=round(latency, 2),
            response_image=str(out),
            size=list(img.size),
            bad_request_status=bad.status_code,
            bad_request_message=_message(bad)[:200],
        )

    def step_upscale(self) -> dict:
        """Upscale the held-out photo through the CLI; write bicubic + side-by-side comparison; figures vs HR."""
        from PIL import Image

        info = self.state()["corpus"]["info"]
        lr_path, hr_path = Path(info["holdout_lr"]), Path(info["holdout_hr"])
        out_dir = self.w / "outputs"
        self.varsr(
            "upscale",
            "upscale",
            str(lr_path),
            "-o",
            str(out_dir / "varsr"),
            "--model-uri",
            self.model_uri,
            "--scale",
            "4",
            "--seed",
            str(self.cfg.seed),
            "--cfg",
            str(self.cfg.cfg),
            "--color-fix",
            self.cfg.color_fix,
        )
        sr_path = next((out_dir / "varsr").glob(lr_path.stem + "*"))
        lr, hr, sr = (Image.open(p).convert("RGB") for p in (lr_path, hr_path, sr_path))
        bic = lr.resize(hr.size, Image.Resampling.BICUBIC)
        bic_path = out_dir / "bicubic.png"
        bic.save(bic_path)
        cmp_path = out_dir / "comparison.png"
        side_by_side(
            [lr.resize(hr.size, Image.Resampling.NEAREST), bic, sr.resize(hr.size), hr],
            ["LR (nearest)", "bicubic", "VARSR", "HR"],
        ).save(cmp_path)
        metrics = upscale_figures(sr.resize(hr.size), bic, hr)
        sr_named = out_dir / f"{hr_path.stem.replace('_hr', '')}_sr.png"  # the SR output, named for what it is
        shutil.copyfile(sr_path, sr_named)
        self._log_child(
            "upscale",
            [self.model_uri, hr_path.stem.replace("_hr", "")],
            tags={"varsr.model_uri": self.model_uri},
            params={
                "scale": 4,
                "seed": self.cfg.seed,
                "cfg": self.cfg.cfg,
                "color_fix": self.cfg.color_fix,
                "lr_size": f"{lr.width}x{lr.height}",
                "hr_size": f"{hr.width}x{hr.height}",
            },
            metrics=metrics,
            artifacts={"upscale": [cmp_path, bic_path, sr_named]},
            data=(lr_path, "evaluation"),
        )
        self.log(format_figures(metrics))
        # the small real set, scored by the one evaluation command (docs/EVALUATION.md): the same table as the README's
        suite_dir = out_dir / "eval-bundled"
        self.varsr(
            "eval",
            "eval",
            "--suite",
            "bundled",
            "--model-uri",
            self.model_uri,
            "--baseline",
            "bicubic",
            "-o",
            str(suite_dir),
            "--seed",
            str(self.cfg.seed),
            "--cfg",
            str(self.cfg.cfg),
            "--color-fix",
            self.cfg.color_fix,
        )
        if not (suite_dir / "table.md").is_file():  # the command printed the table above; it must also be on disk
            raise UserError(f"varsr eval --suite bundled wrote no {suite_dir / 'table.md'}")
        return dict(
            sr=str(sr_path),
            bicubic=str(bic_path),
            comparison=str(cmp_path),
            cfg=self.cfg.cfg,
            color_fix=self.cfg.color_fix,
            suite_table=str(suite_dir / "table.md"),
            **{k: round(float(v), 3) for k, v in metrics.items()},
        )

    def _log_child(
        self,
        kind: str,
        details: list,
        *,
        tags: dict,
        params: dict,
        metrics: dict,
        artifacts: dict[str, list[Path]],
        data: tuple[Path, str] | None = None,
    ) -> str:
        """A finished child run of the demo's parent: params, metrics, artifacts and (optionally) its input image."""
        import hashlib

        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        from infra.core.tracking import dataset_input, end_run, portable_ref

        rid = self.child_run(kind, *details, tags=tags)
        client = MlflowClient(tracking_uri=self.tracking_uri)
        ts = int(time.time() * 1000)
        client.log_batch(
            rid,
            metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()],
            params=[Param(k, str(v)) for k, v in params.items()],
        )
        for folder, files in artifacts.items():
            for f in files:
                client.log_artifact(rid, str(f), artifact_path=folder)
        if data is not None:
            path, context = data
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            client.log_inputs(rid, datasets=[dataset_input(portable_ref(path, self.w), digest, context=context)])
        end_run(self.tracking_uri, rid)
        return rid

    # ---- driver ---------------------------------------------------------------------------------------------------
    def run(self, only: list[str] | None = None) -> dict:
        if self.cfg.fresh and self.w.exists():
            self.log(f"--fresh: removing {self.w}")
            shutil.rmtree(self.w)
        self.w.mkdir(parents=True, exist_ok=True)
        st = self.state()
        todo = [s for s in self.steps if only is None or s in only]
        from infra.core.tracking import end_run, relocate_local_store

        if (self.w / "mlflow.db").exists():
            relocate_local_store(self.tracking_uri)  # a moved demo folder: re-point the store before anything reads it
        parent = self.parent_run_id()
        st = self.state()
        try:
            for i, name in enumerate(todo, 1):
                if st.get(name, {}).get("done"):
                    self.log(f"[{i}/{len(todo)}] {name}: done in an earlier run, skipped (use --fresh to redo)")
                    continue
                self.log(f"[{i}/{len(todo)}] {name} ...  (elapsed {time.monotonic() - self.t0:.0f} s)")
                t = time.monotonic()
                info = getattr(self, f"step_{name}")()
                st = self.state()
                st[name] = dict(
                    done=True,
                    seconds=round(time.monotonic() - t, 1),
                    info=info,
                    command=" ".join(self.commands.get(name, [])),
                )
                self._save_state(st)
                self.log(f"[{i}/{len(todo)}] {name}: ok in {st[name]['seconds']} s")
        except BaseException:
            end_run(self.tracking_uri, parent, "FAILED")
            raise
        if all(st.get(k, {}).get("done") for k in self.steps):
            end_run(self.tracking_uri, parent, "FINISHED")
        summary = self.summary(st)
        (self.w / "summary.json").write_text(json.dumps(summary, indent=2))
        self.log(format_summary(summary))
        return summary

    def summary(self, st: dict) -> dict:
        return dict(
            workdir=str(self.w),
            tracking_uri=self.tracking_uri,
            model_uri=self.model_uri,
            mlflow_ui=f"mlflow ui --backend-store-uri {self.tracking_uri} --host 127.0.0.1 --port 5000",
            total_seconds=round(sum(st[k].get("seconds", 0) for k in self.steps if k in st), 1),
            steps={k: st[k] for k in self.steps if k in st},
        )


# ---- helpers --------------------------------------------------------------------------------------------------------
def write_holdout(d: Path, lr_side: int) -> tuple[Path, Path]:
    """A real photo kept out of training (scikit-image's stereo motorcycle, left view): HR and its x4 bicubic LR."""
    import skimage.data as sd
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    left = Image.fromarray(sd.stereo_motorcycle()[0])
    w, h = left.size
    lr_w, lr_h = lr_side, max(8, round(lr_side * h / w))
    hr = left.resize((lr_w * 4, lr_h * 4), Image.Resampling.LANCZOS)
    lr = hr.resize((lr_w, lr_h), Image.Resampling.BICUBIC)
    hr_path, lr_path = d / "motorcycle_hr.png", d / "motorcycle_lr.png"
    hr.save(hr_path)
    lr.save(lr_path)
    return hr_path, lr_path


def upscale_figures(sr, bic, hr) -> dict[str, float]:
    """PSNR-Y / SSIM-Y (BT.601, the paper's tables) and high-frequency energy of VARSR and bicubic against the HR."""
    from infra.core.metrics import hf_energy
    from infra.demo.quality import sr_figures

    out = {}
    for name, img in (("varsr", sr), ("bicubic", bic)):
        out.update({f"{k}_{name}": v for k, v in sr_figures(img, hr).items()})
    out["hf_energy_hr"] = hf_energy(hr)
    # the demo's quality bar (issue: within 3 dB PSNR-Y of bicubic, and high-frequency energy closer to the HR's)
    out["psnr_y_gap_to_bicubic_db"] = out["psnr_y_varsr"] - out["psnr_y_bicubic"]
    out["quality_bar_met"] = float(
        out["psnr_y_gap_to_bicubic_db"] >= -3.0 and abs(out["hf_gap_db_varsr"]) < abs(out["hf_gap_db_bicubic"])
    )
    return out


def format_figures(m: dict) -> str:
    """The held-out figures as a small table (VARSR beside bicubic)."""
    rows = [("", "PSNR-Y dB", "SSIM-Y", "HF energy", "HF gap dB")]
    for name in ("varsr", "bicubic"):
        rows.append(
            (
                name,
                f"{m[f'psnr_y_{name}']:.2f}",
                f"{m[f'ssim_y_{name}']:.3f}",
                f"{m[f'hf_energy_{name}']:.1f}",
                f"{m[f'hf_gap_db_{name}']:.2f}",
            )
        )
    rows.append(("HR", "", "", f"{m['hf_energy_hr']:.1f}", "0"))
    table = "\n".join("    " + "  ".join(f"{c:>10}" for c in r) for r in rows)
    if "quality_bar_met" not in m:
        return table
    verdict = "met" if m["quality_bar_met"] else "NOT met"
    return (
        table + f"\n    quality bar (PSNR-Y within 3 dB of bicubic, HF energy closer to the HR's): {verdict} "
        f"(PSNR-Y {m['psnr_y_gap_to_bicubic_db']:+.2f} dB vs bicubic)"
    )


def side_by_side(images, titles):
    from PIL import Image, ImageDraw

    w, h = images[0].size
    pad = 14
    canvas = Image.new("RGB", (w * len(images), h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (im, t) in enumerate(zip(images, titles)):
        canvas.paste(im.convert("RGB").resize((w, h)), (i * w, pad))
        draw.text((i * w + 2, 1), t, fill="black")
    return canvas


def _interesting(line: str) -> bool:
    """Which subprocess lines reach the terminal (everything goes to the step log)."""
    s = line.strip()
    return bool(s) and not s.startswith(("[W", "W11", "I11")) and "Warning" not in s and "warn(" not in s


def _message(r) -> str:
    try:
        return json.loads(r.text).get("message", r.text)
    except ValueError:
        return r.text


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def format_summary(s: dict) -> str:
    st = s["steps"]
    rows = [("step", "seconds", "result")]
    for k, v in st.items():
        info = v.get("info", {})
        res = {
            "corpus": lambda info: (
                f"{info.get('files')} files ({len(info.get('bad_files', []))} bad), holdout {info.get('holdout_lr')}"
            ),
            "data": lambda info: (
                f"{info.get('inputs')} inputs -> {info.get('kept')} kept, "
                f"rejected {info.get('rejected')}, "
                f"failed {info.get('failed')}; {info.get('samples')} samples in {info.get('shard_files')} "
                f"shards at {info.get('shards')}"
            ),
            "vqvae": lambda info: (
                ("from the shipped base " if info.get("from_base") else "") + str(info.get("checkpoint"))
            ),
            "stage1": lambda info: (
                ("from the shipped base " if info.get("from_base") else "") + str(info.get("checkpoint"))
            ),
            "stage2": lambda info: f"{info.get('checkpoint')} -> {info.get('model_uri')}",
            "serve": lambda info: (
                f"HTTP {info.get('status')} {info.get('size')} in {info.get('latency_s')} s; "
                f"bad request -> {info.get('bad_request_status')}"
            ),
            "upscale": lambda info: (
                f"{info.get('comparison')} (PSNR-Y VARSR {info.get('psnr_y_varsr')} dB, "
                f"bicubic {info.get('psnr_y_bicubic')} dB; HF energy VARSR "
                f"{info.get('hf_energy_varsr')}, bicubic {info.get('hf_energy_bicubic')}, "
                f"HR {info.get('hf_energy_hr')})"
            ),
        }.get(k, lambda info: "")(info)
        rows.append((k, str(v.get("seconds", "")), str(res)))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = ["", "VARSR demo summary", "=" * 18]
    lines += [f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows]
    lines += [
        "",
        f"work folder : {s['workdir']}",
        f"MLflow      : {s['tracking_uri']}",
        f"model       : {s['model_uri']}",
        f"MLflow UI   : {s['mlflow_ui']}",
        f"total       : {s['total_seconds']} s",
        "",
    ]
    lines.append("Each step alone:")
    for v in st.values():
        if v.get("command"):
            lines.append(f"  {v['command']}")
    return "\n".join(lines)


def config_from_args(args) -> DemoConfig:
    kw = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig) if getattr(args, f.name, None) is not None
    }
    return DemoConfig(**kw)
