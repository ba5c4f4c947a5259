"""Training signal: 150 AdamW steps of the tiny preset on bundled real photos reduce CE and refiner loss, and the
trained model reads its LR input (every photo has label 0, so only the LR prefix tells them apart)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import VARSRConfig, build, compute_loss

skdata = pytest.importorskip("skimage.data")


def real_photos(size: int) -> torch.Tensor:
    """Four bundled photos, centre-cropped square and area-resized to size×size, in [0, 1]."""
    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        a = np.asarray(getattr(skdata, name)(), dtype=np.float32)[..., :3] / 255.0
        h, w = a.shape[:2]
        s = min(h, w)
        a = a[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None]
        out.append(F.interpolate(t, size=(size, size), mode="area"))
    return torch.cat(out).clamp(0, 1)


@pytest.mark.slow
def test_tiny_training_reduces_ce_and_refiner_loss():
    torch.manual_seed(0)
    cfg = VARSRConfig.preset("tiny")
    vqvae, varsr = build(cfg)
    hr = real_photos(cfg.image_size)
    lr = F.interpolate(F.interpolate(hr, scale_factor=0.25, mode="area"), size=hr.shape[-2:], mode="bicubic")
    lr = lr.clamp(0, 1)
    label = torch.zeros(hr.shape[0], dtype=torch.long)
    opt = torch.optim.AdamW(varsr.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    ce, diff = [], []
    varsr.train()
    for _ in range(150):
        out = compute_loss(vqvae, varsr, hr, lr, label, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(varsr.parameters(), 2.0)
        opt.step()
        ce.append(out.ce.item())
        diff.append(out.diff.item())
    first_ce, last_ce = np.mean(ce[:10]), np.mean(ce[-10:])
    first_diff, last_diff = np.mean(diff[:10]), np.mean(diff[-10:])
    print(f"CE {first_ce:.3f} -> {last_ce:.3f}; refiner {first_diff:.3f} -> {last_diff:.3f}")
    assert np.isfinite(ce).all() and np.isfinite(diff).all()
    assert last_ce < 0.5 * first_ce
    assert last_diff < 0.7 * first_diff
    # the LR must reach the transformer: each photo scored with another photo's LR is predicted worse
    varsr.eval()
    with torch.no_grad():
        own = compute_loss(vqvae, varsr, hr, lr, label, generator=torch.Generator().manual_seed(1)).ce.item()
        other = compute_loss(
            vqvae, varsr, hr, lr.roll(1, 0), label, generator=torch.Generator().manual_seed(1)
        ).ce.item()
    print(f"CE with its own LR {own:.3f}, with another photo's LR {other:.3f}")
    assert other > own + 0.5
