"""Precision, recall, density and coverage in a feature space (Kynkaanniemi et al. 2019; Naeem et al. 2020).

Each sample's k-NN radius is the distance to its k-th nearest neighbour in its own set (itself excluded).

    precision = frac. of fake samples inside some real sample's k-NN ball          (fidelity)
    recall    = frac. of real samples inside some fake sample's k-NN ball          (diversity)
    density   = (1 / kM) sum_fake #{real balls that contain it}                    (fidelity, counts overlaps)
    coverage  = frac. of real samples whose k-NN ball contains some fake sample    (diversity)

This project uses k = 3 for precision/recall and k = 5 for density/coverage. Distances are Euclidean, in
float64. Memory is O(N M): fine for the digits' few thousand samples.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["knn_radii", "prdc"]


def _arr(f) -> np.ndarray:
    a = f.detach().cpu().double().numpy() if isinstance(f, torch.Tensor) else np.asarray(f, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"features must be [N, dim], got shape {list(a.shape)}")
    return a


def _dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(d2, 0.0, None))


def knn_radii(features, k: int) -> np.ndarray:
    """Distance of each row to its k-th nearest other row: `[N, dim] -> [N]`."""
    a = _arr(features)
    if not 1 <= k < len(a):
        raise ValueError(f"k must be in [1, N-1] = [1, {len(a) - 1}], got {k}")
    d = _dist(a, a)
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def prdc(real, fake, k_pr: int = 3, k_dc: int = 5) -> dict[str, float]:
    """`{'precision', 'recall', 'density', 'coverage'}` of `fake [M, dim]` against `real [N, dim]`."""
    r, f = _arr(real), _arr(fake)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"real and fake features differ in dimension: {r.shape[1]} vs {f.shape[1]}")
    d_rf = _dist(r, f)                                   # [N, M]
    rad_r_pr, rad_f_pr = knn_radii(r, k_pr), knn_radii(f, k_pr)
    precision = float((d_rf <= rad_r_pr[:, None]).any(0).mean())
    recall = float((d_rf <= rad_f_pr[None, :]).any(1).mean())
    rad_r_dc = knn_radii(r, k_dc)
    inside = d_rf <= rad_r_dc[:, None]
    density = float(inside.sum() / (k_dc * f.shape[0]))
    coverage = float((d_rf.min(1) <= rad_r_dc).mean())
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}
