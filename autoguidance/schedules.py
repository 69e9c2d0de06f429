"""Schedules of a value over sampling: the guidance weight `w(sigma)` and perturbation strength `p(sigma)`.

A schedule is a callable `sigma [N] -> value [N]`. The sigma schedules are functions of the noise level only: sigma
is what the papers reason in, and it does not change with the number of sampling steps.

    Constant(2.0)                                  w = 2 everywhere
    Interval(2.1, sigma_lo=0.28, sigma_hi=2.9)     w = 2.1 for sigma in (0.28, 2.9], 1 elsewhere (Kynkaanniemi et al.)
    Interval(7.0, sigma_lo=1.0)                    the guide pass stops below sigma 1: Adaptive Guidance's skip
                                                   of the unconditional pass (Castillo et al. 2023, arXiv
                                                   2312.12487) at a fixed switch point (the paper switches once
                                                   the two predictions align)
    Ramp(3.0, 1.0, sigma_from=5.0, sigma_to=0.05)  3 at sigma >= 5, 1 at sigma <= 0.05, linear in log sigma between

Beside them, the forms users write in steps (they read the step index the sampler declares, `current_step`, and
refuse to run outside one of the library's samplers or a diffusers pipeline's loop under `guided_pipeline`):

    StepList((7.0,) * 45 + (3.0,) * 3)             w per sampler step (Ideogram's 48-step list); the run must have
                                                   as many steps as the list
    StepWindow(3.0, start=0.01, stop=0.2)          w for the steps i with int(start N) <= i < int(stop N), 1 elsewhere
                                                   (diffusers' start/stop fractions; SLG's 1-20% of the steps)

Every rule (`autoguidance.rules`) takes any of these as w; wherever w = 1 the guide pass is not computed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .rng import current_state

__all__ = ["Schedule", "Constant", "Interval", "Ramp", "StepList", "StepWindow", "StepClock", "current_step",
           "as_schedule", "check_weight", "check_probability"]


def _finite(v: float, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number, got {v!r}")
    return float(v)


def check_weight(w: float, what: str = "guidance weight w") -> float:
    """A guidance weight in `D_bad + w (D_good - D_bad)`: finite and >= 0 (1 = no guidance, 0 = D_bad alone)."""
    w = _finite(w, what)
    if w < 0:
        raise ValueError(f"{what} must be >= 0 in the convention D_bad + w (D_good - D_bad) (w = 1: no guidance), "
                         f"got {w}. If you have the in-situ paper's w', use w = w' + 1 (insitu_weight).")
    return w


def check_probability(p: float, what: str = "dropout probability p") -> float:
    p = _finite(p, what)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{what} must be in [0, 1), got {p}")
    return p


def _check_sigma_range(lo: float, hi: float) -> tuple[float, float]:
    lo = _finite(lo, "sigma_lo")
    hi = _finite(hi, "sigma_hi") if hi != math.inf else math.inf
    if lo < 0 or hi <= 0:
        raise ValueError(f"sigma bounds must be non-negative (sigma_hi > 0), got ({lo}, {hi}]")
    if lo >= hi:
        raise ValueError(f"sigma range is inverted or empty: ({lo}, {hi}]; pass sigma_lo < sigma_hi")
    return lo, hi


class Schedule:
    """Base class: `__call__(sigma [N]) -> [N]` values, as a function of the noise level only."""

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def values(self) -> list[float]:
        """Every value the schedule can take (for validation)."""
        raise NotImplementedError

    def constant(self) -> Optional[float]:
        """The schedule's value if it is the same at every sigma (then `__call__` is `value` cast to float32 in
        every row), else None. Lets guidance skip evaluating it, and reading it back, on every denoiser call."""
        return None


@dataclass(frozen=True)
class Constant(Schedule):
    value: float

    def __call__(self, sigma):
        return torch.full_like(torch.as_tensor(sigma, dtype=torch.float32), self.value)

    def values(self):
        return [self.value]

    def constant(self) -> Optional[float]:
        return float(self.value)


@dataclass(frozen=True)
class Interval(Schedule):
    """`inside` for sigma in (sigma_lo, sigma_hi], `outside` elsewhere (the guidance interval of Kynkaanniemi
    et al. 2024 with the default outside = 1; for a perturbation strength use outside = 0)."""

    inside: float
    sigma_lo: float = 0.0
    sigma_hi: float = math.inf
    outside: float = 1.0

    def __post_init__(self):
        _check_sigma_range(self.sigma_lo, self.sigma_hi)

    def __call__(self, sigma):
        sigma = torch.as_tensor(sigma)
        inside = (sigma > self.sigma_lo) & (sigma <= self.sigma_hi)
        return torch.where(inside, torch.full_like(sigma, self.inside, dtype=torch.float32),
                           torch.full_like(sigma, self.outside, dtype=torch.float32))

    def values(self):
        return [self.inside, self.outside]


@dataclass(frozen=True)
class Ramp(Schedule):
    """`start` at sigma >= sigma_from, `end` at sigma <= sigma_to, linear in log(sigma) between."""

    start: float
    end: float
    sigma_from: float = 5.0
    sigma_to: float = 0.05

    def __post_init__(self):
        _check_sigma_range(self.sigma_to, self.sigma_from)
        if self.sigma_to <= 0:
            raise ValueError("Ramp needs sigma_to > 0 (it is linear in log sigma)")

    def __call__(self, sigma):
        s = torch.as_tensor(sigma, dtype=torch.float32)
        t = (s.clamp_min(1e-30).log() - math.log(self.sigma_to)) / (math.log(self.sigma_from) - math.log(self.sigma_to))
        return self.end + (self.start - self.end) * t.clamp(0, 1)

    def values(self):
        return [self.start, self.end]


@dataclass(frozen=True)
class StepClock:
    """Which sampler step each denoiser call of a run belongs to, declared by the sampler once per run in the run's
    cache (`rng.SamplingRun`): `step_of_call[k]` is the step index of call k (Heun: its correction call belongs to
    the step it corrects), `num_steps` the run's N. `step_of_call` is a tuple over the calls 0..K-1, or a mapping
    {call index: step} for a caller whose call indices are not consecutive (a pipeline's model call, whose index in
    the noise context is its timestep's salt, declares its own step at each call)."""

    step_of_call: tuple
    num_steps: int

    KEY = "sampler_steps"

    def declare(self, run) -> None:
        run.cache[self.KEY] = self


def current_step(what: str) -> tuple[int, int]:
    """`(i, N)`: the step index of the current denoiser call and the number of steps of its sampling run, from the
    sampler's noise context (`rng.current_state`). Raises one line naming `what` outside a run that declares them."""
    state = current_state()
    clock = state.run.cache.get(StepClock.KEY) if state is not None and state.run is not None else None
    steps = clock.step_of_call if clock is not None else ()
    if clock is None or not (state.call in steps if isinstance(steps, dict) else 0 <= state.call < len(steps)):
        raise ValueError(f"{what} needs the sampler's step index: sample with autoguidance's samplers (generate, "
                         "sample_heun, sample_euler, sample_dpmpp_2m, sample_flow_euler), or use a sigma schedule "
                         "(Interval, Ramp)")
    return clock.step_of_call[state.call], clock.num_steps


class StepList(Schedule):
    """A value per sampler step: `values[i]` at step i (every call of that step, every row). The sampling run must
    have `len(values)` steps."""

    def __init__(self, values):
        try:
            vals = tuple(_finite(v, "StepList value") for v in values)
        except TypeError:
            raise ValueError(f"StepList takes a sequence of numbers, one per step, got {values!r}") from None
        if not vals:
            raise ValueError("StepList needs at least one value (one per sampler step)")
        self.vals = vals

    def __call__(self, sigma):
        i, n = current_step("StepList")
        if n != len(self.vals):
            raise ValueError(f"StepList has {len(self.vals)} values but the sampler runs {n} steps: give one value "
                             "per step (or sample with as many steps)")
        return torch.full_like(torch.as_tensor(sigma, dtype=torch.float32), self.vals[i])

    def values(self):
        return list(self.vals)

    def __repr__(self):
        return f"StepList({list(self.vals)})"


@dataclass(frozen=True)
class StepWindow(Schedule):
    """`inside` for the steps `i` with `int(start N) <= i < int(stop N)` of an N-step run (diffusers' guider
    start/stop), `outside` elsewhere. `start`, `stop` are fractions of the step count in [0, 1]."""

    inside: float
    start: float = 0.0
    stop: float = 1.0
    outside: float = 1.0

    def __post_init__(self):
        lo, hi = _finite(self.start, "StepWindow start"), _finite(self.stop, "StepWindow stop")
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"StepWindow needs 0 <= start < stop <= 1 (fractions of the steps), got {lo}, {hi}")

    def __call__(self, sigma):
        i, n = current_step("StepWindow")
        v = self.inside if int(self.start * n) <= i < int(self.stop * n) else self.outside
        return torch.full_like(torch.as_tensor(sigma, dtype=torch.float32), v)

    def values(self):
        return [self.inside, self.outside]


ScheduleLike = Union[float, int, Schedule]


def as_schedule(v: ScheduleLike, what: str = "guidance weight w", check=check_weight) -> Schedule:
    """A number becomes `Constant`; every value of a schedule is validated with `check`."""
    sched = v if isinstance(v, Schedule) else Constant(check(v, what))
    if not isinstance(sched, Schedule):  # pragma: no cover
        raise TypeError(f"{what} must be a number or a Schedule, got {type(v).__name__}")
    for value in sched.values():
        check(value, what)
    return sched
