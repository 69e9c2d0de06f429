"""The 2D toy networks: two families built on one magnitude-preserving MLP trunk.

- `LogDensityMLP`, the papers' toy model (Karras et al. 2024, App. C): the net outputs a scalar log-density,
  the score comes from autograd, and the denoiser is Tweedie's `D = x + sigma^2 * score`.
- `DenoiserMLP`, the form image models take: the net predicts `F`, and `D = c_skip x + c_out F` (EDM precond).

Both take an optional dropout rate `dropout`: a `torch.nn.Dropout` after every hidden activation. The module is
present even at rate 0, so the dropout sites have the same names in every net (`trunk.drop0` ... `trunk.drop3`),
which is where in-situ guidance puts its dropout by default.
"""
from __future__ import annotations

import torch

from ..denoiser import EDMPrecond, as_sigma, check_x
from .mp import MPLinear, MPSiLU

__all__ = ["ToyTrunk", "LogDensityMLP", "DenoiserMLP"]


class ToyTrunk(torch.nn.Module):
    """`[x_in, log(sigma)/4, 1] -> MPLinear -> num_layers x (MPSiLU, Dropout, MPLinear)`: `[N, 2] -> [N, width]`."""

    def __init__(self, in_dim: int = 2, width: int = 64, num_layers: int = 4, dropout: float = 0.0):
        super().__init__()
        self.inp = MPLinear(in_dim + 2, width)
        for i in range(num_layers):
            self.add_module(f"act{i}", MPSiLU())
            self.add_module(f"drop{i}", torch.nn.Dropout(dropout))
            self.add_module(f"fc{i}", MPLinear(width, width))
        self.num_layers = num_layers

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        y = self.inp(torch.cat([x_in, c_noise[:, None], torch.ones_like(c_noise)[:, None]], dim=1))
        for i in range(self.num_layers):
            y = getattr(self, f"fc{i}")(getattr(self, f"drop{i}")(getattr(self, f"act{i}")(y)))
        return y


def _check_inputs(x, labels, name: str) -> None:
    check_x(x, ndim=2, name="x")
    if x.shape[1] != 2:
        raise ValueError(f"{name} takes 2-D points x of shape [N, 2], got {list(x.shape)}")
    if labels is not None:
        raise ValueError(f"{name} is unconditional (trained on one class set) and takes labels=None; "
                         "condition by choosing the checkpoint's class set instead")


class LogDensityMLP(torch.nn.Module):
    """Toy model of Karras et al. (2024), App. C: `log p(x; sigma)` up to a constant, with EDM2 preconditioning

        logp(x; sigma) = gain * mean(y^2) / sigma - |x_in|^2 / 2,   x_in = x / sqrt(sigma_data^2 + sigma^2)

    where `y` is the trunk's output and `gain` a learned scalar starting at 0 (so the initial model is the
    Gaussian N(0, sigma_data^2 + sigma^2)). Calling the module returns the denoiser `D(x; sigma)`.
    """

    family = "toy-logp"

    def __init__(self, width: int = 64, num_layers: int = 4, dropout: float = 0.0, sigma_data: float = 0.5):
        super().__init__()
        self.config = dict(width=width, num_layers=num_layers, dropout=dropout, sigma_data=sigma_data)
        self.sigma_data = sigma_data
        self.trunk = ToyTrunk(2, width, num_layers, dropout)
        self.gain = torch.nn.Parameter(torch.zeros([]))

    def logp(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Unnormalised log-density: `[N, 2] -> [N]`."""
        sigma = as_sigma(sigma, x)
        x_in = x / (self.sigma_data**2 + sigma**2).sqrt()[:, None]
        y = self.trunk(x_in, sigma.log() / 4)
        return self.gain * y.square().mean(1) / sigma - 0.5 * x_in.square().sum(1)

    def score(self, x: torch.Tensor, sigma, create_graph: bool = False) -> torch.Tensor:
        """`grad_x logp` by autograd: `[N, 2] -> [N, 2]`. Works under `torch.no_grad()` too."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.logp(x, sigma).sum(), [x], create_graph=create_graph)
        return g

    def forward(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        _check_inputs(x, labels, "LogDensityMLP")
        sigma = as_sigma(sigma, x)
        return x + sigma[:, None] ** 2 * self.score(x, sigma)


class _DenoiserMLPRaw(torch.nn.Module):
    """Raw network `F(c_in x, c_noise)`: trunk, then MPSiLU, Dropout, MPLinear to 2 outputs, times a gain (init 0)."""

    def __init__(self, width: int, num_layers: int, dropout: float):
        super().__init__()
        self.trunk = ToyTrunk(2, width, num_layers, dropout)
        self.out_act = MPSiLU()
        self.out_drop = torch.nn.Dropout(dropout)
        self.out = MPLinear(width, 2)
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels=None) -> torch.Tensor:
        y = self.trunk(x_in, c_noise)
        return self.out(self.out_drop(self.out_act(y))) * self.out_gain


class DenoiserMLP(EDMPrecond):
    """Plain denoiser MLP with EDM preconditioning: `D = c_skip x + c_out F(c_in x, c_noise)`."""

    family = "toy-denoiser"

    def __init__(self, width: int = 64, num_layers: int = 4, dropout: float = 0.0, sigma_data: float = 0.5):
        super().__init__(_DenoiserMLPRaw(width, num_layers, dropout), sigma_data=sigma_data)
        self.config = dict(width=width, num_layers=num_layers, dropout=dropout, sigma_data=sigma_data)

    def forward(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        _check_inputs(x, labels, "DenoiserMLP")
        return super().forward(x, sigma, None)
