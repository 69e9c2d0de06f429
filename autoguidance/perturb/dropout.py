"""Dropout at sampling time on chosen module outputs (in-situ autoguidance), with per-row counter-based masks."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch

from ..rng import DropoutMasks, mix_keys, mix_keys_per_salt
from ..schedules import Schedule, as_schedule, check_probability
from .base import Perturbation, _RowSet
from .sites import Where, find_sites

__all__ = ["Dropout"]

@dataclass(frozen=True, eq=False)
class Dropout(Perturbation):
    """Dropout on the outputs of the chosen modules, rescaled by 1/(1-p) (in-situ autoguidance, p = 0.1).

    mode 'element' drops single activations (as torch.nn.Dropout); 'channel' drops whole channels (axis 1) of
    conv features. Default sites: every `torch.nn.Dropout` module (where a net trained with dropout has it)."""

    p: Union[float, Schedule] = 0.1
    where: Where = None
    mode: str = "element"
    name = "dropout"

    def __post_init__(self):
        object.__setattr__(self, "p", as_schedule(self.p, "dropout probability p", check_probability))
        if self.mode not in ("element", "channel"):
            raise ValueError(f"dropout mode must be 'element' or 'channel', got {self.mode!r}")

    def sites(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        return find_sites(model, self.where, default=torch.nn.Dropout)

    def _hooks(self, model, rows, keys, sigma):
        sites, idx, p = self._sites_and_rows(model, self.p, rows, sigma)
        if len(idx) == 0:
            return []
        hooks = []
        degraded = _RowSet(idx)
        masks = DropoutMasks(p)                              # p's thresholds and multipliers, once for all sites
        all_keys = mix_keys_per_salt(mix_keys(keys[idx], 0xD120), range(len(sites)))   # [sites, M]
        for site_index, (path, module) in enumerate(sites):

            def hook(mod, inp, out, site_keys=all_keys[site_index]):
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"dropout site {type(mod).__name__} returns {type(out).__name__}, not a tensor; "
                                    "choose a module whose output is a tensor")
                shape = list(out.shape[1:])
                if self.mode == "channel" and out.ndim > 2:
                    shape = [shape[0]] + [1] * (out.ndim - 2)
                site_keys = site_keys.to(out.device)

                def scale(i, j):                                       # [j - i, *shape]: 0 or 1/(1-p)
                    return masks.scale(site_keys[i:j], shape, rows=slice(i, j)).to(out.dtype)
                rows = max(1, _DROPOUT_CHUNK // max(1, math.prod(shape)))
                return degraded.put_product(out, scale, rows)                   # exact rows untouched

            hooks.append((module, hook))
        return hooks


#: elements per chunk of a dropout site's multipliers (int32 hash state and result: ~1.5 MB, cache-sized)
_DROPOUT_CHUNK = 1 << 18
