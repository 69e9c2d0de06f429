"""Samplers: small plain functions with one signature, in the EDM convention (Karras et al. 2022).

    sigmas = sigmas_karras(32, sigma_min=0.002, sigma_max=80, rho=7)        # [33], last entry 0
    x = sample_heun(D, sigmas[0] * noise, sigmas, seeds=seeds)            # EDM Algorithm 2

Every sampler takes a denoiser `D(x, sigma, labels)`, the initial `x` at `sigmas[0]`, and the decreasing noise
levels ending in 0. `seeds` (one per row) drive the churn noise (one generator per image) and the per-row
keys of any perturbation inside D, so a row's randomness depends only on its seed, not on the batch it is in (its
result too, up to the float rounding of the net's kernels, which may sum in another order at another batch size).
`generate` draws the initial noise from the seeds and runs a sampler.

Beside EDM Heun / Euler: DPM-Solver++(2M) (`sample_dpmpp_2m`, Lu et al. 2022, as k-diffusion's `sample_dpmpp_2m`),
and the flow-matching Euler sampler (`sample_flow_euler`) of diffusers' `FlowMatchEulerDiscreteScheduler`.

Every sampler declares its steps in its run (`schedules.StepClock`: the step index of each denoiser call), so step
schedules (`StepList`, `StepWindow`) and rules with a step count (CFG-Zero*'s zero-init) can read them.

**CFG++** (Chung et al. 2024, arXiv 2406.08070), `cfgpp=True` of the Euler-type samplers: the step re-noises with
the guide's prediction instead of the guided one. DDIM writes a deterministic step as `x_next = D + sigma_next eps`
(EDM Euler is this step, eps = (x - D) / sigma); CFG++ takes `D = D_w` (guided) but `eps = (x - D_bad) / sigma`
(the unconditional / guide prediction `D_bad`): `x_next = D_w + sigma_next (x - D_bad) / sigma`. In flow time,
`x_next = (1 - t_next) D_w + t_next (x_t - (1 - t) D_bad) / t` (the same step: x_t = (1 - t) x). The paper's
guidance scale lambda in [0, 1] is this library's w of `D_bad + w (D_good - D_bad)`; w = 1 still means no
guidance (the guide pass is skipped and the step is the plain one). Heun (our extension; the paper defines Euler-
type steps): the trapezoidal average of the CFG++ Euler increments at both ends of the step,
`x_next = x + (s_next - s)/2 (eps_bad(x) + eps_bad(x')) + ((D_w - D_bad)(x) + (D_w - D_bad)(x'))/2`, x' the CFG++
Euler predictor; it is the plain Heun step when D_w = D_bad and the Euler CFG++ step when both ends agree. ComfyUI's
flow-model `euler_cfg_pp` re-noises with the guide's velocity instead (`x_next = D_w + t_next v_bad`); the two
agree without guidance.

**Flow sampling from pure noise at t = 1.** A rectified-flow model has x_t = (1 - t) x0 + t n; in EDM form
x = x_t / (1 - t), sigma = t / (1 - t), so its first step, at t = 1, is at sigma = inf with x = inf: no EDM
sampler can take it. `sample_flow_euler` therefore works in x_t space and flow time t, exactly as the
scheduler does, and asks the (guided) denoiser for its x0 prediction through the t-parameterised interface
`D.flow(x_t, t, labels)` (`autoguidance.denoiser.flow_call`): a flow model's adapter computes x0 = x_t - t v
there, finite at t = 1 (x0 = x_t - v, no division by 1 - t), and a `Guided` denoiser combines its passes' x0 there
with weights `w(sigma)` at sigma = t / (1 - t) = inf (schedules are defined at inf). The Euler step uses the
velocity implied by the guided x0, `v = (x_t - x0) / t`, `x_next = x_t + (t_next - t) v`: at w = 1 this is the
scheduler's `sample + dt * model_output` step. Guidance is affine in x0 at fixed (x_t, t) and x0 is affine in v,
so the guided velocity is the same combination of the passes' velocities with the same w.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence

import torch
import tqdm

from .denoiser import check_rows, take_rows
from .rng import SamplingRun, StackedGenerators, as_seeds, noise_context
from .schedules import StepClock

__all__ = ["sigmas_karras", "sample_euler", "sample_heun", "sample_dpmpp_2m", "sample_flow_euler", "generate",
           "SAMPLERS"]


def sigmas_karras(num_steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  dtype=torch.float32) -> torch.Tensor:
    """EDM time steps (Karras et al. 2022, Eq. 5), with sigma_N = 0 appended: `[num_steps + 1]`.

    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i = 0..N-1
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in (sigma_min, sigma_max)) \
            or not (math.isfinite(sigma_min) and math.isfinite(sigma_max)) or sigma_min <= 0 or sigma_max <= 0:
        raise ValueError(f"sigma_min and sigma_max must be finite and > 0, got {sigma_min}, {sigma_max}")
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma range is inverted or empty: sigma_min={sigma_min} >= sigma_max={sigma_max}")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"rho must be a finite number > 0, got {rho!r}")
    ramp = torch.linspace(0, 1, int(num_steps), dtype=torch.float64) if num_steps > 1 else torch.zeros(1, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (a + ramp * (b - a)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)


def _check_sigmas(sigmas: torch.Tensor) -> None:
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError("sigmas must be a 1-D tensor of at least 2 noise levels (use sigmas_karras)")
    if not bool(torch.isfinite(sigmas).all()):
        raise ValueError("sigmas must be finite (for a flow model starting at t = 1, use sample_flow_euler)")
    if bool((sigmas[:-1] <= 0).any()) or bool((sigmas[1:] > sigmas[:-1]).any()) or bool((sigmas < 0).any()):
        raise ValueError("sigmas must be positive and decreasing, ending in 0 (or a positive minimum)")


def _churn(sigma: float, S_churn: float, S_min: float, S_max: float, num_steps: int) -> float:
    """gamma_i = min(S_churn / N, sqrt(2) - 1) for sigma_i in [S_min, S_max], else 0 (EDM Algorithm 2, line 4)."""
    return min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= sigma <= S_max else 0.0


def _bar(n: int, progress: bool, desc: Optional[str]):
    return tqdm.tqdm(range(n), disable=not progress, desc=desc or "sampling", unit="step", leave=False)


def _check_number(v, name: str, finite: bool = True, lo: Optional[float] = None) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or (finite and not math.isfinite(v)) \
            or (lo is not None and v < lo):
        want = "a finite number" if finite else "a number (not nan)"
        raise ValueError(f"{name} must be {want}{f' >= {lo}' if lo is not None else ''}, got {v!r}")


def _check_churn(S_churn, S_min, S_max, S_noise) -> None:
    _check_number(S_churn, "S_churn", lo=0)
    _check_number(S_noise, "S_noise", lo=0)
    _check_number(S_min, "S_min", finite=False)
    _check_number(S_max, "S_max", finite=False)


def _seeds_for(seeds, n: int) -> torch.Tensor:
    seeds = as_seeds(seeds) if seeds is not None else torch.arange(n, dtype=torch.int64)
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {n}: pass one seed per row")
    return seeds


def _parts_of(D: Callable, flow: bool = False) -> Callable:
    """The `(guided, guide)` predictions method a CFG++ sampler calls (`Guided.parts` / `Guided.flow_parts`)."""
    fn = getattr(D, "flow_parts" if flow else "parts", None)
    if not callable(fn):
        raise ValueError(f"CFG++ (cfgpp=True) re-noises with the guide's prediction, so it needs a guided denoiser that "
                         f"returns both (autoguidance.Guided, e.g. ag.cfg(...)); got {type(D).__name__}")
    return fn


def _run(D, x, sigmas, labels, seeds, S_churn, S_min, S_max, S_noise, callback, progress, desc, second_order,
         cfgpp=False):
    _check_sigmas(sigmas)
    _check_churn(S_churn, S_min, S_max, S_noise)
    if S_churn < 0 or S_noise < 0:
        raise ValueError(f"S_churn and S_noise must be >= 0, got {S_churn}, {S_noise}")
    n = len(x)
    seeds = _seeds_for(seeds, n)
    gens = StackedGenerators(seeds, x.device) if S_churn > 0 else None
    num_steps = len(sigmas) - 1
    call = 0
    run = SamplingRun()                                     # caches of the guided denoiser that live for this run
    levels = sigmas.tolist()                                # one read of the noise levels, not two per step
    StepClock(tuple(i for i in range(num_steps) for _ in range(2 if second_order and levels[i + 1] > 0 else 1)),
              num_steps).declare(run)
    fn = _parts_of(D) if cfgpp else D

    def denoise(x_, s_):
        nonlocal call
        sig = torch.full((n,), s_, dtype=x_.dtype, device=x_.device)
        with noise_context(seeds, call, run, sig):          # sig is checked: sigmas are, and t_hat >= t_cur > 0
            out = fn(x_, sig, labels)
        call += 1
        return out

    for i in _bar(num_steps, progress, desc):
        t_cur, t_next = levels[i], levels[i + 1]
        gamma = _churn(t_cur, S_churn, S_min, S_max, num_steps) if gens is not None else 0.0
        t_hat = t_cur * (1 + gamma)
        if gens is not None:  # x_hat = x + sqrt(t_hat^2 - t^2) S_noise eps; eps is drawn on every step, as
            eps = gens.randn_like(x)  # EDM and k-diffusion do, so the noise streams line up with theirs
            if gamma > 0:
                x = x + math.sqrt(t_hat**2 - t_cur**2) * S_noise * eps
        if cfgpp:
            denoised, bad = denoise(x, t_hat)
            e_cur = (x - bad) / t_hat                       # the guide's eps re-noises (CFG++)
            x_next = denoised + t_next * e_cur              # x_next = D_w + sigma_next eps_bad
            if second_order and t_next > 0:                 # trapezoidal average of both ends' CFG++ increments
                den2, bad2 = denoise(x_next, t_next)
                e_next = (x_next - bad2) / t_next
                x_next = x + (t_next - t_hat) * (0.5 * e_cur + 0.5 * e_next) \
                    + 0.5 * (denoised - bad) + 0.5 * (den2 - bad2)
        else:
            denoised = denoise(x, t_hat)
            d_cur = (x - denoised) / t_hat                  # dx/dsigma = (x - D(x; sigma)) / sigma
            x_next = x + (t_next - t_hat) * d_cur           # Euler step
            if second_order and t_next > 0:                 # Heun correction (Algorithm 2, lines 9-11)
                d_next = (x_next - denoise(x_next, t_next)) / t_next
                x_next = x + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_next)
        if callback is not None:
            callback({"i": i, "x": x_next, "sigma": t_cur, "sigma_hat": t_hat, "sigma_next": t_next,
                      "denoised": denoised})
        x = x_next
    return x


def sample_euler(D: Callable, x: torch.Tensor, sigmas: torch.Tensor, *, labels: Optional[torch.Tensor] = None,
                 seeds=None, S_churn: float = 0.0, S_min: float = 0.0, S_max: float = math.inf,
                 S_noise: float = 1.0, callback: Optional[Callable] = None, progress: bool = True,
                 desc: Optional[str] = None, cfgpp: bool = False) -> torch.Tensor:
    """Euler (first order) on the probability-flow ODE, with optional churn: one D call per step. `cfgpp=True`:
    CFG++'s step (module docstring; D must be a `Guided` with one guide)."""
    return _run(D, x, sigmas, labels, seeds, S_churn, S_min, S_max, S_noise, callback, progress, desc, False,
                _flag(cfgpp))


def sample_heun(D: Callable, x: torch.Tensor, sigmas: torch.Tensor, *, labels: Optional[torch.Tensor] = None,
                seeds=None, S_churn: float = 0.0, S_min: float = 0.0, S_max: float = math.inf,
                S_noise: float = 1.0, callback: Optional[Callable] = None, progress: bool = True,
                desc: Optional[str] = None, cfgpp: bool = False) -> torch.Tensor:
    """EDM's stochastic Heun sampler (Karras et al. 2022, Algorithm 2); deterministic with S_churn = 0.
    2N - 1 D calls for N steps (the last step, to sigma = 0, is Euler). `cfgpp=True`: the CFG++ Heun step (module
    docstring)."""
    return _run(D, x, sigmas, labels, seeds, S_churn, S_min, S_max, S_noise, callback, progress, desc, True,
                _flag(cfgpp))


def _flag(v, name: str = "cfgpp") -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be True or False, got {v!r}")
    return v


def sample_dpmpp_2m(D: Callable, x: torch.Tensor, sigmas: torch.Tensor, *, labels=None, seeds=None,
                    callback: Optional[Callable] = None, progress: bool = True,
                    desc: Optional[str] = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), deterministic, one D call per step; in lambda = -log sigma,
    `x_next = (s_next / s) x - expm1(-h) D'` with `D'` the multistep extrapolation of the last two x0 predictions
    (first order on the first step and on the last, to sigma = 0). Same steps as k-diffusion's `sample_dpmpp_2m`."""
    _check_sigmas(sigmas)
    n = len(x)
    seeds = _seeds_for(seeds, n)
    old = None
    run = SamplingRun()
    StepClock(tuple(range(len(sigmas) - 1)), len(sigmas) - 1).declare(run)
    for i in _bar(len(sigmas) - 1, progress, desc):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        sig = torch.full((n,), float(s_cur), dtype=x.dtype, device=x.device)
        with noise_context(seeds, i, run, sig):
            denoised = D(x, sig, labels)
        if float(s_next) == 0:
            x_next = denoised                       # h = inf: the step lands on the x0 prediction
        else:
            t, t_next = -s_cur.log(), -s_next.log()
            h = t_next - t
            if old is None:
                d = denoised
            else:
                r = (t - (-sigmas[i - 1].log())) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x_next = (s_next / s_cur) * x - torch.expm1(-h) * d
        if callback is not None:
            callback({"i": i, "x": x_next, "sigma": float(s_cur), "sigma_hat": float(s_cur),
                      "sigma_next": float(s_next), "denoised": denoised})
        old = denoised
        x = x_next
    return x


def sample_flow_euler(D: Callable, x: torch.Tensor, ts: torch.Tensor, *, labels=None, seeds=None,
                      callback: Optional[Callable] = None, progress: bool = True,
                      desc: Optional[str] = None, cfgpp: bool = False) -> torch.Tensor:
    """Flow-matching Euler in x_t space (see the module docstring): `x` is x_t at `ts[0]` (pure noise at t = 1),
    `ts` the decreasing flow times in (0, 1] ending in 0 (diffusers: `scheduler.sigmas` after `set_timesteps`;
    `autoguidance.adapters.flow_times`). Each step asks `D.flow(x_t, t, labels)` for x0 (`flow_call`) and takes
    `x_t + (t_next - t) (x_t - x0) / t`, the scheduler's `sample + dt * model_output`. `cfgpp=True`: CFG++'s step
    `(1 - t_next) x0_w + t_next (x_t - (1 - t) x0_bad) / t` (module docstring; D must be a `Guided`)."""
    from .denoiser import flow_call

    if not isinstance(ts, torch.Tensor) or ts.ndim != 1 or len(ts) < 2:
        raise ValueError("ts must be a 1-D tensor of at least 2 flow times (e.g. scheduler.sigmas)")
    if not bool(torch.isfinite(ts).all()) or bool((ts[:-1] <= 0).any()) or bool((ts > 1).any()) \
            or bool((ts[1:] > ts[:-1]).any()) or bool((ts < 0).any()):
        raise ValueError("ts must be flow times in [0, 1], decreasing, positive before the last")
    n = len(x)
    seeds = _seeds_for(seeds, n)
    x = x.to(torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x
    run = SamplingRun()
    StepClock(tuple(range(len(ts) - 1)), len(ts) - 1).declare(run)
    parts = _parts_of(D, flow=True) if _flag(cfgpp) else None
    for i in _bar(len(ts) - 1, progress, desc):
        t_cur, t_next = ts[i], ts[i + 1]
        tt = torch.full((n,), float(t_cur), dtype=x.dtype, device=x.device)
        if parts is not None:
            with noise_context(seeds, i, run):
                x0, bad = parts(x, tt, labels)
            tc, tn = t_cur.to(x.dtype), t_next.to(x.dtype)
            x_next = (1 - tn) * x0 + tn * (x - (1 - tc) * bad) / tc      # re-noise with the guide's eps (CFG++)
        else:
            with noise_context(seeds, i, run):
                x0 = flow_call(D, x, tt, labels)
            v = (x - x0) / t_cur.to(x.dtype)
            x_next = x + (t_next - t_cur).to(x.dtype) * v
        if callback is not None:
            callback({"i": i, "x": x_next, "t": float(t_cur), "t_next": float(t_next), "denoised": x0})
        x = x_next
    return x


SAMPLERS = {"heun": sample_heun, "euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m}


def _positive_int(v, name: str, hint: str) -> int:
    """`v` as an int if it is an integer >= 1 (bools and fractional numbers refused), else a one-line error."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or int(v) != v or v < 1:
        raise ValueError(f"{name} must be a positive integer{hint}, got {v!r}")
    return int(v)


def generate(D: Callable, seeds, shape: Sequence[int], *, labels: Optional[torch.Tensor] = None,
             sampler: str = "heun", num_steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 80.0,
             rho: float = 7.0, batch: Optional[int] = None, device="cpu", **sampler_kwargs) -> torch.Tensor:
    """Sample one image per seed: noise `N(0, sigma_max^2)` from one generator per seed, then `sampler`.

    `seeds` are integers >= 0 (one image each); `shape` is one sample's shape (e.g. `[2]` or `[1, 8, 8]`); returns
    `[len(seeds), *shape]`. `labels` has one row per seed (a tensor, or a mapping of them). `batch` (None: all
    seeds at once) splits the seeds into batches; the output does not depend on it beyond the float rounding of
    the net's kernels at another batch size."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: expected one of {sorted(SAMPLERS)}")
    seeds = as_seeds(seeds)
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (Sequence, torch.Size)) or not len(shape) \
            or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in shape):
        raise ValueError(f"shape must be one sample's shape, a non-empty sequence of positive integers such as [2] "
                         f"or [1, 8, 8], got {shape!r}")
    num_steps = _positive_int(num_steps, "num_steps", " (sampler steps)")
    if batch is not None:
        batch = _positive_int(batch, "batch", " (seeds per sampler call) or None (all at once)")
    if labels is not None:
        if isinstance(labels, torch.Tensor):
            if labels.ndim < 1 or labels.shape[0] != len(seeds):
                raise ValueError(f"labels has shape {list(labels.shape)} for {len(seeds)} seeds: give one row per "
                                 "seed on axis 0")
        else:
            check_rows(labels, len(seeds), "labels")
    sigmas = sigmas_karras(num_steps, sigma_min, sigma_max, rho)
    batch = batch or max(len(seeds), 1)
    outs = []
    for a in range(0, len(seeds), batch):
        s = seeds[a:a + batch]
        x = StackedGenerators(s, device).randn(shape) * sigmas[0]
        lab = take_rows(labels, slice(a, a + batch)) if labels is not None else None
        outs.append(SAMPLERS[sampler](D, x, sigmas.to(device), labels=lab, seeds=s, **sampler_kwargs))
    return torch.cat(outs) if outs else torch.zeros(0, *shape, device=device)
