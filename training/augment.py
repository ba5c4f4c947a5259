"""Label-preserving augmentation of training crops: RGB channel order, left-right flip, quarter turns.

A base model trained on a few dozen photographs otherwise learns their palette and layout instead of following its
input: the stage-0 tokenizer decodes an unlike photo in its corpus's colours (a red motorcycle as green foliage),
and stage 2 draws those textures on an unseen LR (docs/EXPERIMENTS.md). Each transform maps a valid (HR, LR) pair to
another valid pair, so they are free extra data: an autoencoder must then carry colour and geometry through its
codes, and an SR model must take them from its LR. One draw per crop, applied alike to every tensor of that crop.
Draws come from ``model.sampling.stream_generator(seed, step[, rank])``, so a resumed run sees the batches an
uninterrupted one would.
"""

from __future__ import annotations

import torch


def augment_crops(tensors: list[torch.Tensor], gen: torch.Generator, colour_p: float = 1.0) -> list[torch.Tensor]:
    """``tensors``: batches (B, C, H, W) of the same B crops (e.g. HR and its LR, any sizes). Each crop gets a random
    RGB channel order (with probability ``colour_p``, else the original order), a left-right flip with probability
    1/2 and a random number of quarter turns (only when all its tensors are square, so shapes never change); every
    tensor of a crop gets the same transform."""
    if not tensors:
        return []
    B = tensors[0].shape[0]
    if any(t.shape[0] != B for t in tensors):
        raise ValueError(f"augment_crops: batch sizes differ: {[tuple(t.shape) for t in tensors]}")
    square = all(t.shape[-1] == t.shape[-2] for t in tensors)
    outs: list[list[torch.Tensor]] = [[] for _ in tensors]
    for b in range(B):
        perm = torch.randperm(3, generator=gen)
        if float(torch.rand((), generator=gen)) >= colour_p:
            perm = torch.arange(3)
        flip = bool(torch.randint(2, (1,), generator=gen))
        turns = int(torch.randint(4, (1,), generator=gen)) if square else 0
        for k, t in enumerate(tensors):
            img = t[b][perm.to(t.device)] if t.shape[1] == 3 else t[b]
            if flip:
                img = img.flip(-1)
            outs[k].append(torch.rot90(img, turns, dims=(-2, -1)) if turns else img)
    return [torch.stack(o) for o in outs]
