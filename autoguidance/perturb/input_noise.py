"""Input noise: the degraded pass sees more noise than the sampler put in (Karras et al. 2024, "+10%")."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from ..rng import hash_normal, mix_keys
from ..schedules import Schedule, as_schedule
from .base import Perturbation, _RowSet, _rows_like, _strength_rows, check_nonnegative

__all__ = ["InputNoise"]

@dataclass(frozen=True, eq=False)
class InputNoise(Perturbation):
    """More noise than the sampler put in (Karras et al. 2024, Sec. 5.1, "+10% input noise"): the degraded pass
    evaluates `D(x + sqrt(s'^2 - s^2) n; s')` with `s' = (1 + k) s` and `n ~ N(0, I)` drawn per row from its key,
    i.e. the net sees a sample of the noise level it is told. k = 0.1 is Karras' D_good, k = 0.2 their D_bad.

    It changes inputs only (`transform_inputs`), so it needs no sites and works on any denoiser."""

    k: Union[float, Schedule] = 0.1   # relative increase of sigma, s' = (1 + k) s, or a Schedule k(sigma)
    name = "input noise"

    def __post_init__(self):
        object.__setattr__(self, "k", as_schedule(self.k, "input noise fraction k", check_nonnegative))

    def transform_inputs(self, x: torch.Tensor, sigma: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor):
        """`x [B, ...]`, `sigma [B]` -> the same with the degraded rows moved to the noise level `(1 + k) sigma`."""
        idx, k = _strength_rows(self.k, rows, sigma)
        if len(idx) == 0:
            return x, sigma
        s = sigma[idx].to(torch.float32)
        s_new = (1 + k) * s
        n = hash_normal(mix_keys(keys[idx], 0x1A9E), x.shape[1:]).to(device=x.device)
        extra = _rows_like((s_new.square() - s.square()).sqrt(), n) * n
        rows = _RowSet(idx)
        return rows.put(x, rows.take(x) + extra.to(x.dtype)), rows.put(sigma, s_new.to(sigma.dtype))

