"""The one contract everything composes around, and EDM preconditioning.

A **denoiser** is any callable

    D(x, sigma, labels=None) -> x0_hat

in the EDM convention (Karras et al. 2022): `x` is a batch `[N, ...]` of noisy samples at noise level `sigma`
(a scalar or a per-sample `[N]` tensor), the output is the clean-data prediction, of `x`'s shape. `labels` is
`None` (unconditional) or an `[N, label_dim]` tensor (one-hot or embedding rows); **a row of zeros means
"no label"**, as in EDM2, so conditional and unconditional passes of one net can share one batched call.

Samplers only ever see a denoiser, and a guided denoiser (`autoguidance.guidance`) is again a denoiser.
"""
from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import torch

__all__ = ["Denoiser", "EDMPrecond", "as_sigma", "check_x", "check_labels", "score_from_denoiser"]


@runtime_checkable
class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, sigma, labels: Optional[torch.Tensor] = None) -> torch.Tensor: ...


def check_x(x, ndim: Optional[int] = None, name: str = "x") -> torch.Tensor:
    """Raise a clear error unless `x` is a floating tensor with a batch axis (and `ndim` axes if given)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 1 or (ndim is not None and x.ndim != ndim):
        want = f"{ndim} axes" if ndim is not None else "a batch axis"
        raise ValueError(f"{name} must have {want} ([N, ...]), got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def as_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a noise level to a per-sample `[N]` tensor of `x`'s dtype; reject non-positive or non-finite."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    elif s.ndim != 1 or s.shape[0] != x.shape[0]:
        raise ValueError(f"sigma must be a scalar or a per-sample tensor of shape [{x.shape[0]}], "
                         f"got shape {list(s.shape)}")
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError("sigma must be finite and > 0 for a denoiser call "
                         "(the sampler never evaluates D at sigma = 0)")
    return s


def check_labels(labels, n: int) -> Optional[torch.Tensor]:
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor) or labels.ndim != 2 or labels.shape[0] != n:
        got = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be None or a tensor of shape [{n}, label_dim] "
                         f"(one-hot rows; a zero row means unconditional), got {got}")
    return labels


def _expand(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def score_from_denoiser(D, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
    """`grad_x log p(x; sigma) = (D(x; sigma) - x) / sigma^2` (Tweedie)."""
    s = as_sigma(sigma, x)
    return (D(x, s, labels) - x) / _expand(s, x) ** 2


class EDMPrecond(torch.nn.Module):
    """EDM preconditioning of a raw network `F(x_in, c_noise, labels)` (Karras et al. 2022, Table 1):

        D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))
        c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)     c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
        c_in   = 1 / sqrt(sigma^2 + sigma_data^2)            c_noise = ln(sigma) / 4
    """

    def __init__(self, raw: torch.nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.raw = raw
        self.sigma_data = sigma_data

    def coefficients(self, sigma: torch.Tensor):
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        check_x(x)
        sigma = as_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F = self.raw(_expand(c_in, x) * x, c_noise, labels)
        return _expand(c_skip, x) * x + _expand(c_out, x) * F.to(x.dtype)
