"""Tangential-damping CFG (TCFG, 2025): the guide prediction reduced to its component along the main direction of
the pair (c, u)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .base import Rule, check_space

__all__ = ["TCFG"]


@dataclass(frozen=True)
class TCFG(Rule):
    """Per guide and row: the 2 x D matrix `[c; u]` (flattened rows) has first right-singular vector `v1`;
    `u' = <u, v1> v1` and `g = c + (w - 1)(c - u')` (CFG with u'). Several guides: each pair (c, u_i) its own
    `v1`, `g = c + sum_i (w_i - 1)(c - u_i')`.

    `v1` comes from the 2 x 2 Gram matrix of (c, u) in float64 (its top eigenvector (a, b) gives
    `v1 = (a c + b u) / s1`), not a D-dimensional SVD; `u'` does not depend on the sign of v1. diffusers'
    `TangentialClassifierFreeGuidance` computes the same with an SVD in float32, and its guider raises
    AttributeError (`is_conditional` reads `_num_outputs_prepared`, which no class defines), so it cannot run in a
    pipeline. Space (None, the default): x0 for the library's denoisers, the model output inside pipelines (where
    diffusers acts); or 'x0', 'eps', 'v' anywhere."""

    space: Optional[str] = None  # None (x0; pipelines: the model output), 'x0', 'eps', 'v'

    name = "tcfg"
    paper = "TCFG (tangential damping), arXiv 2503.18137"
    formula = "v1 = top right-singular vector of [c; u]; g = c + (w - 1)(c - <u, v1> v1)"

    def __post_init__(self):
        check_space(self.space)

    def delta(self, c, u, w, state=None):
        c64, u64 = c.flatten(1).double(), u.flatten(1).double()
        cc, cu, uu = (c64 * c64).sum(1), (c64 * u64).sum(1), (u64 * u64).sum(1)
        gram = torch.stack([torch.stack([cc, cu], -1), torch.stack([cu, uu], -1)], -2)     # [M, 2, 2]
        lam, vec = torch.linalg.eigh(gram)                                                  # ascending
        a, b, top = vec[:, 0, 1], vec[:, 1, 1], lam[:, 1]
        # <u, v1> v1 = ((a <c, u> + b <u, u>) / s1^2) (a c + b u); s1^2 = top eigenvalue (0 only if c = u = 0)
        k = torch.where(top > 0, (a * cu + b * uu) / top.clamp_min(1e-300), torch.zeros_like(top))
        u_proj = (k * a)[:, None] * c64 + (k * b)[:, None] * u64
        return ((w - 1) * (c - u_proj.reshape(u.shape).to(u.dtype))), None
