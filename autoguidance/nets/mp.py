"""Magnitude-preserving primitives of EDM2 (Karras et al. 2024, "Analyzing and Improving the Training Dynamics
of Diffusion Models", Sec. 3 and App. B), shared by the toy MLPs and the EDM2 U-Net.

Forced weight normalisation: in training mode a layer renormalises its stored weight in place before use, so
each output channel's weight vector keeps unit norm on average; the effective weight is always normalised
again (and divided by sqrt(fan_in)). This is why a model must never be put in `train()` just to switch on
dropout: doing so rewrites its weights.
"""
from __future__ import annotations

import math

import torch

__all__ = ["normalize", "mp_silu", "mp_sum", "mp_cat", "MPSiLU", "MPLinear"]


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """Scale `x` so that each slice along the non-`dim` axes has unit RMS (EDM2 Eq. 47, with eps)."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled to preserve unit magnitude for unit-Gaussian input (EDM2 Eq. 81)."""
    return torch.nn.functional.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving interpolation `lerp(a, b, t) / sqrt((1-t)^2 + t^2)` (EDM2 Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation with balance `t` (EDM2 Eq. 103)."""
    Na, Nb = a.shape[dim], b.shape[dim]
    C = math.sqrt((Na + Nb) / ((1 - t) ** 2 + t**2))
    wa = C / math.sqrt(Na) * (1 - t)
    wb = C / math.sqrt(Nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)


class MPSiLU(torch.nn.Module):
    """`mp_silu` as a module, so it is a named site that hooks (and perturbations) can target."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mp_silu(x)


class MPLinear(torch.nn.Module):
    """Linear layer with forced weight normalisation and no bias (EDM2 App. B.2)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:  # forced weight normalisation: rewrites the stored weight
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight))
        w = normalize(self.weight) / math.sqrt(self.in_features)
        return x @ w.t().to(x.dtype)
