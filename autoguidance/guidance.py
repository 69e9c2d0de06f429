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

Composition: a guided denoiser is again a denoiser, also as a pass of another (`cfg(autoguidance(...))`, a guide
that is itself guided, two perturbation guidances on one module). Every batched network call declares the image
seed of each of its rows (`rng.rows_context`), so a perturbation inside it is keyed per image. A guided denoiser
called inside another's perturbed pass (a hook scope is active: `perturb.base.scopes_active`) runs each of its
passes as one call of exactly the rows it got, in order, so the outer hooks degrade exactly the rows they mean:
its own `max_batch` may not split that call (refused), and an outer prefix sharing redoes such a call unshared.

Rules: `rule=` (every method with a guide) replaces the linear combination by another (`autoguidance.rules`: rescale,
APG, CFG-Zero*, TCFG, FDG, MAMBO-G), applied in the rule's space (x0, eps or v) to the same passes; the default
`Linear()` runs the code above unchanged (bit for bit). A stateful rule's state (APG's momentum) lives in the
sampler's run (`rng.current_state().run`), one row per image seed, so an image depends neither on its batch nor on
an earlier run. CFG++ samplers ask `Guided.parts` / `Guided.flow_parts` for the guided and the guide prediction.
"""
from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch

from .denoiser import (as_sigma, broadcast_rows, cat_rows, check_guide, check_labels, check_x, flow_call,
                       t_to_sigma, take_rows)
from .perturb import Dropout, Perturbation, Where
from .perturb.base import scopes_active
from .perturb.prefix import PrefixMismatch, SharedPrefix, sharing_prefix
from .rng import current_keys, current_state, rows_context
from .rules import Linear, Rule, as_rule
from .rules.base import from_space, to_space
from .schedules import Interval, Schedule, ScheduleLike, as_schedule, check_weight, current_step

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

    def __init__(self, main: Union[Pass, Callable], guides: Sequence[Guide] = (), max_batch: Optional[int] = None,
                 share_prefix: bool = False, rule: Union[None, str, Rule] = None):
        self.main = main if isinstance(main, Pass) else Pass(main)
        #: how the passes combine (`autoguidance.rules`); Linear (the default) is the plain weighted sum
        self.rule = as_rule(rule)
        self.guides = list(guides)
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, (int, float))
                                      or int(max_batch) != max_batch or max_batch < 1):
            raise ValueError(f"max_batch must be a positive integer or None, got {max_batch!r}")
        self.max_batch = max_batch
        #: compute the part of the network before the first perturbed module once for the exact and the degraded
        #: pass (`autoguidance.perturb.prefix`); equal to the unshared call up to batch-size rounding of kernels
        self.share_prefix = bool(share_prefix)
        self.stats: Counter = Counter()
        self._callers: dict = {}

    @property
    def _linear(self) -> bool:
        return type(self.rule) is Linear

    def __repr__(self) -> str:
        gs = ", ".join(f"{g.w} x {type(g.pass_.net).__name__}"
                       f"{' (no label)' if g.pass_.drop_labels else ''}"
                       f"{' + ' + g.pass_.perturbation.name if g.pass_.perturbation else ''}" for g in self.guides)
        rule = "" if self._linear else f", rule={self.rule.describe()}"
        return f"Guided(main={type(self.main.net).__name__}, guides=[{gs}]{rule})"

    # -- the combination -------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, sigma, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_x(x)
        sigma = _checked_sigma(sigma, x)
        labels = check_labels(labels, len(x))
        return self._guide(x, sigma, labels, None)

    def flow(self, x_t: torch.Tensor, t, labels=None) -> torch.Tensor:
        """The guided x0 prediction at flow time `t` (scalar or `[N]`, in (0, 1]; see the module docstring)."""
        t = _flow_time(x_t, t)
        return self._guide(x_t, t_to_sigma(t), check_labels(labels, len(x_t)), t)

    def parts(self, x: torch.Tensor, sigma, labels=None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(D, D_guide)`: the guided prediction and its one guide's prediction `[N, ...]` (the main prediction in rows
        where the guide is skipped, w = 1), for samplers that re-noise with the guide (CFG++)."""
        check_x(x)
        sigma = _checked_sigma(sigma, x)
        labels = check_labels(labels, len(x))
        return self._guide(x, sigma, labels, None, parts=True)

    def flow_parts(self, x_t: torch.Tensor, t, labels=None) -> tuple[torch.Tensor, torch.Tensor]:
        """`parts` at flow time `t` (x0 predictions, as `flow`)."""
        t = _flow_time(x_t, t)
        return self._guide(x_t, t_to_sigma(t), check_labels(labels, len(x_t)), t, parts=True)

    def _guide(self, x, sigma, labels, t, parts: bool = False):
        if parts and len(self.guides) != 1:
            raise ValueError(f"CFG++ re-noises with the guide's prediction, so it needs exactly one guide; this "
                             f"guided denoiser has {len(self.guides)}: sample it without cfgpp")
        if self.rule.zero_init_steps and current_step(f"{self.rule.name}'s zero_init_steps")[0] \
                < self.rule.zero_init_steps:
            self.stats["zero_init"] += len(x)            # zero model output, no pass: the input is the prediction
            out = x.clone()
            return (out, out) if parts else out
        for g in self.guides:
            p = g.pass_
            if p.drop_labels and labels is None and (p.net is self.main.net or p.uncond_labels is not None):
                raise ValueError("CFG got labels=None, so its guide pass would equal its main pass: pass the "
                                 "conditioning as labels (and uncond_labels= where 'no label' is not a zero row)")
        n = len(x)
        jobs = [(self.main, None)]       # (pass, rows it is needed for; None = every row)
        active = []                      # (guide index, w - 1) of each job after the main one
        for i, g in enumerate(self.guides):
            c = g.w.constant()
            if c is not None:            # the same w in every row: no schedule evaluation, no read-back
                wm1 = _weight_minus_one(c, x.dtype)
                if wm1 is not None:
                    jobs.append((g.pass_, None))
                    active.append((i, wm1))
                continue
            w = g.w(sigma).to(x.dtype)
            rows = torch.nonzero(w != 1).flatten()
            if len(rows):
                jobs.append((g.pass_, rows))
                active.append((i, w))
        if len(jobs) == 1 and self.main.perturbation is None and not self.main.drop_labels:
            out = self._unguided(x, sigma, labels, t)
            return (out, out) if parts else out
        outs = self._evaluate(jobs, x, sigma, labels, t)
        self.stats["main"] += n
        D_main = outs[0]
        if parts:
            renoise = D_main if len(outs) == 1 else (outs[1] if jobs[1][1] is None else
                                                     D_main.index_copy(0, jobs[1][1], outs[1]))
            return self._combine(x, sigma, t, active, jobs, outs), renoise
        return self._combine(x, sigma, t, active, jobs, outs)

    def _combine(self, x, sigma, t, active, jobs, outs) -> torch.Tensor:
        """The guided prediction from the evaluated passes (`outs[0]` main, then one per active guide)."""
        if not self._linear:
            return self._combine_rule(x, sigma, t, active, jobs, outs)
        n = len(x)
        D_main = outs[0]
        D = D_main
        for (i, w), (_, rows), out in zip(active, jobs[1:], outs[1:]):
            if rows is None:
                self.stats[_GUIDE_KEYS[i] if i < len(_GUIDE_KEYS) else f"guide{i}"] += n
                D = D + w * (D_main - out)
                continue
            self.stats[_GUIDE_KEYS[i] if i < len(_GUIDE_KEYS) else f"guide{i}"] += len(rows)
            if D is D_main:
                D = D_main.clone()
            w = w[rows].reshape(-1, *([1] * (x.ndim - 1)))
            D[rows] += (w - 1) * (D_main[rows] - out)
        return D.clone() if D is D_main else D

    def _combine_rule(self, x, sigma, t, active, jobs, outs) -> torch.Tensor:
        """`_combine` for a rule other than Linear: main and guide predictions in the rule's space, one `delta` per
        active guide (on its rows), `finish` on the rows some guide is active in, back to x0."""
        rule, n = self.rule, len(x)
        D_main = outs[0]
        c = to_space(D_main, x, rule.space, sigma, t)
        g = c.clone()
        store = self._rule_state(n) if rule.stateful else None
        touched = None if any(rows is None for _, rows in jobs[1:]) else torch.zeros(n, dtype=torch.bool,
                                                                                      device=x.device)
        for (i, w), (_, rows), out in zip(active, jobs[1:], outs[1:]):
            self.stats[_GUIDE_KEYS[i] if i < len(_GUIDE_KEYS) else f"guide{i}"] += n if rows is None else len(rows)
            if rows is None:
                u = to_space(out, x, rule.space, sigma, t)
                st = store.get(i) if store is not None else None
                term, new = rule.delta(c, u, w + 1, st)
                g = g + term
                if store is not None:
                    store[i] = new
                continue
            xr, sr, tr = x[rows], sigma[rows], t[rows] if t is not None else None
            u = to_space(out, xr, rule.space, sr, tr)
            wr = w[rows].reshape(-1, *([1] * (x.ndim - 1)))
            st = None
            if store is not None:
                st = store.setdefault(i, torch.zeros_like(c))[rows]
            term, new = rule.delta(c[rows], u, wr, st)
            g = g.index_add(0, rows, term)
            if store is not None:
                store[i] = store[i].index_copy(0, rows, new)
            if touched is not None:             # None: a guide is active in every row
                touched[rows] = True
        if touched is None:
            return from_space(rule.finish(c, g), x, rule.space, sigma, t)
        rows = torch.nonzero(touched).flatten()
        out = D_main.clone()
        tr = t[rows] if t is not None else None
        out[rows] = from_space(rule.finish(c[rows], g[rows]), x[rows], rule.space, sigma[rows], tr)
        return out

    def _rule_state(self, n: int) -> dict:
        """The rule's per-guide state of this sampling run (`{guide index: [N, ...] tensor}`), rows in the order of
        the run's image seeds; refused outside a sampler run of n rows."""
        state = current_state()
        if state is None or state.run is None or len(state.seeds) != n:
            raise ValueError(f"rule {self.rule.describe()} keeps a state per image across the steps of a sampling run: "
                             "call the guided denoiser inside one of the library's samplers (generate, sample_heun, "
                             "...), with one row per seed")
        return state.run.cache.setdefault(("rule_state", id(self)), {})

    def _unguided(self, x, sigma, labels, t) -> torch.Tensor:
        """No guide is needed at this sigma: the main net alone, called as directly as the contract allows."""
        self.stats["main"] += len(x)
        net = self.main.net
        if self.max_batch is None or self.max_batch >= len(x):
            self.stats["forward_calls"] += 1
            out = self._caller(net)(x, sigma, labels) if t is None else flow_call(net, x, t, labels)
            return out.clone() if out is x else out          # a fresh tensor, as from the batched path
        outs = self._evaluate([(self.main, None)], x, sigma, labels, t)
        return outs[0]

    # -- evaluation of passes, batched per net -----------------------------------------------------------------
    def _evaluate(self, jobs, x, sigma, labels, t=None) -> list[torch.Tensor]:
        keys = current_keys(len(x)) if any(p.perturbation is not None for p, _ in jobs) else None
        results: list[Optional[torch.Tensor]] = [None] * len(jobs)
        if self._nested(len(x)):                  # inside another's perturbed pass: keep its batch layout
            for j, (p, rows) in enumerate(jobs):
                one: list = [None]
                self._run_whole_call([0], [(p, None)], x, sigma, labels, keys, one, t)
                results[j] = one[0] if rows is None else one[0][rows]
            return results  # type: ignore[return-value]
        for call in _plan_calls(jobs):
            if all(jobs[j][1] is None for j in call):
                self._run_whole_call(call, jobs, x, sigma, labels, keys, results, t)
            else:
                rows_of = [(p, rows if rows is not None else torch.arange(len(x), device=x.device))
                           for p, rows in jobs]
                self._run_call(call, rows_of, x, sigma, labels, keys, results, t)
        return results  # type: ignore[return-value]

    def _nested(self, n: int) -> bool:
        """Whether this call runs inside another hook scope (a guided denoiser inside another's perturbed pass, or
        a user's `Perturbation.active` block): its hooks act on every forward call of their module made here and
        expect the batch layout of the call they were installed for, so each pass must be one call of exactly
        this call's `n` rows, in order (no batching of passes, no row subsets, no split)."""
        if not scopes_active():
            return False
        if sharing_prefix():
            raise PrefixMismatch("a guided denoiser inside a shared-prefix call")   # the outer redoes it unshared
        if self.max_batch is not None and self.max_batch < n:
            raise ValueError(f"max_batch={self.max_batch} splits a call of {n} rows made inside another guided "
                             "denoiser's perturbed pass, whose hooks expect the whole call: set max_batch on the "
                             "outermost guided denoiser only")
        return True

    def _step(self, call_rows: int, pass_rows: int, passes: int, x: torch.Tensor) -> int:
        """Rows per network call: `max_batch` if given, else the default policy (`split_passes`)."""
        if self.max_batch is not None:
            return int(self.max_batch)
        return pass_rows if passes > 1 and split_passes(pass_rows, x) else call_rows

    def _run_whole_call(self, call: list[int], jobs, x, sigma, labels, keys, results, t=None) -> None:
        """`_run_call` when every pass of the call needs every row (constant weights): the inputs are the batch
        repeated once per pass, no row is gathered or scattered, and the degraded rows are known without reading
        anything back (one contiguous run per pass), so no host synchronisation is made."""
        n = len(x)
        m = len(call)
        net = jobs[call[0]][0].net
        pj = next((j for j in call if jobs[j][0].perturbation is not None), None)
        pert = jobs[pj][0] if pj is not None else None
        level = sigma if t is None else t
        xc = x if m == 1 else torch.cat([x] * m)
        sc = level if m == 1 else torch.cat([level] * m)
        any_labels = labels is not None and any(not jobs[j][0].drop_labels or jobs[j][0].uncond_labels is not None
                                                for j in call)
        lc = None
        if any_labels:
            parts = [_pass_labels_all(jobs[j][0], labels, n) for j in call]
            lc = parts[0] if m == 1 else cat_rows(parts)
        kc = None
        span = None
        state = current_state()
        keys_from_state = state is not None and len(state.seeds) == n      # keys = current_keys(n): mix(seed, call)
        if pert is not None:
            kc = keys if m == 1 else torch.cat([keys] * m)
            pos = call.index(pj)
            span = (pos * n, (pos + 1) * n)                 # the degraded rows of the call
            p = pert.perturbation
            if type(p).transform_inputs is not Perturbation.transform_inputs:
                dc = torch.zeros(len(xc), dtype=torch.bool, device=x.device)
                dc[span[0]:span[1]] = True
                if t is None:
                    xc, sc = p.transform_inputs(xc, sc, dc, kc)
                else:
                    xc, sc = _flow_transform(p, xc, sc, dc, kc)
        total = n * m
        share = (self.share_prefix and pert is not None and m == 2 and pj == call[1]
                 and not any(jobs[j][0].drop_labels for j in call)
                 and type(pert.perturbation).transform_inputs is Perturbation.transform_inputs
                 and isinstance(pert.hook_target(), torch.nn.Module))
        step = total if share and self.max_batch is None else max(1, self._step(total, n, m, x))
        caller = self._caller(net) if t is None else (lambda x_, t_, l_: flow_call(net, x_, t_, l_))
        outs = []
        for a in range(0, total, step):
            b = min(a + step, total)
            whole = a == 0 and b == total
            xa, sa = (xc, sc) if whole else (xc[a:b], sc[a:b])
            lab = lc if whole or lc is None else take_rows(lc, slice(a, b))
            self.stats["forward_calls"] += 1
            # the rows' own seeds for a denoiser that is itself guided (the batch repeated m times, chunk a:b)
            rows = nullcontext() if m == 1 and whole else rows_context(n, repeat=m, chunk=slice(a, b))
            lo, hi = (max(span[0], a), min(span[1], b)) if span is not None else (0, 0)
            if hi > lo:
                s_pert = sa if t is None else t_to_sigma(sa)
                ka = kc if whole else kc[a:b]
                if share and whole:
                    outs.append(self._shared_call(pert, caller, xa, sa, lab, ka, s_pert, n))
                    continue
                # the degraded rows' keys are the sampler's own when they are every row, in order
                from_state = hi - lo == n and keys_from_state
                with pert.perturbation.active(pert.hook_target(), None, ka, s_pert,
                                              span=(lo - a, hi - a, from_state)), rows:
                    outs.append(caller(xa, sa, lab))
            else:
                with rows:
                    outs.append(caller(xa, sa, lab))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        for k, j in enumerate(call):
            results[j] = out if m == 1 else out[k * n:(k + 1) * n]

    def _shared_call(self, pert: Pass, caller, xa, sa, lab, ka, s_pert, n: int) -> torch.Tensor:
        """One call `[x; x]` (exact rows, then degraded) with the prefix before the first perturbed module computed
        once (`SharedPrefix`); where a prefix module's output cannot be duplicated, the call is redone unshared."""
        target = pert.hook_target()
        key = ("prefix", id(pert.perturbation), id(target), n)
        try:
            state = current_state()
            act = pert.perturbation.active(target, None, ka, s_pert,
                                           span=(n, 2 * n, state is not None and len(state.seeds) == n))
            with act, SharedPrefix(target, act.modules, n, key) as sp, rows_context(n, repeat=2):
                out = caller(xa, sa, lab)
            if sp.shared:
                self.stats["shared_prefix_calls"] += 1
            return out
        except PrefixMismatch:
            with pert.perturbation.active(target, None, ka, s_pert, span=(n, 2 * n)), rows_context(n, repeat=2):
                return caller(xa, sa, lab)

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
            if keys is not None:
                ks.append(keys[rows])
            degraded.append(torch.full((len(rows),), p.perturbation is not None, dtype=torch.bool, device=x.device))
            if any_labels:
                ls.append(_pass_labels(p, labels, rows))
        xc, sc, kc, dc = torch.cat(xs), torch.cat(ss), torch.cat(ks) if ks else None, torch.cat(degraded)
        lc = cat_rows(ls) if any_labels else None
        if pert is not None:
            if t is None:
                xc, sc = pert.perturbation.transform_inputs(xc, sc, dc, kc)
            else:
                xc, sc = _flow_transform(pert.perturbation, xc, sc, dc, kc)
        n = len(xc)
        step = max(1, self._step(n, len(x), len(call), x))
        outs = []
        caller = self._caller(net) if t is None else (lambda x_, t_, l_: flow_call(net, x_, t_, l_))
        src = torch.cat([jobs[j][1] for j in call])   # the batch row of each row of the call
        for a in range(0, n, step):
            b = min(a + step, n)
            lab = take_rows(lc, slice(a, b)) if lc is not None else None
            self.stats["forward_calls"] += 1           # network calls actually made, max_batch chunks included
            rows = rows_context(len(x), src[a:b])      # the rows' own seeds for a denoiser that is itself guided
            if pert is not None and bool(dc[a:b].any()):
                s_pert = sc[a:b] if t is None else t_to_sigma(sc[a:b])
                with pert.perturbation.active(pert.hook_target(), dc[a:b], kc[a:b], s_pert), rows:
                    outs.append(caller(xc[a:b], sc[a:b], lab))
            else:
                with rows:
                    outs.append(caller(xc[a:b], sc[a:b], lab))
        out = torch.cat(outs)
        start = 0
        for j in call:
            m = len(jobs[j][1])
            results[j] = out[start:start + m]
            start += m


_GUIDE_KEYS = [f"guide{i}" for i in range(8)]


def _flow_time(x_t: torch.Tensor, t) -> torch.Tensor:
    """`t` as the `[N]` flow times of `x_t`'s rows, checked (in (0, 1])."""
    check_x(x_t, name="x_t")
    t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device)
    t = t.expand(len(x_t)) if t.ndim == 0 else t
    if t.shape != (len(x_t),) or not bool(((t > 0) & (t <= 1)).all()):
        raise ValueError(f"flow time t must be a scalar or [{len(x_t)}] tensor in (0, 1], got {t.tolist()}")
    return t


def _weight_minus_one(c: float, dtype) -> Optional[float]:
    """`w - 1` for a constant weight `c` exactly as the per-row path computes it (w cast to float32, then to the
    batch's dtype, minus 1 in that dtype), as a Python number; None where that w is 1 (the guide is skipped)."""
    key = (c, dtype)
    if key not in _WM1:
        w = torch.tensor(c, dtype=torch.float32).to(dtype)
        if len(_WM1) > 256:
            _WM1.clear()
        _WM1[key] = None if bool(w == 1) else (w - 1).item()
    return _WM1[key]


_WM1: dict = {}


def _checked_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """`as_sigma(sigma, x)`, without its checks (and their read-backs) for the sigma tensor a sampler declared in
    its noise context: the sampler checked its noise levels (finite, > 0) once per run."""
    state = current_state()
    if state is not None and state.sigma is sigma and isinstance(sigma, torch.Tensor) \
            and sigma.dtype in (torch.float32, torch.float64) and sigma.dtype == x.dtype \
            and sigma.device == x.device and sigma.shape == (x.shape[0],):
        return sigma
    return as_sigma(sigma, x)


#: input elements per pass (rows x elements of one row of x) from which a CPU runs the passes of one net as separate
#: calls: measured (docs/benchmarks_cost.md), the digits U-Net's one call of 2N rows costs 1.8x / 1.95x / 2.1x its
#: N-row call at 64 / 128 / 256 rows of 64 elements, two calls 2.0x; the toy MLP's (2 elements per row) one call
#: 1.1x to 1.5x up to 512 rows, two calls 2.0x. Two calls also halve the activations held at once.
CPU_SPLIT_ELEMENTS = 1 << 14


def split_passes(pass_rows: int, x: torch.Tensor) -> bool:
    """The default `max_batch` policy: run the passes of one net as separate calls of `pass_rows` rows each (True)
    or as one batched call (False). One call on accelerators (a GPU is not saturated by the batches where per-call
    overhead matters); on a CPU, separate calls from `CPU_SPLIT_ELEMENTS` input elements per pass on."""
    return x.device.type == "cpu" and pass_rows * math.prod(x.shape[1:]) >= CPU_SPLIT_ELEMENTS


def _pass_labels_all(p: Pass, labels, n: int):
    """`_pass_labels` for every row: the labels as they are, or the pass's "no label" input."""
    if not p.drop_labels:
        return labels
    if p.uncond_labels is not None:
        return broadcast_rows(p.uncond_labels, labels, n)
    if isinstance(labels, Mapping):
        raise ValueError("labels is a mapping, where a zero row need not mean 'no label': pass the unconditional "
                         "input explicitly, e.g. ag.cfg(net, w, uncond_labels={...empty-prompt embeddings...})")
    return torch.zeros_like(labels)


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
        interval: Optional[tuple[float, float]] = None, max_batch: Optional[int] = None,
        rule: Union[None, str, Rule] = None) -> Guided:
    """Classifier-free guidance: guide = the same net without labels (one batched call), or a separate
    unconditional net `uncond`. `interval=(sigma_lo, sigma_hi)` applies w only there (guidance interval).
    `uncond_labels` is the unconditional input where "no label" is not a zero row (a mapping of e.g. empty-prompt
    embeddings, batch 1 or none, broadcast to the batch; keys it lacks keep the conditional rows). `rule` combines
    the passes (`autoguidance.rules`; default linear)."""
    _check_conditional(net, uncond)
    guide = Pass(uncond if uncond is not None else net, drop_labels=True, uncond_labels=uncond_labels)
    return Guided(Pass(net), [Guide(guide, _weight(w, interval))], max_batch, rule=rule)


def autoguidance(net: Callable, guide: Callable, w: ScheduleLike, *,
                 interval: Optional[tuple[float, float]] = None, max_batch: Optional[int] = None,
                 rule: Union[None, str, Rule] = None) -> Guided:
    """Autoguidance (Karras et al. 2024): guide = a smaller and/or shorter-trained model of the same task."""
    check_guide(net, guide)
    return Guided(Pass(net), [Guide(Pass(guide), _weight(w, interval))], max_batch, rule=rule)


def perturbation_guidance(net: Callable, w: ScheduleLike, perturbation: Perturbation, *,
                          module: Optional[torch.nn.Module] = None, interval: Optional[tuple[float, float]] = None,
                          max_batch: Optional[int] = None, share_prefix: bool = False,
                          rule: Union[None, str, Rule] = None) -> Guided:
    """Guide a net with itself under a perturbation; both passes share one batched forward call.
    `share_prefix=True` computes the network up to the first perturbed module once for both passes
    (`autoguidance.perturb.prefix`: worth it when the sites sit late in the network)."""
    if not isinstance(perturbation, Perturbation):
        raise TypeError(f"perturbation must be an autoguidance.perturb.Perturbation, got {type(perturbation).__name__}")
    return Guided(Pass(net), [Guide(Pass(net, perturbation=perturbation, module=module), _weight(w, interval))],
                  max_batch, share_prefix=share_prefix, rule=rule)


def insitu(net: Callable, w: ScheduleLike, p: ScheduleLike = 0.1, *, where: Where = None, mode: str = "element",
           module: Optional[torch.nn.Module] = None, interval: Optional[tuple[float, float]] = None,
           max_batch: Optional[int] = None, share_prefix: bool = False, rule: Union[None, str, Rule] = None) -> Guided:
    """In-situ autoguidance (2025): guide = the same net with dropout `p` switched on at `where` (default: its
    `torch.nn.Dropout` modules). The paper's `w'` is `w = w' + 1` (see `insitu_weight`). With late sites
    (e.g. the last blocks) and `share_prefix=True` the exact and the dropout pass share the network up to the
    first site (docs/benchmarks_cost.md)."""
    return perturbation_guidance(net, w, Dropout(p, where, mode), module=module, interval=interval,
                                 max_batch=max_batch, share_prefix=share_prefix, rule=rule)


def cfg_autoguidance(net: Callable, guide: Callable, w: float, a: float, *, uncond: Optional[Callable] = None,
                     uncond_labels: Any = None, max_batch: Optional[int] = None,
                     rule: Union[None, str, Rule] = None) -> Guided:
    """CFG and autoguidance together (Karras et al. 2024, App. B.2):
    `D = D_m + (w_u - 1)(D_m - D_uncond) + (w_c - 1)(D_m - D_guide)`, `w_u = (1-a)(w-1)+1`, `w_c = a(w-1)+1`.
    `a = 0` is pure CFG, `a = 1` pure autoguidance."""
    w = check_weight(w)
    _check_conditional(net, uncond)
    check_guide(net, guide)
    if isinstance(a, bool) or not (isinstance(a, (int, float)) and 0.0 <= a <= 1.0):
        raise ValueError(f"mixing ratio a must be in [0, 1], got {a!r}")
    w_u, w_c = (1 - a) * (w - 1) + 1, a * (w - 1) + 1
    return Guided(Pass(net), [Guide(Pass(uncond if uncond is not None else net, drop_labels=True,
                                                    uncond_labels=uncond_labels), as_schedule(w_u)),
                              Guide(Pass(guide), as_schedule(w_c))], max_batch, rule=rule)


def insitu_weight(w_prime: float) -> float:
    """Convert the in-situ paper's `D_good + w' (D_good - D_bad)` weight to this library's `w = w' + 1`."""
    if isinstance(w_prime, bool) or not isinstance(w_prime, (int, float)) or not math.isfinite(w_prime):
        raise ValueError(f"w' must be a finite number, got {w_prime!r}")
    return check_weight(w_prime + 1.0, "w = w' + 1")
