"""MAMBO-G (2025): the guidance weight shrinks with the size of the guidance difference relative to the guide."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .base import Rule, check_number, check_space

__all__ = ["MAMBO"]


@dataclass(frozen=True)
class MAMBO(Rule):
    """Per guide and row: `r = ||c - u|| / ||u||` (all but the batch axis), `w' = 1 + (w - 1) exp(-alpha r)`,
    `g = c + (w' - 1)(c - u)` (the same as diffusers' `u + w' (c - u)`). Several guides: each its own ratio and
    weight, `g = c + sum_i (w_i' - 1)(c - u_i)`. A zero u row has r = inf (w' = 1) unless c = u there.
    Space (None, the default): x0 for the library's denoisers, the model output inside pipelines (where diffusers
    acts, and where ||u|| differs); or 'x0', 'eps', 'v' anywhere."""

    alpha: float = 8.0       # how fast the weight falls with r (diffusers' default)
    space: Optional[str] = None  # None (x0; pipelines: the model output), 'x0', 'eps', 'v'

    name = "mambo"
    paper = "MAMBO-G, arXiv 2508.03442 (diffusers: MagnitudeAwareGuidance)"
    formula = "r = ||c - u||/||u||; w' = 1 + (w - 1) exp(-alpha r); g = c + (w' - 1)(c - u)"

    def __post_init__(self):
        check_number(self.alpha, "alpha", 0.0)
        check_space(self.space)

    def delta(self, c, u, w, state=None):
        dims = list(range(1, c.ndim))
        diff = c - u
        nd = torch.linalg.vector_norm(diff, dim=dims, keepdim=True)
        nu = torch.linalg.vector_norm(u, dim=dims, keepdim=True)
        r = torch.where(nu > 0, nd / nu.clamp_min(torch.finfo(u.dtype).tiny),
                        torch.where(nd > 0, torch.full_like(nd, float("inf")), torch.zeros_like(nd)))
        return (w - 1) * torch.exp(-self.alpha * r) * diff, None
