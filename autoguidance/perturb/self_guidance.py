"""Self-guidance (Li et al. 2024, arXiv 2412.05827): the guide is the same net told a noisier level than its input.

The degraded pass evaluates `D(x; s')` with `s' = (1 + k) s` on the *same* input `x`: the network believes there is
more noise than there is, and its prediction is the (blurrier) posterior mean of a noisier level. The paper's
motivation: a drop in density from the noisier to the cleaner level marks artifacts, and guidance away from the
noisier level's prediction suppresses them. (With `renoise=True` the input is also moved to the level `s'` by fresh
per-row noise, which is `InputNoise(k)`.) The zero-cost variant, SG-prev, reuses the previous step's prediction
and is a stateful wrapper: `autoguidance.guides.PreviousStepGuidance`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from ..schedules import Schedule, as_schedule
from .base import Perturbation, _RowSet, _strength_rows, check_nonnegative
from .input_noise import InputNoise

__all__ = ["NoisierLevel"]


@dataclass(frozen=True, eq=False)
class NoisierLevel(Perturbation):
    """Self-guidance's bad pass: the degraded rows are evaluated at noise level `(1 + k) sigma` on unchanged `x`
    (`renoise=True`: plus fresh noise up to that level, as `InputNoise`). Needs no sites: works on any denoiser."""

    k: Union[float, Schedule] = 0.1
    renoise: bool = False
    name = "noisier level"

    def __post_init__(self):
        object.__setattr__(self, "k", as_schedule(self.k, "self-guidance level shift k", check_nonnegative))

    def transform_inputs(self, x: torch.Tensor, sigma: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor):
        if self.renoise:
            return InputNoise(self.k).transform_inputs(x, sigma, rows, keys)
        idx, k = _strength_rows(self.k, rows, sigma)
        if len(idx) == 0:
            return x, sigma
        r = _RowSet(idx)
        return x, r.put(sigma, ((1 + k) * sigma[idx].to(torch.float32)).to(sigma.dtype))
