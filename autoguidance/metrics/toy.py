"""Exact metrics of samples against the toy's known ground truth (no feature network, no proxy).

For samples `x [N, 2]` of class A:
- `mean_logp`: mean true log-density `log p(x; 0)` (higher: samples sit on denser parts of the tree);
- `outlier_rate`: fraction of samples whose true log-density is below the 1% quantile of true samples'
  log-densities (an exact sample has 0.01 by construction);
- `coverage_tv`: total-variation distance between the samples' and the truth's mass over the 127 branch
  segments; a sample belongs to the segment of its most responsible component (0: every branch holds its
  true share; guidance that drops whole branches raises it);
- `sliced_w2`: sliced Wasserstein-2 distance to as many exact samples, over fixed random directions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..toy.mixture import tree_mixture

__all__ = ["ToyReference", "reference", "toy_metrics", "summarize", "METRICS"]

METRICS = ("mean_logp", "outlier_rate", "coverage_tv", "sliced_w2")
_REF_SEED = 20240602     # exact reference samples (quantile, sliced W2); fixed so numbers are comparable
_REF_N = 1 << 17
_DIRECTIONS = 256


@dataclass(frozen=True)
class ToyReference:
    classes: str
    logp_q01: float                 # 1% quantile of true samples' log-densities
    segment_mass: torch.Tensor      # [S] exact mass of each branch segment
    samples: torch.Tensor           # [_REF_N, 2] exact samples
    directions: torch.Tensor        # [2, _DIRECTIONS] unit vectors for sliced W2


@lru_cache(maxsize=None)
def reference(classes: str = "A") -> ToyReference:
    gt = tree_mixture(classes)
    g = torch.Generator().manual_seed(_REF_SEED)
    samples = gt.sample(_REF_N, 0.0, generator=g)
    q = float(torch.quantile(gt.logp(samples), 0.01))
    seg_mass = torch.zeros(int(gt.segment.max()) + 1, dtype=torch.float64).index_add_(0, gt.segment, gt.phi.double())
    angles = torch.rand(_DIRECTIONS, generator=g, dtype=torch.float64) * math.pi
    dirs = torch.stack([angles.cos(), angles.sin()]).float()
    return ToyReference(classes, q, seg_mass, samples, dirs)


def sliced_w2(x: torch.Tensor, y: torch.Tensor, directions: torch.Tensor) -> float:
    """Sliced W2 between two equal-size point sets: sqrt(mean over directions of W2^2 of the projections)."""
    if len(x) != len(y):
        raise ValueError(f"sliced_w2 needs equal sizes, got {len(x)} and {len(y)}")
    px = torch.sort(x.double() @ directions.double(), dim=0).values
    py = torch.sort(y.double() @ directions.double(), dim=0).values
    return float((px - py).square().mean().sqrt())


def toy_metrics(x: torch.Tensor, classes: str = "A") -> dict[str, float]:
    """The four exact metrics of samples `x [N, 2]` (N <= 131072). Non-finite samples count as outliers."""
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"samples must be a tensor of shape [N, 2], got {getattr(x, 'shape', type(x))}")
    ref = reference(classes)
    gt = tree_mixture(classes)
    if len(x) > len(ref.samples):
        raise ValueError(f"at most {len(ref.samples)} samples per metric call, got {len(x)}")
    finite = torch.isfinite(x).all(1)
    xf = torch.where(finite[:, None], x, torch.full_like(x, 1e3))  # far away: logp finite but tiny
    logp = gt.logp(xf)
    seg = gt.segment[gt.most_responsible(xf)]
    hist = torch.zeros_like(ref.segment_mass).index_add_(0, seg, torch.ones(len(x), dtype=torch.float64)) / len(x)
    return {
        "mean_logp": float(logp.double().mean()),
        "outlier_rate": float((~finite | (logp < ref.logp_q01)).double().mean()),
        "coverage_tv": float(0.5 * (hist - ref.segment_mass).abs().sum()),
        "sliced_w2": sliced_w2(xf, ref.samples[: len(x)], ref.directions),
    }


def summarize(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation over seeds of each metric."""
    out = {}
    for k in per_seed[0]:
        v = np.array([d[k] for d in per_seed], dtype=np.float64)
        out[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
    return out
