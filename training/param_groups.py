"""AdamW parameter groups (docs/MODEL.md §5.4): "D" (decayed) vs "ND" (no weight decay).

"D": trainable parameters with ndim >= 2, name not ending in ``bias`` and containing none of the no-decay name
fragments — so the whole refiner (``diffloss``), ``pos_start``, ``lvl_embed``, ``scale_mul``, gammas/betas and
every 1-D tensor go to "ND", while class_emb, word_embed and the LR-encoder convs are decayed.
"""

from __future__ import annotations

import torch

NO_DECAY_FRAGMENTS = (
    "cls_token",
    "start_token",
    "task_token",
    "cfg_uncond",
    "pos_embed",
    "pos_1LC",
    "pos_start",
    "start_pos",
    "lvl_embed",
    "gamma",
    "beta",
    "ada_gss",
    "moe_bias",
    "scale_mul",
    "diffloss",
)


def is_decayed(name: str, p: torch.Tensor) -> bool:
    return p.ndim >= 2 and not name.endswith("bias") and not any(f in name for f in NO_DECAY_FRAGMENTS)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters (frozen ones, e.g. the VQVAE, are left out)."""
    decay, no_decay, dn, ndn = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_decayed(name, p):
            decay.append(p)
            dn.append(name)
        else:
            no_decay.append(p)
            ndn.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "D", "param_names": dn},
        {"params": no_decay, "weight_decay": 0.0, "name": "ND", "param_names": ndn},
    ]


def torch_groups(groups: list[dict]) -> list[dict]:
    """The groups as torch.optim accepts them (names dropped)."""
    return [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups if g["params"]]
