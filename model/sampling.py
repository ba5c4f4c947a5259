"""Token sampling (spec §4.3): top-k then top-p (nucleus) filtering, then one multinomial draw per token."""
from __future__ import annotations

import torch


def per_image_generators(generator: torch.Generator | None, batch: int, device) -> list[torch.Generator] | None:
    """One generator per image, all seeded with a single seed drawn from ``generator``.

    This makes an image's randomness independent of its batch: image b of a batch gets exactly the stream it would
    get alone with the same ``generator`` seed. None (global RNG) when no generator is given.
    """
    if generator is None:
        return None
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    gens = []
    for _ in range(batch):
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        gens.append(g)
    return gens


def sample_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                       generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
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
    B, l, V = logits.shape
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
    return torch.multinomial(probs.view(-1, V), 1, generator=generator).view(B, l)
