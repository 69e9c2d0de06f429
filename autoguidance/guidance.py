"""Guidance = passes + a combination. A guided denoiser is again a denoiser.

Every method evaluates a main pass `D_main` and one or more guide passes `D_i`, and combines them as

    D = D_main + sum_i (w_i(sigma) - 1) (D_main - D_i)                     (Karras et al. 2024, App. B.2)

which for one guide is the usual `D_w = D_bad + w (D_good - D_bad)` (w = 1: no guidance). A pass names which
net, whether labels are dropped, and which perturbation:

| method                      | main pass           | guide pass                                    |
|-----------------------------|---------------------|-----------------------------------------------|
| `cfg`                       | net(x, labels)      | net(x, no label) or a separate uncond net     |
| `autoguidance`              | net                 | a smaller / shorter-trained guide net         |
| `insitu`                    | net                 | the same net, dropout on (in-situ, 2025)      |
| `perturbation_guidance`     | net                 | the same net under any `Perturbation`         |
| `cfg_autoguidance`          | net                 | uncond net at w_u, bad conditional at w_c     |

Passes of the same net (differing only in labels or a per-row perturbation) run as ONE batched forward call;
`max_batch` bounds the rows of any call. Rows whose `w_i(sigma) = 1` skip guide i entirely.

Conditioning is data: `labels` is a tensor or a mapping of batch-first tensors (the model's keyword arguments),
row-selected and concatenated as one structure. A dropped-label pass gets `uncond_labels` (one unconditional input,
broadcast to its rows; keys it lacks keep the conditional rows) or, for plain tensors without it, zero rows (EDM2).
A net whose forward has no third positional parameter but takes `**kwargs` (k-diffusion's wrappers) gets a mapping
as keyword arguments.

Flow models: `Guided.flow(x_t, t, labels)` is the same combination in flow time (every pass through its net's
`flow`, weights at sigma = t / (1 - t), inf at t = 1). The x0 prediction is affine in the velocity at fixed
(x_t, t), `x0 = x_t - t v`, so guiding x0 with w is guiding the velocity with the same w.
"""
from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch

from .denoiser import (as_sigma, broadcast_rows, cat_rows, check_labels, check_x, flow_call, t_to_sigma,
                       take_rows)
from .perturb import Dropout, Perturbation, Where
from .rng import current_keys
from .schedules import Interval, Schedule, ScheduleLike, as_schedule, check_weight

__all__ = ["Pass", "Guide", "Guided", "no_guidance", "cfg", "autoguidance", "insitu", "perturbation_guidance",
           "cfg_autoguidance", "insitu_weight"]


@dataclass(frozen=True, eq=False)
class Pass:
    """One prediction a method needs."""

    net: Callable                                 # a denoiser D(x, sigma, labels)
    drop_labels: bool = False                     # evaluate unconditionally (labels None, or zero rows)
    perturbation: Optional[Perturbation] = None   # degrade this pass (in-situ guidance)
    module: Optional[torch.nn.Module] = None      # where the perturbation's hooks go (default: net)
    uncond_labels: Any = None                     # the explicit "no label" input of a drop_labels pass

    def hook_target(self) -> Optional[torch.nn.Module]:
        """The module the perturbation's hooks go on: `module`, else the net if it is a Module, else None
        (fine for perturbations that only change the inputs, such as InputNoise)."""
        if self.module is not None:
            return self.module
        return self.net if isinstance(self.net, torch.nn.Module) else None


@dataclass(frozen=True, eq=False)
class Guide:
    pass_: Pass
    w: Schedule


def _weight(w: ScheduleLike, interval: Optional[tuple[float, float]]) -> Schedule:
    if interval is not None:
        if isinstance(w, Schedule):
            raise ValueError("give either a Schedule for w or interval=(sigma_lo, sigma_hi) with a number, not both")
        lo, hi = interval
        return as_schedule(Interval(check_weight(w), lo, hi))
    return as_schedule(w)


class Guided:
    """A guided denoiser: `D = D_main + sum_i (w_i(sigma) - 1) (D_main - D_i)`.

    `stats` counts the rows evaluated per pass (main, guide0, ...), so skipped passes show, and the network
    forward calls made (`forward_calls`, one per `max_batch` chunk).
    """

    def __init__(self, main: Union[Pass, Callable], guides: Sequence[Guide] = (), max_batch: Optional[int] = None):
        self.main = main if isinstance(main, Pass) else Pass(main)
        self.guides = list(guides)
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, (int, float))
                                      or int(max_batch) != max_batch or max_batch < 1):
            raise ValueError(f"max_batch must be a positive integer or None, got {max_batch!r}")
        self.max_batch = max_batch
        self.stats: Counter = Counter()
        self._callers: dict = {}

    def __repr__(self) -> str:
        gs = ", ".join(f"{g.w} x {type(g.pass_.net).__name__}"
                       f"{' (no label)' if g.pass_.drop_labels else ''}"
                       f"{' + ' + g.pass_.perturbation.name if g.pass_.perturbation else ''}" for g in self.guides)
        return f"Guided(main={type(self.main.net).__name__}, guides=[{gs}])"

    # -- the combination -------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, sigma, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_x(x)
        sigma = as_sigma(sigma, x)
        labels = check_labels(labels, len(x))
        return self._guide(x, sigma, labels, None)

    def flow(self, x_t: torch.Tensor, t, labels=None) -> torch.Tensor:
        """The guided x0 prediction at flow time `t` (scalar or `[N]`, in (0, 1]; see the module docstring)."""
        check_x(x_t, name="x_t")
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device)
        t = t.expand(len(x_t)) if t.ndim == 0 else t
        if t.shape != (len(x_t),) or not bool(((t > 0) & (t <= 1)).all()):
            raise ValueError(f"flow time t must be a scalar or [{len(x_t)}] tensor in (0, 1], got {t.tolist()}")
        labels = check_labels(labels, len(x_t))
        return self._guide(x_t, t_to_sigma(t), labels, t)

    def _guide(self, x, sigma, labels, t) -> torch.Tensor:
        for g in self.guides:
            p = g.pass_
            if p.drop_labels and labels is None and (p.net is self.main.net or p.uncond_labels is not None):
                raise ValueError("CFG got labels=None, so its guide pass would equal its main pass: pass the "
                                 "conditioning as labels (and uncond_labels= where 'no label' is not a zero row)")
        all_rows = torch.arange(len(x), device=x.device)
        ws = [g.w(sigma).to(x.dtype) for g in self.guides]
        jobs = [(self.main, all_rows)]   # (pass, rows it is needed for)
        active = []                      # guide index of each job after the main one
        for i, (g, w) in enumerate(zip(self.guides, ws)):
            rows = torch.nonzero(w != 1).flatten()
            if len(rows):
                jobs.append((g.pass_, rows))
                active.append(i)
        outs = self._evaluate(jobs, x, sigma, labels, t)
        self.stats["main"] += len(x)
        D_main = outs[0]
        D = D_main.clone()
        for i, (_, rows), out in zip(active, jobs[1:], outs[1:]):
            self.stats[f"guide{i}"] += len(rows)
            w = ws[i][rows].reshape(-1, *([1] * (x.ndim - 1)))
            D[rows] += (w - 1) * (D_main[rows] - out)
        return D

    # -- evaluation of passes, batched per net -----------------------------------------------------------------
    def _evaluate(self, jobs, x, sigma, labels, t=None) -> list[torch.Tensor]:
        keys = current_keys(len(x))
        results: list[Optional[torch.Tensor]] = [None] * len(jobs)
        for call in _plan_calls(jobs):
            self._run_call(call, jobs, x, sigma, labels, keys, results, t)
        return results  # type: ignore[return-value]

    def _caller(self, net: Callable) -> Callable:
        """How to call `net` with labels, decided once per net from its signature: positionally
        `net(x, sigma, labels)`, or (no third positional parameter, but `**kwargs`) a mapping as keywords."""
        key = id(net)
        if key not in self._callers:
            self._callers[key] = (net, _make_caller(net))
        return self._callers[key][1]

    def _run_call(self, call: list[int], jobs, x, sigma, labels, keys, results, t=None) -> None:
        net = jobs[call[0]][0].net
        pert = next((jobs[j][0] for j in call if jobs[j][0].perturbation is not None), None)
        xs, ss, ls, ks, degraded = [], [], [], [], []
        any_labels = labels is not None and any(not jobs[j][0].drop_labels or jobs[j][0].uncond_labels is not None
                                                for j in call)
        level = sigma if t is None else t            # what the net is called with: sigma, or flow time t
        for j in call:
            p, rows = jobs[j]
            xs.append(x[rows])
            ss.append(level[rows])
            ks.append(keys[rows])
            degraded.append(torch.full((len(rows),), p.perturbation is not None, dtype=torch.bool, device=x.device))
            if any_labels:
                ls.append(_pass_labels(p, labels, rows))
        xc, sc, kc, dc = torch.cat(xs), torch.cat(ss), torch.cat(ks), torch.cat(degraded)
        lc = cat_rows(ls) if any_labels else None
        if pert is not None:
            if t is None:
                xc, sc = pert.perturbation.transform_inputs(xc, sc, dc, kc)
            else:
                xc, sc = _flow_transform(pert.perturbation, xc, sc, dc, kc)
        n = len(xc)
        step = self.max_batch or n
        outs = []
        caller = self._caller(net) if t is None else (lambda x_, t_, l_: flow_call(net, x_, t_, l_))
        for a in range(0, n, step):
            b = min(a + step, n)
            lab = take_rows(lc, slice(a, b)) if lc is not None else None
            self.stats["forward_calls"] += 1           # network calls actually made, max_batch chunks included
            if pert is not None and bool(dc[a:b].any()):
                s_pert = sc[a:b] if t is None else t_to_sigma(sc[a:b])
                with pert.perturbation.active(pert.hook_target(), dc[a:b], kc[a:b], s_pert):
                    outs.append(caller(xc[a:b], sc[a:b], lab))
            else:
                outs.append(caller(xc[a:b], sc[a:b], lab))
        out = torch.cat(outs)
        start = 0
        for j in call:
            m = len(jobs[j][1])
            results[j] = out[start:start + m]
            start += m


def _pass_labels(p: Pass, labels, rows: torch.Tensor):
    """The labels of pass `p` for `rows`: the rows, or its "no label" input (uncond_labels, or EDM2's zero rows)."""
    if not p.drop_labels:
        return take_rows(labels, rows)
    if p.uncond_labels is not None:
        return broadcast_rows(p.uncond_labels, take_rows(labels, rows), len(rows))
    if isinstance(labels, Mapping):
        raise ValueError("labels is a mapping, where a zero row need not mean 'no label': pass the unconditional "
                         "input explicitly, e.g. ag.cfg(net, w, uncond_labels={...empty-prompt embeddings...})")
    return torch.zeros_like(labels[rows])


def _make_caller(net: Callable) -> Callable:
    try:
        sig = inspect.signature(net.forward if isinstance(net, torch.nn.Module) else net)
    except (TypeError, ValueError):
        return net
    params = list(sig.parameters.values())
    positional = [q for q in params if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 3 or any(q.kind == q.VAR_POSITIONAL for q in params):
        return net
    if any(q.kind == q.VAR_KEYWORD for q in params):
        def call(x, s, lab):
            if lab is None:
                return net(x, s)
            if not isinstance(lab, Mapping):
                raise TypeError(f"{type(net).__name__} takes conditioning only as keyword arguments: pass labels as "
                                "a mapping of its keyword names, e.g. {'cond': tensor}")
            return net(x, s, **lab)
        return call

    def call2(x, s, lab):
        if lab is not None:
            raise TypeError(f"{type(net).__name__} takes no labels (its forward is (x, sigma)): pass labels=None")
        return net(x, s)
    return call2


def _flow_transform(pert: Perturbation, x_t, t, rows, keys):
    """A perturbation's input transform (defined in EDM coordinates) applied in flow time: rows with t < 1 go to
    (x_t / (1 - t), t / (1 - t)) and back; rows at t = 1 (sigma = inf) are left as they are."""
    if type(pert).transform_inputs is Perturbation.transform_inputs:
        return x_t, t
    fin = t < 1
    if not bool(fin.any()):
        return x_t, t
    idx = torch.nonzero(fin).flatten()
    tf = t[idx]
    col = (1 - tf).reshape(-1, *([1] * (x_t.ndim - 1)))
    x_e, s_e = pert.transform_inputs(x_t[idx] / col, tf / (1 - tf), rows[idx], keys[idx])
    t_new = s_e / (1 + s_e)
    x_new = x_e / (1 + s_e).reshape(-1, *([1] * (x_t.ndim - 1)))
    return x_t.index_copy(0, idx, x_new.to(x_t.dtype)), t.index_copy(0, idx, t_new.to(t.dtype))


def _plan_calls(jobs) -> list[list[int]]:
    """Group job indices into forward calls: same net, and at most one distinct perturbation per call."""
    calls: list[list[int]] = []
    for j, (p, _) in enumerate(jobs):
        for call in calls:
            q = jobs[call[0]][0]
            perts = {jobs[k][0].perturbation for k in call} - {None}
            if q.net is p.net and (p.perturbation is None or not perts or perts == {p.perturbation}) \
                    and (p.perturbation is None or all(jobs[k][0].hook_target() is p.hook_target()
                                                       for k in call if jobs[k][0].perturbation is not None)):
                call.append(j)
                break
        else:
            calls.append([j])
    return calls


# -- the methods -----------------------------------------------------------------------------------------------

def no_guidance(net: Callable) -> Guided:
    """The net alone (a `Guided` with no guide, for uniform handling)."""
    return Guided(Pass(net))


def _check_conditional(net: Callable, uncond: Optional[Callable]) -> None:
    if uncond is None and getattr(net, "conditional", True) is False:
        raise ValueError(f"CFG on an unconditional {type(net).__name__}: its guide pass would equal its main pass; "
                         "use autoguidance/insitu/perturbation guidance, or pass uncond=<an unconditional net>")


def cfg(net: Callable, w: ScheduleLike, *, uncond: Optional[Callable] = None, uncond_labels: Any = None,
        interval: Optional[tuple[float, float]] = None, max_batch: Optional[int] = None) -> Guided:
    """Classifier-free guidance: guide = the same net without labels (one batched call), or a separate
    unconditional net `uncond`. `interval=(sigma_lo, sigma_hi)` applies w only there (guidance interval).
    `uncond_labels` is the unconditional input where "no label" is not a zero row (a mapping of e.g. empty-prompt
    embeddings, batch 1 or none, broadcast to the batch; keys it lacks keep the conditional rows)."""
    _check_conditional(net, uncond)
    guide = Pass(uncond if uncond is not None else net, drop_labels=True, uncond_labels=uncond_labels)
    return Guided(Pass(net), [Guide(guide, _weight(w, interval))], max_batch)


def autoguidance(net: Callable, guide: Callable, w: ScheduleLike, *,
                 interval: Optional[tuple[float, float]] = None, max_batch: Optional[int] = None) -> Guided:
    """Autoguidance (Karras et al. 2024): guide = a smaller and/or shorter-trained model of the same task."""
    return Guided(Pass(net), [Guide(Pass(guide), _weight(w, interval))], max_batch)


def perturbation_guidance(net: Callable, w: ScheduleLike, perturbation: Perturbation, *,
                          module: Optional[torch.nn.Module] = None, interval: Optional[tuple[float, float]] = None,
                          max_batch: Optional[int] = None) -> Guided:
    """Guide a net with itself under a perturbation; both passes share one batched forward call."""
    if not isinstance(perturbation, Perturbation):
        raise TypeError(f"perturbation must be an autoguidance.perturb.Perturbation, got {type(perturbation).__name__}")
    return Guided(Pass(net), [Guide(Pass(net, perturbation=perturbation, module=module), _weight(w, interval))],
                  max_batch)


def insitu(net: Callable, w: ScheduleLike, p: ScheduleLike = 0.1, *, where: Where = None, mode: str = "element",
           module: Optional[torch.nn.Module] = None, interval: Optional[tuple[float, float]] = None,
           max_batch: Optional[int] = None) -> Guided:
    """In-situ autoguidance (2025): guide = the same net with dropout `p` switched on at `where` (default: its
    `torch.nn.Dropout` modules). The paper's `w'` is `w = w' + 1` (see `insitu_weight`)."""
    return perturbation_guidance(net, w, Dropout(p, where, mode), module=module, interval=interval,
                                 max_batch=max_batch)


def cfg_autoguidance(net: Callable, guide: Callable, w: float, a: float, *, uncond: Optional[Callable] = None,
                     uncond_labels: Any = None, max_batch: Optional[int] = None) -> Guided:
    """CFG and autoguidance together (Karras et al. 2024, App. B.2):
    `D = D_m + (w_u - 1)(D_m - D_uncond) + (w_c - 1)(D_m - D_guide)`, `w_u = (1-a)(w-1)+1`, `w_c = a(w-1)+1`.
    `a = 0` is pure CFG, `a = 1` pure autoguidance."""
    w = check_weight(w)
    _check_conditional(net, uncond)
    if isinstance(a, bool) or not (isinstance(a, (int, float)) and 0.0 <= a <= 1.0):
        raise ValueError(f"mixing ratio a must be in [0, 1], got {a!r}")
    w_u, w_c = (1 - a) * (w - 1) + 1, a * (w - 1) + 1
    return Guided(Pass(net), [Guide(Pass(uncond if uncond is not None else net, drop_labels=True,
                                                    uncond_labels=uncond_labels), as_schedule(w_u)),
                              Guide(Pass(guide), as_schedule(w_c))], max_batch)


def insitu_weight(w_prime: float) -> float:
    """Convert the in-situ paper's `D_good + w' (D_good - D_bad)` weight to this library's `w = w' + 1`."""
    if isinstance(w_prime, bool) or not isinstance(w_prime, (int, float)) or not math.isfinite(w_prime):
        raise ValueError(f"w' must be a finite number, got {w_prime!r}")
    return check_weight(w_prime + 1.0, "w = w' + 1")
