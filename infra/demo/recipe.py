"""The base-model recipe's typed config (configs/demo/pretrain.yaml): read by `varsr demo pretrain` (pretrain.py)
and by `varsr demo`, which finetunes on photos at the scale of the base's corpus (demo.py). It imports neither, so
both can import it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.corpus_debian import PackageSpec
from infra.core.config import load_config
from infra.core.tracking import REPO_ROOT

ROOT = REPO_ROOT  # the checkout: configs and the shipped base are read from it
DEFAULT_CONFIG = ROOT / "configs" / "demo" / "pretrain.yaml"


@dataclass
class CorpusSection:
    packages: list[PackageSpec] = field(default_factory=list)
    eval_packages: list[PackageSpec] = field(default_factory=list)
    short_sides: list[int] = field(default_factory=lambda: [256, 384, 512, 768])
    tile: int = 160


@dataclass
class StageSection:
    steps: int = 100
    lr: float = 1e-3
    batch_size: int | None = None  # None: the recipe's batch_size


@dataclass
class SamplingSection:
    """The sampling defaults the exported base carries (its ``sampling.json``, model/checkpoint.py): what `varsr
    upscale`, the pyfunc and the endpoint use when a call does not say. cfg 0.75 + the wavelet colour fix are the
    settings `varsr demo` upscales with, chosen for this base (docs/EXPERIMENTS.md); the global defaults stay the
    released d24's (cfg 6.0, AdaIN)."""

    cfg: float = 0.75
    color_fix: str = "wavelet"


@dataclass
class PretrainConfig:
    """configs/demo/pretrain.yaml."""

    preset: str = "small"
    corpus: CorpusSection = field(default_factory=CorpusSection)
    data_config: str = "configs/demo/pretrain_data.yaml"
    batch_size: int = 8
    vqvae: StageSection = field(default_factory=lambda: StageSection(300, 3e-4))  # docs/EXPERIMENTS.md: not 1e-3
    stage1: StageSection = field(default_factory=lambda: StageSection(100, 1e-3))
    stage2: StageSection = field(default_factory=lambda: StageSection(400, 1e-3))
    # stage 0b after stage 2: decoder finetune of the tokenizer (steps 0 = off: the base keeps stage 0's decoder)
    decoder: StageSection = field(default_factory=lambda: StageSection(0, 1e-4))
    eval_images: int = 6  # held-out photos scored at export (square crops of eval_hr_side px)
    eval_hr_side: int = 256
    eval_cfg: float = 6.0
    eval_color_fix: str = "adain"  # the release's colour fix; the demo's wavelet fix: --set eval_color_fix=wavelet
    sampling: SamplingSection = field(default_factory=SamplingSection)  # written to the base's sampling.json
    # a shipped base to continue (a native full checkpoint, relative to the repository or absolute): stages 0-1 are
    # taken from it and stage 2 starts from its weights; None = train every stage from nothing
    continue_from: str | None = None
    # stop after the tokenizer step when its colour check (training/stage0_finish.py) says colour is lost: stages 1-2
    # trained on such tokens cannot produce colour, so the hour they take would be wasted (docs/EXPERIMENTS.md)
    require_colour: bool = True


def load_pretrain_config(path: str | Path | None, overrides: Sequence[str] = ()) -> PretrainConfig:
    return load_config(PretrainConfig, path or DEFAULT_CONFIG, list(overrides))
