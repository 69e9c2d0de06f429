"""What every combination rule shares: the `Rule` interface, the spaces a rule acts in, the projection APG and FDG
use, and `combine`, the rule applied to one call's predictions (for callers that hold the tensors themselves, such
as a pipeline's guider).

A rule turns the main prediction `c` and the guide predictions `u_i` with weights `w_i` into the guided one,

    g = finish(c, c + sum_i delta(c, u_i, w_i))          linear: delta = (w_i - 1)(c - u_i), finish = identity

`delta` is one guide's term (the rule's generalisation from CFG's pair to several guides is stated in each rule's
docstring), `finish` a correction of the sum against `c` (rescale). Both are plain functions of tensors (and, for
stateful rules, of the per-row state `delta` returns): a rule knows nothing of who calls it.

Spaces. The library's denoisers predict x0; diffusers' guiders see the model output (the noise prediction eps, or a
flow model's velocity v). A rule with `space='eps'` or `'v'` acts on

    eps = (x - D) / sigma,          v = eps - D                          (EDM call D(x, sigma))
    eps = (x_t - (1 - t) D) / t,    v = (x_t - D) / t                    (flow call D.flow(x_t, t), the same quantities)

`to_space` / `from_space` convert (affine in D at fixed x and noise level, so linear guidance is the same in every
space). At t = 1 (pure noise) eps is x_t whatever D is, so eps is refused there: use 'v' or 'x0' for flow models.
`space=None` (every rule's default) is the caller's own space: x0 for the library's denoisers, the model's own output
type inside a diffusers pipeline or guider (where diffusers applies its guiders). A caller with a space of its own
(a pipeline model's output type) passes a `Space` object, which converts for itself.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Optional, Sequence

import torch

__all__ = ["Rule", "SPACES", "Space", "to_space", "from_space", "project", "combine", "check_number", "check_space",
           "check_form", "space_name"]

#: the spaces a rule can act in
SPACES = ("x0", "eps", "v")
#: where the anchors put the rule's update: on the conditional (main) prediction, `c + (w - 1) upd` (the APG
#: paper's), or on the unconditional (guide) one, `u + w upd` (diffusers' guiders by default); equal when upd = c - u
FORMS = ("conditional", "unconditional")


def check_number(v, name: str, lo: Optional[float] = None, hi: Optional[float] = None, integer: bool = False):
    """A finite number (an integer if `integer`) in [lo, hi], or a one-line error naming the parameter."""
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    if ok and integer:
        ok = float(v).is_integer()
    if not ok or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = "" if lo is None and hi is None else (f" >= {lo:g}" if hi is None else
                                                    (f" <= {hi:g}" if lo is None else f" in [{lo:g}, {hi:g}]"))
        want = "an integer" if integer else "a finite number"
        raise ValueError(f"rule parameter {name} must be {want}{rng}, got {v!r}")
    return int(v) if integer else float(v)


class Space:
    """A space a caller defines for itself (a pipeline model's own output type: `adapters.diffusers.model_call.
    OutputSpace`): `to(D, x, sigma, t)` maps x0 predictions `D` `[N, ...]` there and `back(y, x, sigma, t)` inverts,
    both affine in D at fixed `x` and noise level (EDM: `sigma` `[N]`, `t` None; flow: `x` = x_t at `t` `[N]`)."""

    name: ClassVar[str] = "custom"

    def to(self, D: torch.Tensor, x: torch.Tensor, sigma, t) -> torch.Tensor:
        raise NotImplementedError

    def back(self, y: torch.Tensor, x: torch.Tensor, sigma, t) -> torch.Tensor:
        raise NotImplementedError


def check_space(space):
    """`space` if it is a space a rule can take: None (the caller's own), one of SPACES, or a `Space`."""
    if space is not None and not isinstance(space, Space) and space not in SPACES:
        raise ValueError(f"rule parameter space must be one of {', '.join(SPACES)} (x0: the denoised prediction; "
                         f"eps / v: the noise / flow-velocity form diffusers' guiders see), or None (the caller's "
                         f"own: x0 for the library's denoisers, the model output in pipelines), got {space!r}")
    return space


def space_name(space) -> str:
    """How a rule's space reads in messages and records: 'x0', 'eps', 'v', 'default' (None) or a `Space`'s name."""
    return "default" if space is None else space.name if isinstance(space, Space) else str(space)


def check_form(form) -> str:
    if form not in FORMS:
        raise ValueError(f"rule parameter form must be 'conditional' (c + (w - 1) update, the paper's) or "
                         f"'unconditional' (u + w update, diffusers'), got {form!r}")
    return form


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row `[N]` tensor shaped to broadcast against `like` `[N, ...]`."""
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def _coefficients(x: torch.Tensor, space: str, sigma: Optional[torch.Tensor], t: Optional[torch.Tensor]):
    """`(a, b)` with `space = a x + b D`, per row, broadcastable against x (x0 and None: None)."""
    if space is None or space == "x0":
        return None
    if t is None:
        s = _col(sigma, x)
        return (1 / s, -1 / s) if space == "eps" else (1 / s, -(1 + s) / s)
    tt = _col(t, x)
    if space == "eps":
        if bool((t >= 1).any()):
            raise ValueError("space='eps' is undefined at flow time t = 1 (the noise prediction is x_t itself there, "
                             "whatever the model predicts): use space='v' or 'x0' for flow models")
        return 1 / tt, -(1 - tt) / tt
    return 1 / tt, -1 / tt


def to_space(D: torch.Tensor, x: torch.Tensor, space, sigma: Optional[torch.Tensor] = None,
             t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The x0 prediction `D` `[N, ...]` of input `x` (EDM: at `sigma` `[N]`; flow: x_t at `t` `[N]`) in `space`
    (None: x0; a `Space`: its own map)."""
    if isinstance(space, Space):
        return space.to(D, x, sigma, t)
    ab = _coefficients(x, space, sigma, t)
    return D if ab is None else ab[0] * x + ab[1] * D


def from_space(y: torch.Tensor, x: torch.Tensor, space, sigma: Optional[torch.Tensor] = None,
               t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inverse of `to_space`: the x0 prediction whose `space` form is `y`."""
    if isinstance(space, Space):
        return space.back(y, x, sigma, t)
    ab = _coefficients(x, space, sigma, t)
    return y if ab is None else (y - ab[0] * x) / ab[1]


def _dims(v: torch.Tensor) -> list[int]:
    return list(range(1, v.ndim))


def project(v: torch.Tensor, onto: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(parallel, orthogonal)` parts of `v` with respect to `onto`, per row over all but the batch axis, computed in
    float64 and returned in `v`'s dtype (`[N, ...]` each). A zero `onto` row has no direction: all of v is orthogonal."""
    v64, o64 = v.double(), onto.double()
    dims = _dims(v64)
    unit = o64 / torch.linalg.vector_norm(o64, dim=dims, keepdim=True).clamp_min(1e-12)
    par = (v64 * unit).sum(dim=dims, keepdim=True) * unit
    return par.to(v.dtype), (v64 - par).to(v.dtype)


class Rule:
    """A combination rule (see the module docstring). Subclasses are frozen dataclasses of their parameters and
    set `name` (the `--rule` key), `paper` (source and arXiv id) and `formula` (one line, for `autoguidance rules`).

    `stateful` rules keep a per-row state across the calls of a sampling run (`delta` takes and returns it; None on
    the first call); `zero_init_steps > 0` makes the first steps of a run return a zero model output without any
    network pass (CFG-Zero*)."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    formula: ClassVar[str] = ""
    space = None                   # the caller's own space (Linear: the same in every space)

    zero_init_steps = 0            # steps at the start of a run with a zero output and no network pass

    @property
    def stateful(self) -> bool:
        return False

    def delta(self, c: torch.Tensor, u: torch.Tensor, w, state: Any = None) -> tuple[torch.Tensor, Any]:
        """One guide's term `[M, ...]` for main / guide predictions `c`, `u` `[M, ...]` in `self.space` and weight
        `w` (a number, or a tensor broadcastable against c, e.g. `[M, 1, 1, 1]`), and the new state."""
        raise NotImplementedError

    def finish(self, c: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The guided prediction from `g = c + sum of deltas` (default: g itself)."""
        return g

    def in_space(self, space) -> "Rule":
        """This rule acting in `space` where its own space is None (the caller's own); itself otherwise (an explicit
        space, or a rule without one: Linear is the same in every space)."""
        import dataclasses

        if self.space is None and "space" in {f.name for f in dataclasses.fields(self)}:
            return dataclasses.replace(self, space=space)
        return self

    def describe(self) -> str:
        """`name(param=value, ...)` (the parameters that differ from the defaults)."""
        import dataclasses

        ps = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
              if getattr(self, f.name) != f.default]
        return f"{self.name}({', '.join(ps)})"


def combine(rule: Rule, c: torch.Tensor, us: Sequence[torch.Tensor], ws: Sequence, states: Optional[list] = None):
    """`(g, states)`: the rule on one call's predictions, all in `rule.space` (`c`, each `u_i` `[N, ...]`, `w_i` a
    number or per-row tensor `[N]`); `states` one entry per guide (None at the first call). For callers that hold
    the tensors (a pipeline's guider); `Guided` does the same with row selection and the per-image run state."""
    if len(us) != len(ws):
        raise ValueError(f"got {len(us)} guide predictions and {len(ws)} weights: give one weight per guide")
    states = list(states) if states is not None else [None] * len(us)
    g = c
    for i, (u, w) in enumerate(zip(us, ws)):
        w = _col(w, c) if isinstance(w, torch.Tensor) and w.ndim == 1 else w
        term, states[i] = rule.delta(c, u, w, states[i])
        g = g + term
    return rule.finish(c, g), states
