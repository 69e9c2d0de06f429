"""The machinery every perturbation shares: `Perturbation.active` installs forward hooks for one call and removes
them on exit; `_RowSet` reads and writes the degraded rows of a batched call; strength checks and row selection."""
from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..rng import current_state
from ..schedules import Schedule, _finite

__all__ = ["Perturbation", "Hook", "check_nonnegative", "check_rate", "check_not_compiled"]

#: the `Perturbation.active` blocks entered in this thread / context: a hook acts only on calls made inside the
#: block that installed it, so another thread calling the same network meanwhile gets the plain network.
_ACTIVE: contextvars.ContextVar[frozenset] = contextvars.ContextVar("autoguidance_active_perturbations",
                                                                   default=frozenset())


def _owned(fn: Callable, token: object) -> Callable:
    """`fn`, acting only when called in the context that holds `token` (elsewhere it returns None: no change)."""
    get = _ACTIVE.get

    def hook(*a):
        if token not in get():
            return None
        return fn(*a)
    hook.__wrapped__ = fn
    hook.scope_token = token
    return hook


def scopes_active() -> bool:
    """Whether a hook scope (a perturbation's `active` block, prefix sharing) is entered in this context: then a
    denoiser call made here runs under hooks that expect the batch layout of the call that entered it (a guided
    denoiser called inside another's perturbed pass keeps that layout: `autoguidance.guidance`)."""
    return bool(_ACTIVE.get())


class _PerturbationToken:
    """The token of a `Perturbation.active` block (prefix sharing has its own kind): tells whose hooks are live."""

    __slots__ = ()


def live_perturbation_hooks(module: torch.nn.Module) -> list[Callable]:
    """The forward hooks on `module` of perturbations active in this context (the functions `_owned` wraps)."""
    live = _ACTIVE.get()
    if not live:
        return []
    return [h.__wrapped__ for h in module._forward_hooks.values()
            if isinstance(getattr(h, "scope_token", None), _PerturbationToken) and h.scope_token in live]


def run_cache() -> Optional[dict]:
    """The cache of the current sampling run (`rng.SamplingRun`), or None outside a sampler: what does not change
    between the denoiser calls of one run (a perturbation's sites in a model, their output shapes) is kept here,
    so it is found once per run and never outlives it."""
    state = current_state()
    return state.run.cache if state is not None and state.run is not None else None


def _is_compiled(model) -> bool:
    """True for a `torch.compile` wrapper (`torch._dynamo.eval_frame.OptimizedModule`)."""
    return hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule"


def check_not_compiled(model: torch.nn.Module, what: str, name: str = "") -> None:
    """Refuse (one line) a network that is, or contains, a compiled module: a `torch.compile(net)` wrapper, or a
    module compiled in place by `module.compile()` (which sets `_compiled_call_impl`). Hooks added to it after
    compilation are ignored or force a recompile depending on its call history, and a forward replaced on it is not
    what the compiled graph runs, so `what` (a perturbation, `guided_pipeline`) cannot act on it. `name` names
    `model` in the message (`pipe.unet`; default: 'net'). Nothing is compiled or run here."""
    root = name or "net"
    for path, m in model.named_modules():
        where = f"{root}.{path}" if path else root
        if _is_compiled(m):
            raise TypeError(f"{what} cannot act on {where}, a torch.compile'd network (its compiled graph ignores "
                            f"hooks and forwards installed later): pass the uncompiled network {where}._orig_mod, "
                            "and compile only networks that are not guided")
        if m.__dict__.get("_compiled_call_impl") is not None:
            raise TypeError(f"{what} cannot act on {where}, compiled in place by {where}.compile() (its compiled "
                            "call ignores hooks and forwards installed later): undo it with "
                            f"`del {where}._compiled_call_impl`, or guide an uncompiled copy")


def _rows_like(v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (out.ndim - 1))).to(out.dtype)


class _RowSet:
    """Batch rows `idx` (sorted, as `nonzero` gives them). A contiguous run (the degraded half of a batched call)
    is read as a view and written back with one concatenation instead of a gather and a full-size scatter."""

    def __init__(self, idx: torch.Tensor, span: Optional[tuple[int, int]] = None):
        self.idx = idx
        if span is not None:                           # given by the caller: no read-back of idx
            self.span = span
            return
        first, last = (int(idx[0]), int(idx[-1])) if len(idx) else (0, -1)
        self.span = (first, last + 1) if last - first + 1 == len(idx) else None

    @classmethod
    def from_span(cls, a: int, b: int, device=None) -> "_RowSet":
        """Rows `a..b-1`."""
        return cls(torch.arange(a, b, device=device), (a, b))

    def take(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.span[0]:self.span[1]] if self.span else t[self.idx]

    def put(self, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`t` with the rows replaced by `rows` (out of place: the hooked module's output is not written)."""
        if self.span:
            a, b = self.span
            return torch.cat([t[:a], rows, t[b:]])
        return t.index_copy(0, self.idx, rows)

    def put_product(self, t: torch.Tensor, factor: Callable[[int, int], torch.Tensor],
                    rows_per_chunk: Optional[int] = None) -> torch.Tensor:
        """`put(t, take(t) * factors)`, out of place; `factor(i, j)` gives the factors of degraded rows i..j-1.
        When no gradient is needed and the rows are a contiguous run, the product is written straight into the
        result `rows_per_chunk` rows at a time (default: all), so a site's factors never exist in full (less
        memory, and the chunk stays in cache)."""
        m = len(self.idx)
        if self.span is None or (torch.is_grad_enabled() and t.requires_grad):
            return self.put(t, self.take(t) * factor(0, m))
        a, b = self.span
        res = torch.empty_like(t, memory_format=torch.contiguous_format)
        res[:a].copy_(t[:a])
        res[b:].copy_(t[b:])
        step = max(1, int(rows_per_chunk or m))
        for i in range(0, m, step):
            j = min(m, i + step)
            torch.mul(t[a + i:a + j], factor(i, j), out=res[a + i:a + j])
        return res


@dataclass(frozen=True)
class Hook:
    """A hook a perturbation registers for the duration of `Perturbation.active`.

    kind 'forward': `fn(module, args, output)`; 'forward_kwargs': `fn(module, args, kwargs, output)`; both return
    a replacement output or None. 'forward_pre_kwargs': `fn(module, args, kwargs)` before the module runs, returning
    None (it reads the call, e.g. the token grid of an enclosing module). `first`: run before the module's other
    hooks of that kind (weight noise replaces the module's own output, which other perturbations of that module then
    act on). `site`: the module is a perturbed site (prefix sharing stops before it); False for hooks that only
    read a call. (`_hooks` may also return plain `(module, fn)` pairs: 'forward' hooks.)"""

    module: torch.nn.Module
    fn: Callable
    kind: str = "forward"
    first: bool = False
    site: bool = True


class Perturbation:
    """Base class. Subclasses override `transform_inputs` (perturb x, sigma of the degraded rows) and/or
    `_hooks` (forward hooks on sites). `strength` is a number or a `Schedule` of sigma."""

    name = "perturbation"

    def transform_inputs(self, x: torch.Tensor, sigma: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor):
        return x, sigma

    def _hooks(self, model, rows, keys, sigma) -> list:  # -> list of Hook or (module, forward_hook_fn)
        return []

    def _hooks_span(self, model, span: tuple[int, int], keys, sigma) -> Optional[list]:
        """The hooks when the degraded rows are exactly the run `span = (a, b)` of the batch (a batched guided call:
        exact rows, then degraded ones), or None for "use `_hooks`". Lets a perturbation skip finding its rows on
        every call; the hooks must act exactly as `_hooks` would with `rows` True on `a..b-1`."""
        return None

    def _cached_sites(self, model) -> list:
        """`self.sites(model)`, found once per sampling run (`run_cache`), else on every call."""
        cache = run_cache()
        if cache is None:
            return self.sites(model)
        key = ("sites", id(self), id(model))
        hit = cache.get(key)
        if hit is None or hit[0] is not self or hit[1] is not model:
            hit = cache[key] = (self, model, self.sites(model))
        return hit[2]

    def _sites_and_rows(self, model, strength: Schedule, rows, sigma):
        """`(sites, idx, s)`: the validated sites of `model` (`self.sites`), and the rows degraded with a strength
        `s > 0` (`idx [M]`, `s [M]` float32)."""
        sites = self._cached_sites(model)
        return (sites, *_strength_rows(strength, rows, sigma))

    def active(self, model: torch.nn.Module, rows: Optional[torch.Tensor], keys: torch.Tensor,
               sigma: torch.Tensor, *, span: Optional[tuple[int, int]] = None) -> "_Active":
        """Within the block, `model`'s forward degrades the batch rows where `rows` is True.
        `keys` `[B]` int64 seeds the randomness row by row; `sigma` `[B]` evaluates strength schedules.
        `span=(a, b)` says the degraded rows are exactly `a..b-1` (then `rows` may be None); a third entry True
        says their keys are `current_keys` of the sampler's noise context, in row order.
        Every hook is removed on exit, also after an exception."""
        if rows is None and span is None:
            raise TypeError("active() needs rows (a [B] bool tensor) or span=(first, end)")
        return _Active(self, model, rows, keys, sigma, span)


def _span_hooks_apply(cls) -> bool:
    """Whether `cls._hooks_span` stands for `cls._hooks`: a `_hooks_span` names the `_hooks` it is the lean form of
    (`_hooks_span.span_of`), so a subclass (or a patch) that changes `_hooks` alone gets its `_hooks` called."""
    return getattr(cls._hooks_span, "span_of", None) is cls._hooks


class HookScope:
    """Hooks that act only inside one `with` block, in the thread and context that entered it: each is registered
    wrapped by `_owned(fn, self.token)`, `activate()` makes the token current, `close()` restores the context and
    removes every hook (also after an exception). `Perturbation.active` and prefix sharing are both scopes."""

    __slots__ = ("handles", "reset", "token")

    def __init__(self, token: Optional[object] = None):
        self.handles: list = []
        self.reset = None
        self.token = object() if token is None else token

    def activate(self) -> None:
        self.reset = _ACTIVE.set(_ACTIVE.get() | {self.token})

    def close(self) -> None:
        try:
            if self.reset is not None:
                _ACTIVE.reset(self.reset)
                self.reset = None
        finally:
            while self.handles:
                self.handles.pop().remove()


def _check_compiled_once(model: torch.nn.Module, what: str) -> None:
    """`check_not_compiled(model, what)`, once per sampling run and model (`run_cache`)."""
    cache = run_cache()
    key = ("not-compiled", id(model))
    if cache is not None and cache.get(key) is model:
        return
    check_not_compiled(model, what)
    if cache is not None:
        cache[key] = model


class _Active(HookScope):
    """The context manager of `Perturbation.active`: installs the hooks on entry, removes them on exit."""

    __slots__ = ("pert", "model", "rows", "keys", "sigma", "span", "modules")

    def __init__(self, pert, model, rows, keys, sigma, span):
        super().__init__(_PerturbationToken())
        self.pert, self.model, self.rows, self.keys, self.sigma, self.span = pert, model, rows, keys, sigma, span
        self.modules: list = []          # the perturbed sites hooked (known inside the block)

    def __enter__(self) -> None:
        pert, model = self.pert, self.model
        if model is None and type(pert)._hooks is not Perturbation._hooks:
            raise TypeError(f"{type(pert).__name__} hooks into a torch.nn.Module: pass module=<the network> when "
                            "the denoiser is a plain function")
        if model is not None:
            _check_compiled_once(model, type(pert).__name__)
        hooks = (pert._hooks_span(model, self.span, self.keys, self.sigma)
                 if self.span is not None and _span_hooks_apply(type(pert)) else None)
        if hooks is None:
            rows = self.rows
            if rows is None:
                a, b = self.span[0], self.span[1]
                rows = torch.zeros(len(self.keys), dtype=torch.bool, device=self.sigma.device)
                rows[a:b] = True
            hooks = pert._hooks(model, rows, self.keys, self.sigma)
        token = self.token
        handles = self.handles
        try:
            for h in hooks:
                first, site = False, True
                if isinstance(h, Hook):
                    module, fn, kind, first, site = h.module, h.fn, h.kind, h.first, h.site
                else:
                    module, fn, *rest = h
                    kind = rest[0] if rest else "forward"
                if kind == "forward":
                    handles.append(module.register_forward_hook(_owned(fn, token), prepend=first))
                elif kind == "forward_kwargs":
                    handles.append(module.register_forward_hook(_owned(fn, token), with_kwargs=True,
                                                                prepend=first))
                elif kind == "forward_pre_kwargs":
                    handles.append(module.register_forward_pre_hook(_owned(fn, token), with_kwargs=True,
                                                                    prepend=first))
                else:
                    raise ValueError(f"unknown hook kind {kind!r}: expected 'forward', 'forward_kwargs' or "
                                     "'forward_pre_kwargs'")
                if site:
                    self.modules.append(module)
            self.activate()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


# -- shared helpers of the perturbations below ------------------------------------------------------------------

def check_nonnegative(v: float, what: str) -> float:
    """A finite strength >= 0 (input-noise fraction k, weight-noise std)."""
    v = _finite(v, what)
    if v < 0:
        raise ValueError(f"{what} must be >= 0 (0 = no perturbation), got {v}")
    return v


def check_rate(v: float, what: str) -> float:
    """A rate in [0, 1] (block drop at rate 1 removes the block from every degraded row)."""
    v = _finite(v, what)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {v}")
    return v


def _strength_rows(schedule: Schedule, rows: torch.Tensor, sigma: torch.Tensor):
    """Rows that are degraded with a strength > 0: `(idx [M] int64, strength [M] float32)`."""
    v = torch.where(rows, schedule(sigma).to(device=sigma.device, dtype=torch.float32),
                    torch.zeros((), dtype=torch.float32, device=sigma.device))
    idx = torch.nonzero(v > 0).flatten()
    return idx, v[idx]


def _take_rows(obj: Any, idx: torch.Tensor, n: int) -> Any:
    """`obj` (a tensor, or tuples / lists / dicts of them) with every tensor whose axis 0 has length `n` cut to
    the rows `idx`; other values (scalars, broadcast tensors) pass unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj[idx] if obj.ndim >= 1 and obj.shape[0] == n else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_take_rows(o, idx, n) for o in obj)
    if isinstance(obj, dict):
        return {k: _take_rows(v, idx, n) for k, v in obj.items()}
    return obj

