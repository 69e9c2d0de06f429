"""CFG-Zero* (2025): the guide prediction scaled by its optimal factor, and a zero output for the first steps."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .base import Rule, check_number, check_space

__all__ = ["CFGZeroStar"]


@dataclass(frozen=True)
class CFGZeroStar(Rule):
    """Per guide: `alpha = <c, u> / ||u||^2` per row (all but the batch axis), `u' = alpha u`,
    `g = u' + w (c - u') = c + (w - 1)(c - u')` (a zero u row has u' = 0 whatever alpha). Several guides: each guide
    its own alpha, `g = c + sum_i (w_i - 1)(c - alpha_i u_i)`.

    Zero-init: the first `zero_init_steps` steps of a sampling run output a zero model output, and no network pass
    is computed there (diffusers' `ClassifierFreeZeroStarGuidance` computes both passes and discards them). A zero
    model output is a zero ODE derivative of the library's samplers: the call returns its input (EDM: D = x, so
    eps = 0; flow: x0 = x_t, so v = 0), whatever `space` is. Needs the sampler's step index (`current_step`; in a
    pipeline, the step of its loop).

    Space (None, the default): x0 for the library's denoisers, the model output inside pipelines (diffusers' choice);
    or 'x0', 'eps', 'v' anywhere (the paper optimises the scale of the flow velocity, `space='v'`)."""

    zero_init_steps: int = 1                # steps at the start of a run whose output is zero (0: none)
    space:           Optional[str] = None   # None (x0; pipelines: the model output), 'x0', 'eps', 'v'

    name = "cfg-zero"
    paper = "CFG-Zero*, arXiv 2503.18886"
    formula = "alpha = <c, u>/||u||^2; g = c + (w - 1)(c - alpha u); first zero_init_steps: zero output"

    def __post_init__(self):
        object.__setattr__(self, "zero_init_steps", check_number(self.zero_init_steps, "zero_init_steps", 0,
                                                                 integer=True))
        check_space(self.space)

    def delta(self, c, u, w, state=None):
        dims = list(range(1, c.ndim))
        uu = (u * u).sum(dim=dims, keepdim=True)
        alpha = torch.where(uu > 0, (c * u).sum(dim=dims, keepdim=True) / uu.clamp_min(torch.finfo(u.dtype).tiny),
                            torch.zeros_like(uu))
        return (w - 1) * (c - alpha * u), None
