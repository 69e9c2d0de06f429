"""Rescaled guidance (Lin et al. 2023, Sec. 3.4): the guided prediction brought back to the main prediction's spread."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Rule, check_number, check_space

__all__ = ["Rescale"]


@dataclass(frozen=True)
class Rescale(Rule):
    """`g' = phi g std(c) / std(g) + (1 - phi) g`, std per row over all but the batch axis (unbiased, as torch's and
    diffusers' `rescale_noise_cfg`), after the linear combination `g = c + sum_i (w_i - 1)(c - u_i)`.

    Several guides: the linear sum of every guide's term, rescaled once against the main prediction c. A row whose
    g is constant (std 0) keeps g (no spread to match). Space: x0 by default; diffusers rescales the model output
    (its `guidance_rescale`: eps for epsilon models, v for flow models), so use `space='eps'` / `'v'` to match it."""

    phi:   float = 0.7                 # how much of the rescaled prediction to mix in (Lin et al. use 0.7)
    space: str = "x0"                  # 'x0', 'eps' or 'v'

    name = "rescale"
    paper = "Lin et al. 2023, arXiv 2305.08891, Sec. 3.4 (diffusers: guidance_rescale)"
    formula = "g = c + sum_i (w_i - 1)(c - u_i); g' = phi g std(c)/std(g) + (1 - phi) g"

    def __post_init__(self):
        check_number(self.phi, "phi", 0.0, 1.0)
        check_space(self.space)

    def delta(self, c, u, w, state=None):
        return (w - 1) * (c - u), None

    def finish(self, c, g):
        dims = list(range(1, g.ndim))
        std_c, std_g = c.std(dim=dims, keepdim=True), g.std(dim=dims, keepdim=True)
        ratio = torch.where(std_g > 0, std_c / std_g.clamp_min(torch.finfo(g.dtype).tiny), torch.ones_like(std_g))
        return self.phi * (g * ratio) + (1 - self.phi) * g
