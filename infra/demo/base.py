"""The shipped base model the demo finetunes (``model/pretrained/<preset>-base``, docs/DEMO.md): checked through the
checkpoint format's owner (model/checkpoint.py), so the demo never names checkpoint files itself."""

from __future__ import annotations

from pathlib import Path

from infra.core.errors import UserError
from model.checkpoint import is_native_checkpoint


def check_base(base: Path) -> Path:
    """``base`` when it is a native checkpoint folder; otherwise one line on how to make it or do without it."""
    if not is_native_checkpoint(base):
        raise UserError(
            f"the shipped base model is missing at {base} (model.safetensors + config.json); "
            "make it with `varsr demo pretrain --ship model/pretrained/small4-base` or run the demo "
            "with --from-scratch"
        )
    return base
