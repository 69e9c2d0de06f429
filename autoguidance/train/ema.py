"""Power-function EMA (EDM2, Karras et al. 2024, Sec. 3.1 and App. C.2).

The averaging profile at training step t is proportional to tau^gamma on [0, t], so the EMA length scales with
training time. Its width is given as the relative standard deviation `std` (e.g. 0.010 for the toy, 0.050 to
0.200 for images), which maps to the exponent gamma through

    std^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))
    <=> gamma^3 + 7 gamma^2 + (16 - std^-2) gamma + (12 - std^-2) = 0       (largest real root)

and the per-step decay is beta_t = (1 - 1/t)^(gamma + 1), t = 1, 2, ... (so the first average is the net itself).
"""
from __future__ import annotations

import copy

import numpy as np
import torch

__all__ = ["std_to_gamma", "power_function_beta", "PowerFunctionEMA"]


def std_to_gamma(std: float) -> float:
    if not 0 < std < 0.28867513:  # the gamma = 0 (uniform average) limit is sqrt(1/12)
        raise ValueError(f"EMA relative std must be in (0, 0.2887), got {std}")
    inv = std ** -2
    return float(np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv]).real.max())


def power_function_beta(std: float, t: int) -> float:
    """Decay for the update after `t` optimiser steps (t >= 1)."""
    return (1.0 - 1.0 / t) ** (std_to_gamma(std) + 1.0)


class PowerFunctionEMA:
    """One or several power-function EMAs of a model's parameters, kept side by side (EDM2 keeps 2-3 lengths).

    `averages[std]` is an eval-mode copy of the model whose parameters are the average; buffers are copied.
    """

    def __init__(self, model: torch.nn.Module, stds=(0.010,)):
        self.stds = tuple(float(s) for s in stds)
        self._gamma = {s: std_to_gamma(s) for s in self.stds}
        self.averages = {s: copy.deepcopy(model).eval().requires_grad_(False) for s in self.stds}
        self.steps = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.steps += 1
        for s, avg in self.averages.items():
            beta = (1.0 - 1.0 / self.steps) ** (self._gamma[s] + 1.0)
            for p_avg, p in zip(avg.parameters(), model.parameters()):
                p_avg.lerp_(p.detach(), 1.0 - beta)
            for b_avg, b in zip(avg.buffers(), model.buffers()):
                b_avg.copy_(b)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "stds": list(self.stds),
                "averages": {str(s): m.state_dict() for s, m in self.averages.items()}}

    def load_state_dict(self, state: dict) -> None:
        if [float(s) for s in state["stds"]] != list(self.stds):
            raise ValueError(f"EMA state has lengths {state['stds']}, this run uses {list(self.stds)}")
        self.steps = int(state["steps"])
        for s, m in self.averages.items():
            m.load_state_dict(state["averages"][str(s)])
