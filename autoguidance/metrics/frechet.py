"""Frechet distance between Gaussian fits of two feature sets (FID's formula; here in the digits classifier's
feature space, "FD_digits"):

    FD = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))

Statistics are accumulated in float64 with the unbiased covariance (divide by N - 1). The trace of the matrix
square root is computed from symmetric eigendecompositions, `Tr (S_r S_g)^(1/2) = sum_i sqrt(lambda_i)` with
`lambda_i` the eigenvalues of `S_r^(1/2) S_g S_r^(1/2)` (same spectrum as `S_r S_g`), which is deterministic and
never returns complex noise. FD is biased upwards for small N: compare numbers at the same N and seeds.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["feature_stats", "frechet_distance", "frechet_distance_features"]


def _as_float64(f) -> np.ndarray:
    a = f.detach().cpu().double().numpy() if isinstance(f, torch.Tensor) else np.asarray(f, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"features must be an [N, dim] array with N >= 2, got shape {list(a.shape)}")
    if not np.isfinite(a).all():
        raise ValueError("features contain NaN or inf: the generator produced non-finite images?")
    return a


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """`[N, dim]` features -> `(mu [dim], sigma [dim, dim])`, float64, unbiased covariance."""
    a = _as_float64(features)
    mu = a.mean(0)
    d = a - mu
    return mu, d.T @ d / (len(a) - 1)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((s + s.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FD between `N(mu1, sigma1)` and `N(mu2, sigma2)` (means `[dim]`, covariances `[dim, dim]`)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    r = _sqrt_psd(s1)
    lam = np.linalg.eigvalsh((r @ s2 @ r + (r @ s2 @ r).T) / 2)
    tr_covmean = np.sqrt(np.clip(lam, 0.0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def frechet_distance_features(real, fake) -> float:
    """FD between two `[N, dim]` feature sets."""
    return frechet_distance(*feature_stats(real), *feature_stats(fake))
