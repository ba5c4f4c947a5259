"""Token sampling (top-k then top-p filtering, then one multinomial draw per token) and the per-image random streams."""

from __future__ import annotations

import hashlib
from typing import Sequence, Union

import torch

_SEED_DOMAIN = b"varsr-image-stream-v1"
GeneratorArg = Union[torch.Generator, Sequence[torch.Generator], None]


def derive_seed(seed: int, *path: int) -> int:
    """A 63-bit seed for the stream named by (seed, *path), e.g. (request seed, image index, tile index).

    Deterministic across processes and platforms (SHA-256 of the integers), and unrelated for different paths, so
    neighbouring images or tiles never share or overlap a stream the way ``seed + index`` seeds could.
    """
    h = hashlib.sha256(_SEED_DOMAIN)
    for v in (seed, *path):
        v = int(v)
        if v < 0:
            raise ValueError(f"seed path entries must be >= 0, got {v}")
        h.update(v.to_bytes(16, "little"))
    return int.from_bytes(h.digest()[:8], "little") >> 1


def stream_generator(seed: int, *path: int, device=None) -> torch.Generator:
    """A torch.Generator on ``device`` seeded with ``derive_seed(seed, *path)``."""
    g = torch.Generator(device=device if device is not None else "cpu")
    g.manual_seed(derive_seed(seed, *path))
    return g


def image_generators(seed: int, count: int, device=None, start: int = 0) -> list[torch.Generator]:
    """Per-image generators for images ``start … start+count−1`` of a request with this seed: image i gets the
    stream (seed, i), whatever batch it is generated in."""
    return [stream_generator(seed, i, device=device) for i in range(start, start + count)]


def resolve_generators(generator: GeneratorArg, batch: int, device) -> list[torch.Generator] | None:
    """The per-image generators ``generate`` samples with.

    - None: the global RNG (None is returned).
    - a list/tuple: one generator per image, used as given (the caller decides the streams, e.g. with
      ``image_generators``); this is how an image gets the same result in any batch.
    - one generator: one base seed is drawn from it and image b gets the stream (base seed, b), so images in a batch
      draw independent noise (as the reference, which samples every image from one global stream).
    """
    if generator is None:
        return None
    if isinstance(generator, torch.Generator):
        base = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        return image_generators(base, batch, device=device)
    gens = list(generator)
    if len(gens) != batch or not all(isinstance(g, torch.Generator) for g in gens):
        raise ValueError(
            f"generator must be one torch.Generator or a list of {batch} (one per image), got {len(gens)} entries"
        )
    dev = torch.device(device)
    for g in gens:
        if g.device.type != dev.type:
            raise ValueError(f"per-image generators must be on the model's device type {dev.type}, got {g.device}")
    return gens


def sample_top_k_top_p(
    logits: torch.Tensor,
    top_k: int = 0,
    top_p: float = 0.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """logits (B, l, V) → sampled indices (B, l) long.

    top_k > 0 keeps logits ≥ the k-th largest; top_p > 0 removes the tokens whose ascending cumulative probability is
    ≤ 1 − top_p (never the most likely one). ``generator`` is one generator or a list with one per batch row.
    With top_k = 1 this is the argmax (ties broken at random among the maxima, as upstream).
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be (B, l, V), got shape {tuple(logits.shape)}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0, got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    B, L, V = logits.shape
    logits = logits.float()
    if top_k == 1:  # greedy (the released default): the argmax, unless a row has tied maxima (then sample below)
        top = logits.max(dim=-1, keepdim=True).values
        if not ((logits == top).sum(dim=-1) > 1).any():
            return logits.argmax(dim=-1)
    logits = logits.clone()
    if 0 < top_k < V:
        kth = logits.topk(int(top_k), dim=-1, largest=True, sorted=True).values[..., -1:]
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    probs = logits.softmax(dim=-1)
    if isinstance(generator, (list, tuple)):
        if len(generator) != B:
            raise ValueError(f"got {len(generator)} generators for a batch of {B}")
        return torch.stack([torch.multinomial(probs[b], 1, generator=g)[:, 0] for b, g in enumerate(generator)])
    return torch.multinomial(probs.view(-1, V), 1, generator=generator).view(B, L)
