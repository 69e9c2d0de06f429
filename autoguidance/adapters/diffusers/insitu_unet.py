"""`InSituGuidedUNet` (kept for compatibility; prefer `guided_pipeline`) goes in place of `pipe.unet`: the
machinery of `GuidedModelCall` with one degraded pass and no CFG take-over.

    pipe.unet = InSituGuidedUNet(pipe.unet, pipe.scheduler, w=3.0, seeds=range(4))
    images = pipe(batch_size=4, ...).images
    pipe.unet = pipe.unet.unet        # back to the plain unet
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ...guidance import Pass
from ...perturb import Dropout, Perturbation, check_not_compiled
from ...rng import as_seeds, mix_keys
from ...schedules import ScheduleLike, as_schedule
from .model_call import GuidedModelCall, step_salt

__all__ = ["InSituGuidedUNet"]


class InSituGuidedUNet(torch.nn.Module):
    """Compatibility drop-in for `pipe.unet` (in-situ guidance only): `GuidedModelCall` with one degraded pass,
    no CFG take-over (the pipeline's own CFG then combines in-situ-guided predictions), seeds tiled over the
    pipeline's batch. Prefer `autoguidance.adapters.guided_pipeline`, which keeps `pipe.unet` in place."""

    def __init__(self,
        unet:             torch.nn.Module,                   # the pipeline's unet
        scheduler:        Any,                               # the pipeline's scheduler (for sigma(t))
        w:                ScheduleLike = 3.0,                # guidance weight (in-situ paper's w' = 2.0), or w(sigma)
        perturbation:     Optional[Perturbation] = None,     # the degradation; None = Dropout(0.1) at nn.Dropout sites
        *,
        seeds:            Optional[Sequence[int]] = None,    # one seed per image; None = row index
        prediction_type:  Optional[str] = None,              # None = the scheduler's
    ):
        super().__init__()
        self.unet = unet
        self.perturbation = perturbation if perturbation is not None else Dropout(0.1)
        if not isinstance(self.perturbation, Perturbation):
            raise TypeError(f"perturbation must be an autoguidance.perturb.Perturbation, got "
                            f"{type(self.perturbation).__name__}")
        self.w = as_schedule(w)
        self.seeds = as_seeds(seeds) if seeds is not None else None
        check_not_compiled(unet, "InSituGuidedUNet", "unet")
        call = GuidedModelCall(unet, scheduler, prediction_type=prediction_type)
        object.__setattr__(self, "_call", call)
        self.schedule = call.schedule
        self.prediction_type = call.prediction_type
        self._guides = [(Pass(call.net, perturbation=self.perturbation, module=unet), self.w)]

    @property
    def last_rows(self):
        return self._call.last_rows

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            unet = self.__dict__.get("_modules", {}).get("unet")
            if unet is None:
                raise
            return getattr(unet, name)

    def _seeds(self, n: int) -> torch.Tensor:
        seeds = self.seeds if self.seeds is not None else torch.arange(n, dtype=torch.int64)
        if n % len(seeds):
            raise ValueError(f"the unet got a batch of {n} rows for {len(seeds)} seeds: pass one seed per image "
                             "(the batch must be a multiple of the number of seeds)")
        return seeds.repeat(n // len(seeds))

    def _keys(self, n: int, t: torch.Tensor) -> torch.Tensor:
        """The perturbation's per-row keys for a batch of `n` rows at timestep `t`."""
        return mix_keys(self._seeds(n), step_salt(t))

    def forward(self, *args, **kwargs):
        sample = args[0] if args else kwargs.get(self._call.sample_name)
        seeds = self._seeds(sample.shape[0])
        out = self._call.forward(args, kwargs, self._guides, seeds=seeds)
        if out is None:
            return self.unet(*args, **kwargs)
        return out
