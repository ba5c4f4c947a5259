"""Blur kernels of the Real-ESRGAN degradation, written from their definitions.

For a kernel of odd size k on the grid x in {-(k//2)..k//2}^2 with covariance Sigma = R diag(sx^2, sy^2) R^T and
q(x) = x^T Sigma^-1 x:
  gaussian     exp(-q/2)            generalized  exp(-(q^beta)/2)         plateau  1 / (1 + q^beta)
circular sinc (ideal 2-D low-pass with cut-off omega_c): omega_c J1(omega_c r) / (2 pi r), centre omega_c^2/(4 pi).
Every kernel is normalised to sum 1.
"""

from __future__ import annotations

import numpy as np
from scipy.special import j1


def _grid(k: int) -> tuple[np.ndarray, np.ndarray]:
    ax = np.arange(-(k // 2), k // 2 + 1, dtype=np.float64)
    return np.meshgrid(ax, ax)  # xx varies along columns, yy along rows


def quadratic_form(k: int, sigma_x: float, sigma_y: float, rotation: float) -> np.ndarray:
    c, s = np.cos(rotation), np.sin(rotation)
    r = np.array([[c, -s], [s, c]])
    cov = r @ np.diag([sigma_x**2, sigma_y**2]) @ r.T
    inv = np.linalg.inv(cov)
    xx, yy = _grid(k)
    return inv[0, 0] * xx * xx + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy * yy


def mixed_kernel(kind: str, k: int, sigma_x: float, sigma_y: float, rotation: float, beta: float = 1.0) -> np.ndarray:
    """One of iso/aniso/generalized_iso/generalized_aniso/plateau_iso/plateau_aniso (iso: sigma_y = sigma_x)."""
    if kind.endswith("_iso") or kind == "iso":
        sigma_y, rotation = sigma_x, 0.0
    q = quadratic_form(k, sigma_x, sigma_y, rotation)
    if kind.startswith("generalized"):
        ker = np.exp(-0.5 * np.power(q, beta))
    elif kind.startswith("plateau"):
        ker = 1.0 / (np.power(q, beta) + 1.0)
    elif kind in ("iso", "aniso"):
        ker = np.exp(-0.5 * q)
    else:
        raise ValueError(f"unknown kernel type {kind!r}")
    return ker / ker.sum()


def sinc_kernel(k: int, omega_c: float) -> np.ndarray:
    xx, yy = _grid(k)
    r = np.hypot(xx, yy)
    with np.errstate(divide="ignore", invalid="ignore"):
        ker = omega_c * j1(omega_c * r) / (2 * np.pi * r)
    ker[k // 2, k // 2] = omega_c**2 / (4 * np.pi)
    return ker / ker.sum()


def kernel_from_params(p: dict) -> np.ndarray:
    """Rebuild a kernel from the parameters recorded in a sample's JSON."""
    if p["type"] == "sinc":
        return sinc_kernel(p["size"], p["omega_c"])
    return mixed_kernel(p["type"], p["size"], p["sigma_x"], p["sigma_y"], p["rotation"], p.get("beta", 1.0))


def pad_to(ker: np.ndarray, size: int = 21) -> np.ndarray:
    """Zero-pad to size x size (the upstream layout; filtering with the unpadded kernel gives the same result)."""
    p = (size - ker.shape[0]) // 2
    return np.pad(ker, ((p, p), (p, p))) if p > 0 else ker
