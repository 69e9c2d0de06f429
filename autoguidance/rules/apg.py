"""Adaptive projected guidance (APG, Sadat et al. 2024): the guidance difference with momentum, a norm bound, and its
part parallel to the main prediction down-weighted."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .base import Rule, check_form, check_number, check_space, project

__all__ = ["APG"]


@dataclass(frozen=True)
class APG(Rule):
    """Per guide, with `D = c - u`:

        avg = D + momentum * avg                 (avg = D at the first call of a sampling run)
        D'  = avg * min(1, norm_threshold / ||avg||)            (skipped when norm_threshold = 0)
        upd = D'_orth + eta * D'_par             (parts orthogonal / parallel to c, in float64)
        g   = c + (w - 1) upd                    (form 'conditional', the paper's)
        g   = u + w upd                          (form 'unconditional', diffusers' AdaptiveProjectedGuidance default)

    The two forms agree only when upd = D (eta = 1, no momentum, no clipping). Norms are per row over all but the
    batch axis. Several guides: each guide difference D_i = c - u_i gets its own momentum, bound and projection, and
    the terms add: `g = c + sum_i (w_i - 1) upd_i` (form 'unconditional': `c + sum_i (w_i upd_i - D_i)`, which is
    `u + w upd` for one guide). The momentum is per image and per sampling run, updated at every guided denoiser
    call (Heun: twice per step) of the rows whose w != 1.

    Space (None, the default): x0 for the library's denoisers (ComfyUI's APG node acts on the denoised predictions),
    the model output inside pipelines (diffusers' guider acts there); or 'x0', 'eps', 'v' anywhere. `norm_threshold`
    is in the units of that space (a norm over every element)."""

    eta:            float = 0.0             # weight of the parallel part (1: the plain difference)
    norm_threshold: float = 0.0             # r: bound on ||D|| per row (0: no bound)
    momentum:       float = 0.0             # beta of the running average (the paper uses negative values; 0: none)
    space:          Optional[str] = None    # None (x0; pipelines: the model output), 'x0', 'eps', 'v'
    form:           str = "conditional"     # 'conditional' (paper) or 'unconditional' (diffusers)

    name = "apg"
    paper = "Sadat et al. 2024, arXiv 2410.02416"
    formula = "g = c + (w - 1)(D_orth + eta D_par), D = clip_r(momentum avg of c - u)"

    def __post_init__(self):
        check_number(self.eta, "eta")
        check_number(self.norm_threshold, "norm_threshold", 0.0)
        check_number(self.momentum, "momentum")
        check_space(self.space)
        check_form(self.form)

    @property
    def stateful(self) -> bool:
        return self.momentum != 0

    def delta(self, c, u, w, state=None):
        diff = c - u
        d = diff
        new = None
        if self.momentum != 0:
            d = d + self.momentum * state if state is not None else d
            new = d
        if self.norm_threshold > 0:
            norm = torch.linalg.vector_norm(d, dim=list(range(1, d.ndim)), keepdim=True)
            d = d * torch.minimum(torch.ones_like(norm), self.norm_threshold / norm)
        par, orth = project(d, c)
        upd = orth + self.eta * par
        if self.form == "conditional":
            return (w - 1) * upd, new
        return w * upd - diff, new
