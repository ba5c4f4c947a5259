"""On-the-fly degradation: the training reader degrades each HR crop afresh every epoch, as the research code's
Dataset does (a new blur / noise / resize / JPEG draw per sample and epoch), instead of reading the LR frozen into
the shards at build time.

* The operators and their parameters are the build's own (:mod:`data_pipeline.degrade.realesrgan`), from a named
  preset (``configs/data/<preset>.yaml``'s ``degradation`` section, e.g. ``varsr-mild``).
* The draw is a pure function of (run seed, epoch, sample key) (:func:`online_seed`): a resumed run, a run on
  another number of ranks or DataLoader workers, and a replay all draw exactly the same LR for a sample in an epoch.
* The drawn parameters are JSON (the dict :func:`data_pipeline.degrade.apply_degradation` replays, with the seed),
  so a sample of them can be recorded (:class:`DrawLog`) and replayed by the existing replay code
  (``varsr eval-prepare verify``'s ``apply_degradation``).

HR-only shards (built with ``shard.lr_variants=0``) hold no LR; shards with stored LR can be degraded on the fly too
(their stored LR is then not read).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from infra.core.errors import UserError

from ..config import DegradationConfig
from .realesrgan import degrade


def online_seed(run_seed: int, epoch: int, key: str) -> int:
    """The seed of one sample's draw in one epoch (63 bits of sha256, independent of rank, worker and order)."""
    digest = hashlib.sha256(f"{run_seed}/{epoch}/{key}/online-degradation".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class OnlineDegradation:
    """A named preset's degradation, drawn per (run seed, epoch, sample key)."""

    preset: str
    cfg: DegradationConfig

    @classmethod
    def from_preset(cls, preset: str) -> OnlineDegradation:
        """The ``degradation`` section of ``configs/data/<preset>.yaml``; one line naming the presets otherwise."""
        from ..config import CONFIG_DIR, load_build_config

        names = sorted(p.stem for p in Path(CONFIG_DIR).glob("*.yaml"))
        if preset not in names:
            raise UserError(f"data.degrade={preset!r} is not a degradation preset (presets: {', '.join(names)})")
        return cls(preset, load_build_config(preset).degradation)

    def draw(self, hr: np.ndarray, run_seed: int, epoch: int, key: str) -> tuple[np.ndarray, dict]:
        """HR uint8 (H, W, 3) -> (LR uint8 at H/scale, the parameters that replay it). Always the Real-ESRGAN
        draw (the build's ``clean_variants`` count stored variants; an online draw has no variant index)."""
        seed = online_seed(run_seed, epoch, key)
        lr, params = degrade(hr, self.cfg, seed, variant=self.cfg.clean_variants)
        params["resize_back"] = {"modes": [str(m) for m in self.cfg.resize_back_modes]}
        return lr, params

    def resize_back_rng(self, run_seed: int, epoch: int, key: str) -> random.Random:
        """The per-sample draw of the resize-back mode (``data.lr_upsample=random``), tied to the same seed."""
        return random.Random(online_seed(run_seed, epoch, key))


DRAWS = "degradations.jsonl"  # the run folder's record of drawn parameters (rank 0)


class DrawLog:
    """The parameters drawn for every ``every``-th batch, one JSON line per sample: ``{"batch", "epoch", "key",
    "lr_mode", "params"}`` appended to ``path`` (logged as an MLflow artifact by the trainer). ``every`` <= 0 records
    nothing."""

    def __init__(self, path: Path, every: int):
        self.path, self.every, self.batches = Path(path), int(every), 0

    def __call__(self, batch: dict, epoch: int) -> None:
        self.batches += 1
        if self.every <= 0 or "degradation" not in batch or (self.batches - 1) % self.every:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            for key, mode, params in zip(batch["key"], batch["lr_mode"], batch["degradation"]):
                f.write(
                    json.dumps(
                        {"batch": self.batches, "epoch": epoch, "key": key, "lr_mode": mode, "params": params},
                        sort_keys=True,
                    )
                    + "\n"
                )
