"""The one contract everything composes around, and EDM preconditioning.

A **denoiser** is any callable

    D(x, sigma, labels=None) -> x0_hat

in the EDM convention (Karras et al. 2022): `x` is a batch `[N, ...]` of noisy samples at noise level `sigma`
(a scalar or a per-sample `[N]` tensor), the output is the clean-data prediction, of `x`'s shape. `labels` is
`None` (unconditional) or an `[N, label_dim]` tensor (one-hot or embedding rows); **a row of zeros means
"no label"**, as in EDM2, so conditional and unconditional passes of one net can share one batched call.
`labels` may also be any batch-first **conditioning structure**: a mapping of tensors named as the model's keyword
arguments (`{"encoder_hidden_states": [N, S, D], "pooled_projections": [N, P], "added_cond_kwargs": {"text_embeds":
..., "time_ids": ...}, "class_labels": [N]}`), nested mappings allowed, every tensor with the batch on axis 0.
Guidance selects and concatenates its rows as one structure (`take_rows`, `cat_rows`, `check_labels`).

**Flow models** (x_t = (1 - t) x0 + t n, t in [0, 1]) are the EDM process scaled: x = x_t / (1 - t),
sigma = t / (1 - t). A denoiser may also offer `flow(x_t, t, labels) -> x0_hat`, the same prediction in t, which
stays finite at t = 1 (pure noise, sigma = inf); `flow_call` uses it, or the EDM form for t < 1.

Samplers only ever see a denoiser, and a guided denoiser (`autoguidance.guidance`) is again a denoiser.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional, Protocol, runtime_checkable

import torch

__all__ = ["Denoiser", "EDMPrecond", "as_sigma", "check_x", "check_labels", "score_from_denoiser", "take_rows",
           "cat_rows", "batch_size", "broadcast_rows", "flow_call", "has_flow", "t_to_sigma", "sigma_to_t",
           "register_guide_check", "check_guide"]


#: functions `(main, guide) -> None or a one-line reason` that refuse a guide made for another main (registered by
#: the library floor: `autoguidance.guidemaker.compat` for the library's nets and diffusers models)
_GUIDE_CHECKS: list = []


def register_guide_check(fn) -> None:
    """Add `fn(main, guide) -> Optional[str]` to the checks `check_guide` runs (a reason string refuses the pair)."""
    if fn not in _GUIDE_CHECKS:
        _GUIDE_CHECKS.append(fn)


def check_guide(main, guide) -> None:
    """Raise ValueError (one line) when `guide` was made for another main than `main` (another sample shape, class
    count or text width), as the registered checks tell; callables they do not know pass."""
    for fn in _GUIDE_CHECKS:
        reason = fn(main, guide)
        if reason:
            raise ValueError(reason)


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
    if isinstance(labels, Mapping):
        check_rows(labels, n)
        return labels
    if not isinstance(labels, torch.Tensor) or labels.ndim != 2 or labels.shape[0] != n:
        got = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be None or a tensor of shape [{n}, label_dim] "
                         f"(one-hot rows; a zero row means unconditional), got {got}")
    return labels


# -- conditioning structures: tensors, or (nested) mappings of tensors, batch on axis 0 ------------------------------

def _leaves(c, prefix: str = ""):
    if isinstance(c, Mapping):
        for k, v in c.items():
            yield from _leaves(v, f"{prefix}{k}" if not prefix else f"{prefix}.{k}")
    elif c is not None:
        yield prefix or "labels", c


def check_rows(cond, n: int, what: str = "labels") -> None:
    """Raise a one-line error unless every tensor of `cond` has `n` rows on axis 0 (naming the key)."""
    for key, v in _leaves(cond):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{what} entry {key!r} must be a tensor with the batch on axis 0, got {type(v).__name__}")
        if v.ndim < 1 or v.shape[0] != n:
            raise ValueError(f"{what} entry {key!r} has shape {list(v.shape)} but the batch has {n} rows: give it "
                             f"{n} rows on axis 0 (one per sample)")


def batch_size(cond) -> Optional[int]:
    """Rows of the first tensor of `cond` (None if it holds no tensor)."""
    for _, v in _leaves(cond):
        return int(v.shape[0])
    return None


def take_rows(cond, rows: torch.Tensor):
    """`cond` with every tensor cut to `rows` (a tensor, a mapping of them, or None)."""
    if cond is None:
        return None
    if isinstance(cond, Mapping):
        return {k: take_rows(v, rows) for k, v in cond.items()}
    return cond[rows]


def cat_rows(parts: list):
    """Concatenate conditioning structures of the same keys along the batch."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, Mapping):
        for p in parts[1:]:
            if set(p) != set(first):
                raise ValueError(f"conditioning passes have different keys: {sorted(first)} and {sorted(p)}; give "
                                 "uncond_labels the same keys as labels")
        return {k: cat_rows([p[k] for p in parts]) for k in first}
    return torch.cat(parts)


def broadcast_rows(uncond, like, m: int):
    """`uncond` (one unconditional input: batch 1 or no batch axis, per key) as `m` rows shaped like `like`'s rows.
    Keys of a mapping `like` absent from `uncond` keep `like`'s rows (e.g. SDXL time ids)."""
    if isinstance(like, Mapping):
        if not isinstance(uncond, Mapping):
            raise TypeError("labels is a mapping, so uncond_labels must be a mapping of the same keys")
        extra = set(uncond) - set(like)
        if extra:
            raise ValueError(f"uncond_labels has keys {sorted(extra)} that labels lacks: use the same keys as labels")
        return {k: broadcast_rows(uncond[k], v, m) if k in uncond else v for k, v in like.items()}
    u = torch.as_tensor(uncond, device=like.device)
    u = u.to(like.dtype)
    if u.shape == like.shape[1:]:
        u = u[None]
    if u.ndim != like.ndim or u.shape[0] not in (1, m) or u.shape[1:] != like.shape[1:]:
        raise ValueError(f"uncond_labels entry of shape {list(u.shape)} does not fit labels rows of shape "
                         f"{list(like.shape[1:])}: give one row ([1, ...]) or no batch axis")
    return u.expand(m, *like.shape[1:])


# -- flow models in t -----------------------------------------------------------------------------------------------

def t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """Flow time -> EDM noise level, `t / (1 - t)` (inf at t = 1)."""
    return torch.where(t >= 1, torch.full_like(t, math.inf), t / (1 - t).clamp_min(1e-38))


def sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
    """EDM noise level -> flow time, `sigma / (1 + sigma)` (1 at sigma = inf)."""
    return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))


def has_flow(D) -> bool:
    return callable(getattr(D, "flow", None))


def flow_call(D, x_t: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
    """The x0 prediction at flow time `t` `[N]`: `D.flow(x_t, t, labels)` if D has it, else the EDM form
    `D(x_t / (1 - t), t / (1 - t), labels)`, which needs t < 1."""
    if has_flow(D):
        return D.flow(x_t, t, labels)
    if bool((t >= 1).any()):
        raise ValueError(f"{type(D).__name__} has no flow(x_t, t, labels) method, so it cannot be evaluated at t = 1 "
                         "(sigma = inf): wrap a flow model with autoguidance.adapters.DiffusersDenoiser, or start "
                         "below t = 1")
    scale = (1 - t).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
    return D(x_t / scale, (t / (1 - t)).to(x_t.dtype), labels)


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
