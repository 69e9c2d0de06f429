"""Rescaled guidance (Lin et al. 2023, Sec. 3.4): the guided prediction brought back to the main prediction's spread;
as a rule of its own, and after another rule (diffusers' guiders' `guidance_rescale`, a pipeline's own)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .base import Rule, check_number, check_space
from .linear import Linear

__all__ = ["Rescale", "rescale", "with_rescale"]


def rescale(c: torch.Tensor, g: torch.Tensor, phi: float) -> torch.Tensor:
    """`phi g std(c) / std(g) + (1 - phi) g` for `c`, `g` `[N, ...]`, std per row over all but the batch axis
    (unbiased, as torch's and diffusers' `rescale_noise_cfg`); a row whose g is constant (std 0) keeps g."""
    dims = list(range(1, g.ndim))
    std_c, std_g = c.std(dim=dims, keepdim=True), g.std(dim=dims, keepdim=True)
    ratio = torch.where(std_g > 0, std_c / std_g.clamp_min(torch.finfo(g.dtype).tiny), torch.ones_like(std_g))
    return phi * (g * ratio) + (1 - phi) * g


@dataclass(frozen=True)
class Rescale(Rule):
    """`g' = phi g std(c) / std(g) + (1 - phi) g` (`rescale`) after the linear combination
    `g = c + sum_i (w_i - 1)(c - u_i)`.

    Several guides: the linear sum of every guide's term, rescaled once against the main prediction c. Space (None,
    the default): x0 for the library's denoisers, the model output inside pipelines, where a pipeline's own
    `guidance_rescale` acts (eps for epsilon models, v for v-prediction, the velocity for flow models); or 'x0',
    'eps', 'v' anywhere."""

    phi:   float = 0.7                 # how much of the rescaled prediction to mix in (Lin et al. use 0.7)
    space: Optional[str] = None        # None (x0; pipelines: the model output), 'x0', 'eps', 'v'

    name = "rescale"
    paper = "Lin et al. 2023, arXiv 2305.08891, Sec. 3.4 (diffusers: guidance_rescale)"
    formula = "g = c + sum_i (w_i - 1)(c - u_i); g' = phi g std(c)/std(g) + (1 - phi) g"

    def __post_init__(self):
        check_number(self.phi, "phi", 0.0, 1.0)
        check_space(self.space)

    def delta(self, c, u, w, state=None):
        return (w - 1) * (c - u), None

    def finish(self, c, g):
        return rescale(c, g, self.phi)


@dataclass(frozen=True)
class _ThenRescale(Rule):
    """`rule`, then its result rescaled against c by `phi` (`with_rescale`); state, zero-init and space are
    `rule`'s."""

    rule: Rule
    phi:  float

    name = "rescaled"

    @property
    def space(self):
        return self.rule.space

    @property
    def stateful(self) -> bool:
        return self.rule.stateful

    @property
    def zero_init_steps(self) -> int:
        return self.rule.zero_init_steps

    def in_space(self, space) -> Rule:
        return _ThenRescale(self.rule.in_space(space), self.phi)

    def delta(self, c, u, w, state=None):
        return self.rule.delta(c, u, w, state)

    def finish(self, c, g):
        return rescale(c, self.rule.finish(c, g), self.phi)

    def describe(self) -> str:
        return f"{self.rule.describe()} then rescale(phi={self.phi!r})"


def with_rescale(rule: Rule, phi: float) -> Rule:
    """`rule` followed by the rescale of phi (Lin et al. 2023) against the main prediction, in `rule`'s space: what
    diffusers' guiders do with their `guidance_rescale` after their own combination (APG, CFG-Zero*, MAMBO-G, ...).
    `Rescale(phi)` for the linear rule (the same formula); phi = 0 is `rule` itself. A `Rescale` rule is refused:
    two rescales of one prediction, with two phis, is one too many."""
    phi = check_number(phi, "phi", 0.0, 1.0)
    if phi == 0:
        return rule
    if isinstance(rule, Rescale):
        raise ValueError(f"{rule.describe()} and a rescale of phi {phi:g} would rescale the same prediction twice: "
                         "drop one of them (the pipeline's guidance_rescale, or the rule)")
    if type(rule) is Linear:
        return Rescale(phi)
    return _ThenRescale(rule, phi)
