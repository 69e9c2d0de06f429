"""diffusers' noise schedules in EDM terms, and a model output <-> the x0 prediction (one job: coordinates).

**VP** (a discrete variance-preserving scheduler with `alphas_cumprod`: DDPM, DDIM, PNDM, Euler, DPM-Solver, ...):
the VP process `x_vp = sqrt(a_t) x0 + sqrt(1 - a_t) n` is the EDM process `x = x0 + sigma n` scaled
(Karras et al. 2022, Sec. 2 and App. C.1):

    sigma_t = sqrt((1 - a_t) / a_t),      x_vp = x / sqrt(1 + sigma^2)

A sigma between training steps maps to a fractional timestep, linear in log(sigma) between neighbouring steps
(`quantize=True` rounds to the nearest step instead). The network output becomes the x0 prediction by type:

    epsilon:        D = x - sigma eps
    v_prediction:   D = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) v       (v = sqrt(a) eps - sqrt(1-a) x0)
    sample:         D = output

**Flow matching** (`FlowMatchEulerDiscreteScheduler`, SD3 / Flux / rectified flows): x_t = (1 - t) x0 + t n,
model timestep = t * num_train_timesteps, output by type (`prediction_type`):

    flow (velocity v = n - x0, the default):   x0 = x_t - t v
    epsilon:                                   x0 = (x_t - t eps) / (1 - t)      (t < 1)
    sample:                                    x0 = output

In EDM form x = x_t / (1 - t), sigma = t / (1 - t). `flow_times(scheduler, num_steps, mu=None)` returns the
scheduler's own flow times (shift, dynamic shift).

A scheduler is read as flow matching when its config says so (`is_flow_scheduler`): a `FlowMatch*` class,
`use_flow_sigmas=True` (DPM-Solver / UniPC as Sana and Wan ship them) or `prediction_type="flow_prediction"`.
Such multistep schedulers also carry `alphas_cumprod` (from their betas), which their flow sigmas do not use.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["VPSchedule", "FlowSchedule", "flow_times", "is_flow_scheduler", "output_to_x0", "x0_to_output",
           "flow_output_to_x0", "flow_x0_to_output", "PREDICTION_TYPES", "FLOW_PREDICTION_TYPES"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FLOW_PREDICTION_TYPES = ("flow", "epsilon", "sample")
#: a flow scheduler's config `prediction_type` -> the adapter's name for it
_FLOW_CONFIG_TYPES = {"flow_prediction": "flow", "epsilon": "epsilon", "sample": "sample"}


def is_flow_scheduler(scheduler) -> bool:
    """Whether `scheduler` runs a flow-matching time axis (x_t = (1 - t) x0 + t n), from its class and config."""
    config = getattr(scheduler, "config", None)
    return (type(scheduler).__name__.startswith("FlowMatch") or bool(getattr(config, "use_flow_sigmas", False))
            or getattr(config, "prediction_type", None) == "flow_prediction")


class VPSchedule:
    """The discrete VP schedule of a diffusers scheduler, as EDM noise levels: `sigmas[t] = sqrt((1 - a_t)/a_t)`,
    `[T]` float64, increasing in t. Maps sigma <-> (fractional) timestep."""

    def __init__(self, scheduler, quantize: bool = False):
        ac = getattr(scheduler, "alphas_cumprod", None)
        if ac is None:
            raise TypeError(f"{type(scheduler).__name__} has no alphas_cumprod: the adapter needs a discrete "
                            "variance-preserving scheduler (DDPM, DDIM, PNDM, Euler, DPM-Solver, ...), not a "
                            "flow-matching or continuous one")
        ac = torch.as_tensor(ac, dtype=torch.float64).flatten()
        if len(ac) > 1 and float(ac[-1]) == 0.0 and float(ac[-2]) > 0.0:
            # zero terminal SNR (Lin et al. 2023; rescale_betas_zero_snr=True): sigma_T would be infinite; use
            # a_T = 2^-24 as diffusers' Euler / DPM-Solver / UniPC do. Guidance is affine in the output at a fixed
            # (x_t, t), so the guided prediction at t = T does not depend on the value (up to rounding).
            ac = ac.clone()
            ac[-1] = 2.0 ** -24
        sigmas = ((1 - ac) / ac).sqrt()
        if len(sigmas) < 2 or not bool(torch.isfinite(sigmas).all()) or bool((sigmas[1:] <= sigmas[:-1]).any()) \
                or float(sigmas[0]) <= 0:
            raise ValueError("the scheduler's alphas_cumprod must decrease strictly within (0, 1) so that sigma_t "
                             "= sqrt((1 - a_t)/a_t) increases with t")
        self.sigmas = sigmas
        self.log_sigmas = sigmas.log()
        self.quantize = quantize

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """`[N]` noise levels -> `[N]` float64 timesteps, linear in log sigma between steps, clamped to [0, T-1]."""
        ls = sigma.detach().to(torch.float64).log().cpu().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        hi = torch.searchsorted(self.log_sigmas, ls).clamp(1, len(self.sigmas) - 1)
        lo_v, hi_v = self.log_sigmas[hi - 1], self.log_sigmas[hi]
        t = (hi - 1) + (ls - lo_v) / (hi_v - lo_v)
        return (t.round() if self.quantize else t).to(sigma.device)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """`[N]` (fractional) timesteps -> `[N]` float64 sigmas, log-linear between steps."""
        t = t.detach().to(torch.float64).cpu().clamp(0, len(self.sigmas) - 1)
        lo = t.floor().long().clamp(max=len(self.sigmas) - 2)
        frac = t - lo
        return (self.log_sigmas[lo] * (1 - frac) + self.log_sigmas[lo + 1] * frac).exp()


class FlowSchedule:
    """A flow-matching scheduler's time axis: t in [0, 1], model timestep `t * num_train_timesteps`,
    EDM sigma = t / (1 - t). `sigma_min` / `sigma_max` bound the EDM samplers' range (t = 1/T to 1 - 1/T);
    sampling from t = 1 itself goes through `sample_flow_euler`."""

    def __init__(self, scheduler, model=None):
        config = getattr(scheduler, "config", None)
        self.num_train_timesteps = int(getattr(config, "num_train_timesteps", 1000) or 1000)
        # Flux-style models take t itself (they scale it by 1000 inside); SD3-style ones t * num_train_timesteps;
        # Sana's pipeline multiplies that by the transformer's `timestep_scale`
        name = type(model).__name__
        self.scale = 1.0 if name.startswith("Flux") else float(self.num_train_timesteps)
        if name.startswith("Sana"):
            self.scale *= float(getattr(getattr(model, "config", None), "timestep_scale", 1.0) or 1.0)
        if getattr(config, "invert_sigmas", False):
            raise ValueError("inverted flow schedules (invert_sigmas=True, Mochi) are not supported: use a "
                             "FlowMatchEulerDiscreteScheduler with invert_sigmas=False")

    @property
    def sigma_min(self) -> float:
        t = 1.0 / self.num_train_timesteps
        return t / (1 - t)

    @property
    def sigma_max(self) -> float:
        t = 1.0 - 1.0 / self.num_train_timesteps
        return t / (1 - t)

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.scale if self.scale != 1.0 else t


def flow_times(scheduler, num_steps: int, mu: Optional[float] = None, device="cpu") -> torch.Tensor:
    """The flow times `[num_steps + 1]` (ending in 0) a flow-matching scheduler visits: its own `set_timesteps`
    on a copy (shift, dynamic shift with `mu`, terminal stretch, ... included), for `sample_flow_euler`."""
    import copy

    if not type(scheduler).__name__.startswith("FlowMatch"):
        raise TypeError(f"flow_times needs a flow-matching scheduler (FlowMatchEulerDiscreteScheduler), got "
                        f"{type(scheduler).__name__}")
    sch = copy.deepcopy(scheduler)
    if mu is None:
        sch.set_timesteps(num_steps, device=device)
    else:
        sch.set_timesteps(num_steps, device=device, mu=mu)
    return sch.sigmas.to(torch.float32)


def _make_schedule(scheduler, quantize: bool, model=None):
    if is_flow_scheduler(scheduler):
        return FlowSchedule(scheduler, model)
    if getattr(scheduler, "alphas_cumprod", None) is not None:
        return VPSchedule(scheduler, quantize)
    raise TypeError(f"DiffusersDenoiser does not know {type(scheduler).__name__}: pass a discrete VP scheduler "
                    "with alphas_cumprod (DDPM, DDIM, Euler, DPM-Solver, ...) or a flow-matching one "
                    "(FlowMatchEulerDiscreteScheduler, or DPM-Solver / UniPC with use_flow_sigmas=True)")


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def output_to_x0(out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """A network output at EDM `(x, sigma)` (`x [N, ...]`, `sigma [N]`) -> the x0 prediction `D`."""
    s = _col(sigma, x)
    if prediction_type == "epsilon":
        return x - s * out
    if prediction_type == "v_prediction":
        return x / (1 + s**2) - s / (1 + s**2).sqrt() * out
    return out


def x0_to_output(x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Inverse of `output_to_x0`: the output of `prediction_type` that gives the x0 prediction `x0` at `(x, sigma)`."""
    s = _col(sigma, x)
    if prediction_type == "epsilon":
        return (x - x0) / s
    if prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x0 with sqrt(a) = 1/sqrt(1 + s^2)
        return ((x - x0) / s - s * x0) / (1 + s**2).sqrt()
    return x0


def _prediction_type(scheduler, prediction_type: Optional[str], flow: bool = False) -> str:
    if flow:
        configured = getattr(getattr(scheduler, "config", None), "prediction_type", None)
        if prediction_type is None and configured is not None and configured not in _FLOW_CONFIG_TYPES:
            raise ValueError(f"{type(scheduler).__name__} runs flow sigmas with prediction_type {configured!r}, "
                             f"which has no flow-matching x0: use one of {', '.join(_FLOW_CONFIG_TYPES)}")
        pt = prediction_type or _FLOW_CONFIG_TYPES.get(configured, "flow")
        if pt not in FLOW_PREDICTION_TYPES:
            raise ValueError(f"a flow-matching model's prediction_type must be one of "
                             f"{', '.join(FLOW_PREDICTION_TYPES)}, got {pt!r}")
        return pt
    pt = prediction_type or getattr(getattr(scheduler, "config", None), "prediction_type", None) or "epsilon"
    if pt not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {pt!r}")
    return pt



def flow_output_to_x0(out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """A flow model's output at `(x_t, t)` -> x0 (velocity v = n - x0: x0 = x_t - t v)."""
    tc = _col(t, x_t)
    if prediction_type == "flow":
        return x_t - tc * out
    if prediction_type == "epsilon":
        return (x_t - tc * out) / (1 - tc)
    return out


def flow_x0_to_output(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Inverse of `flow_output_to_x0` (t > 0)."""
    tc = _col(t, x_t)
    if prediction_type == "flow":
        return (x_t - x0) / tc
    if prediction_type == "epsilon":
        return (x_t - (1 - tc) * x0) / tc
    return x0
