"""Seeded, per-sample degradations of one forward pass, which leave the model exactly as it was found.

A perturbation degrades chosen rows of one batched call: forward hooks on chosen module paths, registered only
inside `Perturbation.active(...)` and removed on exit (also after an exception). Random draws are pure functions
of per-row keys (image seed, denoiser call, site: `autoguidance.rng`; dropout masks via the faster 32-bit
`rng.dropout_keep`), so one call can carry the exact pass and the degraded pass side by side, a seed reproduces the
image, and the result does not depend on batch size. The model is never put in `train()`
(which would also switch normalisation layers, and make EDM2's layers rewrite their weights).

The perturbations (each strength a number or a `Schedule` of sigma, so p(sigma) can follow the noise level):

    Dropout(p, where, mode)          dropout on module outputs, element- or channel-wise (in-situ autoguidance)
    BlockDrop(p, where, path)        stochastic depth: a residual block returns its input / its skip path at rate p
    InputNoise(k)                    D(x + sqrt(s'^2 - s^2) n; s') with s' = (1 + k) s (Karras et al. 2024, "+10%")
    WeightNoise(std, where, params)  multiplicative Gaussian noise W (1 + std n) on chosen weights, per row
    IdentityAttention(scale, where)  self-attention map -> identity: the output is the values (perturbed-attention
                                     guidance, Ahn et al. 2024); scale blends A' = (1 - scale) A + scale I

Choosing where (`where=`):
    torch.nn.Dropout              every module of a type (or a tuple of types)
    "trunk.act*"                  a glob on module paths
    ["trunk.act0", "trunk.act1"]  explicit paths; a path that does not exist raises an error listing close matches
Use `list_sites(model)` (or `autoguidance sites MODEL`) to see the candidates.
"""
from __future__ import annotations

import difflib
import fnmatch
import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from .rng import DropoutMasks, dropout_keep, hash_normal, hash_uniform, mix_keys, mix_keys_per_salt
from .schedules import Schedule, _finite, as_schedule, check_probability

__all__ = ["Perturbation", "Hook", "Dropout", "BlockDrop", "InputNoise", "WeightNoise", "IdentityAttention",
           "find_sites", "list_sites", "register_skip_path", "register_identity_attention", "dropout_keep", "Where",
           "SiteError"]

Where = Union[None, type, tuple, str, Sequence[str]]


class SiteError(ValueError):
    """A module path or pattern matches nothing in the model."""


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def find_sites(model: torch.nn.Module, where: Where, default=None) -> list[tuple[str, torch.nn.Module]]:
    """Resolve `where` to `[(path, module), ...]` in `named_modules()` order. Errors name close matches."""
    named = [(n, m) for n, m in model.named_modules() if n]
    if where is None:
        where = default
    if where is None:
        raise SiteError("no sites given: pass where= a module type, a glob on module paths, or a list of paths "
                        "(see autoguidance.perturb.list_sites(model))")
    if isinstance(where, type) or (isinstance(where, tuple) and all(isinstance(t, type) for t in where)):
        found = [(n, m) for n, m in named if isinstance(m, where)]
        if not found:
            types = sorted({type(m).__name__ for _, m in named})
            raise SiteError(f"the model has no module of type {where}; its module types are: {', '.join(types)}. "
                            "Name sites by path instead (where='path.to.module' or a glob)")
        return found
    patterns = [where] if isinstance(where, str) else list(where)
    paths = [n for n, _ in named]
    chosen: list[str] = []
    for pat in patterns:
        hits = fnmatch.filter(paths, pat) if _has_glob(pat) else [p for p in paths if p == pat]
        if not hits:
            close = difflib.get_close_matches(pat, paths, n=5, cutoff=0.5)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise SiteError(f"module path {pat!r} matches nothing in {type(model).__name__}.{hint} "
                            "List candidates with autoguidance.perturb.list_sites(model).")
        chosen.extend(h for h in hits if h not in chosen)
    modules = dict(named)
    return [(p, modules[p]) for p in paths if p in chosen]


def list_sites(model: torch.nn.Module, *example_args, **example_kwargs) -> list[dict]:
    """Every named module with its type and, if an example input is given, its output shape.

    `example_args` are passed to `model(...)` under `torch.no_grad()` with temporary hooks that only record shapes."""
    rows = [{"path": n, "type": type(m).__name__, "output_shape": None} for n, m in model.named_modules() if n]
    if example_args or example_kwargs:
        by_path = {r["path"]: r for r in rows}
        handles = []
        for n, m in model.named_modules():
            if n:
                def rec(mod, inp, out, n=n):
                    if isinstance(out, torch.Tensor) and by_path[n]["output_shape"] is None:
                        by_path[n]["output_shape"] = list(out.shape)
                handles.append(m.register_forward_hook(rec))
        try:
            with torch.no_grad():
                model(*example_args, **example_kwargs)
        finally:
            for h in handles:
                h.remove()
    return rows


def _rows_like(v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (out.ndim - 1))).to(out.dtype)


class _RowSet:
    """Batch rows `idx` (sorted, as `nonzero` gives them). A contiguous run (the degraded half of a batched call)
    is read as a view and written back with one concatenation instead of a gather and a full-size scatter."""

    def __init__(self, idx: torch.Tensor):
        self.idx = idx
        first, last = (int(idx[0]), int(idx[-1])) if len(idx) else (0, -1)
        self.span = (first, last + 1) if last - first + 1 == len(idx) else None

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
    a replacement output or None. (`_hooks` may also return plain `(module, fn)` pairs: 'forward' hooks.)"""

    module: torch.nn.Module
    fn: Callable
    kind: str = "forward"


class Perturbation:
    """Base class. Subclasses override `transform_inputs` (perturb x, sigma of the degraded rows) and/or
    `_hooks` (forward hooks on sites). `strength` is a number or a `Schedule` of sigma."""

    name = "perturbation"

    def transform_inputs(self, x: torch.Tensor, sigma: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor):
        return x, sigma

    def _hooks(self, model, rows, keys, sigma) -> list:  # -> list of Hook or (module, forward_hook_fn)
        return []

    def _sites_and_rows(self, model, strength: Schedule, rows, sigma):
        """`(sites, idx, s)`: the validated sites of `model` (`self.sites`), and the rows degraded with a strength
        `s > 0` (`idx [M]`, `s [M]` float32)."""
        sites = self.sites(model)
        return (sites, *_strength_rows(strength, rows, sigma))

    @contextmanager
    def active(self, model: torch.nn.Module, rows: torch.Tensor, keys: torch.Tensor,
               sigma: torch.Tensor) -> Iterator[None]:
        """Within the block, `model`'s forward degrades the batch rows where `rows` is True.
        `keys` `[B]` int64 seeds the randomness row by row; `sigma` `[B]` evaluates strength schedules.
        Every hook is removed on exit, also after an exception."""
        if model is None and type(self)._hooks is not Perturbation._hooks:
            raise TypeError(f"{type(self).__name__} hooks into a torch.nn.Module: pass module=<the network> when "
                            "the denoiser is a plain function")
        with ExitStack() as stack:
            for h in self._hooks(model, rows, keys, sigma):
                h = h if isinstance(h, Hook) else Hook(*h)
                if h.kind == "forward":
                    handle = h.module.register_forward_hook(h.fn)
                elif h.kind == "forward_kwargs":
                    handle = h.module.register_forward_hook(h.fn, with_kwargs=True)
                else:
                    raise ValueError(f"unknown hook kind {h.kind!r}: expected 'forward' or 'forward_kwargs'")
                stack.callback(handle.remove)
            yield


@dataclass(frozen=True, eq=False)
class Dropout(Perturbation):
    """Dropout on the outputs of the chosen modules, rescaled by 1/(1-p) (in-situ autoguidance, p = 0.1).

    mode 'element' drops single activations (as torch.nn.Dropout); 'channel' drops whole channels (axis 1) of
    conv features. Default sites: every `torch.nn.Dropout` module (where a net trained with dropout has it)."""

    p: Union[float, Schedule] = 0.1
    where: Where = None
    mode: str = "element"
    name = "dropout"

    def __post_init__(self):
        object.__setattr__(self, "p", as_schedule(self.p, "dropout probability p", check_probability))
        if self.mode not in ("element", "channel"):
            raise ValueError(f"dropout mode must be 'element' or 'channel', got {self.mode!r}")

    def sites(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        return find_sites(model, self.where, default=torch.nn.Dropout)

    def _hooks(self, model, rows, keys, sigma):
        sites, idx, p = self._sites_and_rows(model, self.p, rows, sigma)
        if len(idx) == 0:
            return []
        hooks = []
        degraded = _RowSet(idx)
        masks = DropoutMasks(p)                              # p's thresholds and multipliers, once for all sites
        all_keys = mix_keys_per_salt(mix_keys(keys[idx], 0xD120), range(len(sites)))   # [sites, M]
        for site_index, (path, module) in enumerate(sites):

            def hook(mod, inp, out, site_keys=all_keys[site_index]):
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"dropout site {type(mod).__name__} returns {type(out).__name__}, not a tensor; "
                                    "choose a module whose output is a tensor")
                shape = list(out.shape[1:])
                if self.mode == "channel" and out.ndim > 2:
                    shape = [shape[0]] + [1] * (out.ndim - 2)
                site_keys = site_keys.to(out.device)

                def scale(i, j):                                       # [j - i, *shape]: 0 or 1/(1-p)
                    return masks.scale(site_keys[i:j], shape, rows=slice(i, j)).to(out.dtype)
                rows = max(1, _DROPOUT_CHUNK // max(1, math.prod(shape)))
                return degraded.put_product(out, scale, rows)                   # exact rows untouched

            hooks.append((module, hook))
        return hooks


#: elements per chunk of a dropout site's multipliers (int32 hash state and result: ~1.5 MB, cache-sized)
_DROPOUT_CHUNK = 1 << 18


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


def _default_sites(model: torch.nn.Module, accept: Callable[[torch.nn.Module], bool], what: str, how: str):
    found = [(n, m) for n, m in model.named_modules() if n and accept(m)]
    if not found:
        raise SiteError(f"{type(model).__name__} has no module that supports {what} by default. {how} "
                        "List candidates with autoguidance.perturb.list_sites(model).")
    return found


def _maybe_register_adapter_rules(module: torch.nn.Module) -> None:
    """Modules of diffusers get their rules (skip path, identity attention) from the diffusers adapter."""
    if type(module).__module__.startswith("diffusers."):
        from .adapters.diffusers import register_rules
        register_rules()


def _lookup(registry: dict, module: torch.nn.Module):
    for _ in range(2):
        for t in type(module).__mro__:
            if t in registry:
                return registry[t]
        _maybe_register_adapter_rules(module)
    return None


# -- block drop --------------------------------------------------------------------------------------------------

#: module type -> fn(module, *args, **kwargs) -> the block's output with its residual branch removed.
_SKIP_PATHS: dict[type, Callable[..., torch.Tensor]] = {}


def register_skip_path(module_type: type, fn: Callable[..., torch.Tensor]) -> None:
    """Teach `BlockDrop(path='skip')` the skip path of a residual block type: `fn(module, *args, **kwargs)` gets
    the block's forward arguments (already cut to the dropped rows) and returns what the block outputs without
    its residual branch. A module may instead define a method `skip_path(*args, **kwargs)` (as `EDM2Block` does)."""
    if not isinstance(module_type, type) or not callable(fn):
        raise TypeError("register_skip_path(module_type, fn) needs a class and a callable")
    _SKIP_PATHS[module_type] = fn


def _skip_path_rule(module: torch.nn.Module) -> Optional[Callable]:
    if callable(getattr(module, "skip_path", None)):
        return lambda m, *a, **k: m.skip_path(*a, **k)
    return _lookup(_SKIP_PATHS, module)


@dataclass(frozen=True, eq=False)
class BlockDrop(Perturbation):
    """Stochastic depth (Huang et al. 2016) at sampling time: each chosen residual block of a degraded row is
    dropped at rate p, independently per row, block and denoiser call. A dropped block returns

    - path 'skip':  its skip path, the block without its residual branch (and, in EDM2, without its attention):
                    `EDM2Block.skip_path`, diffusers' `ResnetBlock2D` (shortcut / output_scale_factor), or a rule
                    added with `register_skip_path`;
    - path 'input': its input unchanged (the block must keep the shape: same channels, no resampling);
    - path 'auto':  'skip' where the block has a skip-path rule, else 'input'.

    No rescaling of the kept blocks (an inference-time degradation, not a training regulariser). Default sites:
    every module with a skip-path rule (all `EDM2Block`s of an EDM2 net).
    """

    p: Union[float, Schedule] = 0.1   # drop rate per block and row, or a Schedule p(sigma)
    where: Where = None               # blocks that may be dropped (default: every block with a skip path)
    path: str = "auto"                # 'auto', 'skip' or 'input': what a dropped block returns
    name = "block drop"

    def __post_init__(self):
        object.__setattr__(self, "p", as_schedule(self.p, "block drop rate p", check_rate))
        if self.path not in ("auto", "skip", "input"):
            raise ValueError(f"block drop path must be 'auto', 'skip' or 'input', got {self.path!r}")

    def sites(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        if self.where is None:
            return _default_sites(model, lambda m: _skip_path_rule(m) is not None, "block drop",
                                  "Name the residual blocks with where= (a type, a glob, or paths), and use "
                                  "path='input' for blocks that keep their input's shape.")
        return find_sites(model, self.where)

    def _hooks(self, model, rows, keys, sigma):
        sites, idx, p = self._sites_and_rows(model, self.p, rows, sigma)
        if len(idx) == 0:
            return []
        n = len(rows)
        hooks = []
        for site_index, (path, module) in enumerate(sites):
            u = hash_uniform(mix_keys(keys[idx], 0xB10C, site_index), [1])[:, 0].to(p.device)
            dropped = idx[u < p]                      # rows of this call whose block `path` is dropped
            if len(dropped) == 0:
                continue
            rule = _skip_path_rule(module) if self.path in ("auto", "skip") else None
            if rule is None and self.path == "skip":
                raise TypeError(f"block drop path='skip' at {path!r}: {type(module).__name__} has no skip path. "
                                "Give the class a method skip_path(*args, **kwargs), register one with "
                                "autoguidance.perturb.register_skip_path, or use path='input'")

            def hook(mod, args, kwargs, out, dropped=dropped, rule=rule, path=path):
                if not isinstance(out, torch.Tensor) or out.shape[0] != n:
                    raise TypeError(f"block drop site {path!r} ({type(mod).__name__}) must return a tensor with "
                                    f"the batch ({n} rows) on axis 0; choose a residual block module")
                if rule is not None:
                    new = rule(mod, *_take_rows(args, dropped, n), **_take_rows(kwargs, dropped, n))
                else:
                    x = args[0] if args else None
                    if not isinstance(x, torch.Tensor) or x.shape[1:] != out.shape[1:]:
                        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                        raise ValueError(f"block drop path='input' at {path!r}: the block maps {got} to "
                                         f"{list(out.shape)}, so it cannot return its input; choose blocks that "
                                         "keep the shape, or give the block a skip path (path='skip')")
                    new = x[dropped]
                return _RowSet(dropped).put(out, new.to(out.dtype))

            hooks.append(Hook(module, hook, "forward_kwargs"))
        return hooks


# -- input noise -------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class InputNoise(Perturbation):
    """More noise than the sampler put in (Karras et al. 2024, Sec. 5.1, "+10% input noise"): the degraded pass
    evaluates `D(x + sqrt(s'^2 - s^2) n; s')` with `s' = (1 + k) s` and `n ~ N(0, I)` drawn per row from its key,
    i.e. the net sees a sample of the noise level it is told. k = 0.1 is Karras' D_good, k = 0.2 their D_bad.

    It changes inputs only (`transform_inputs`), so it needs no sites and works on any denoiser."""

    k: Union[float, Schedule] = 0.1   # relative increase of sigma, s' = (1 + k) s, or a Schedule k(sigma)
    name = "input noise"

    def __post_init__(self):
        object.__setattr__(self, "k", as_schedule(self.k, "input noise fraction k", check_nonnegative))

    def transform_inputs(self, x: torch.Tensor, sigma: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor):
        """`x [B, ...]`, `sigma [B]` -> the same with the degraded rows moved to the noise level `(1 + k) sigma`."""
        idx, k = _strength_rows(self.k, rows, sigma)
        if len(idx) == 0:
            return x, sigma
        s = sigma[idx].to(torch.float32)
        s_new = (1 + k) * s
        n = hash_normal(mix_keys(keys[idx], 0x1A9E), x.shape[1:]).to(device=x.device)
        extra = _rows_like((s_new.square() - s.square()).sqrt(), n) * n
        rows = _RowSet(idx)
        return rows.put(x, rows.take(x) + extra.to(x.dtype)), rows.put(sigma, s_new.to(sigma.dtype))


# -- weight noise ------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class WeightNoise(Perturbation):
    """Multiplicative Gaussian noise on chosen weights, different for every degraded row: the row is computed with
    `W' = W (1 + std n)`, `n ~ N(0, I)` from its key, at each chosen site. The stored weights are never written:
    the site's output for the degraded rows is recomputed with `torch.func.functional_call` on the noisy weights
    (vectorised over rows with `torch.func.vmap`), so exact rows in the same call stay exact.

    `params` is a glob on parameter names relative to the site (`'weight'`: the site's own weight; `'*weight'`:
    every weight inside a block). Sites must not be nested. Cost: the degraded rows of every site run twice,
    and each holds its own copy of the site's noisy weights. Default sites: every module with a parameter
    matching `params` of its own (for EDM2 all `MPConv`s)."""

    std: Union[float, Schedule] = 0.1   # relative std of the multiplicative noise, or a Schedule std(sigma)
    where: Where = None                 # modules whose weights get noise (default: every module owning `params`)
    params: str = "weight"              # glob on the site's parameter names (relative, e.g. 'conv_res*.weight')
    name = "weight noise"

    def __post_init__(self):
        object.__setattr__(self, "std", as_schedule(self.std, "weight noise std", check_nonnegative))
        if not isinstance(self.params, str) or not self.params:
            raise ValueError(f"params must be a glob on parameter names such as 'weight', got {self.params!r}")

    def _names(self, module: torch.nn.Module, recurse: bool) -> list[str]:
        return [n for n, _ in module.named_parameters(recurse=recurse) if fnmatch.fnmatchcase(n, self.params)]

    def sites(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        if self.where is None:
            sites = _default_sites(model, lambda m: bool(self._names(m, False)), "weight noise",
                                   f"No module owns a parameter matching params={self.params!r}; name sites with "
                                   "where= and the parameters with params=.")
        else:
            sites = find_sites(model, self.where)
        paths = [p for p, _ in sites]
        for p in paths:
            inner = [q for q in paths if q.startswith(p + ".")]
            if inner:
                raise SiteError(f"weight noise sites must not be nested: {p!r} contains {inner[0]!r}. Choose "
                                "either the block (with params='*weight') or its layers")
        for p, m in sites:
            if not self._names(m, True):
                have = [n for n, _ in m.named_parameters()]
                raise SiteError(f"weight noise site {p!r} ({type(m).__name__}) has no parameter matching "
                                f"params={self.params!r}; its parameters: {', '.join(have) or '(none)'}")
        return sites

    def _hooks(self, model, rows, keys, sigma):
        sites, idx, std = self._sites_and_rows(model, self.std, rows, sigma)
        if len(idx) == 0:
            return []
        n = len(rows)
        busy = [False]   # set while a site's degraded rows are recomputed: hooks inside pass through
        degraded = _RowSet(idx)
        hooks = []
        for site_index, (path, module) in enumerate(sites):
            names = self._names(module, True)

            def hook(mod, args, kwargs, out, names=names, site_index=site_index, path=path):
                if busy[0]:
                    return None
                if not isinstance(out, torch.Tensor) or out.shape[0] != n:
                    raise TypeError(f"weight noise site {path!r} ({type(mod).__name__}) must return a tensor with "
                                    f"the batch ({n} rows) on axis 0")
                own = dict(mod.named_parameters())
                noisy = {}
                for j, name in enumerate(names):
                    w = own[name]
                    z = hash_normal(mix_keys(keys[idx], 0x3E16, site_index, j), w.shape).to(w.device)
                    noisy[name] = w * (1 + _rows_like(std, z) * z).to(w.dtype)   # [M, *w.shape]
                flat = list(args) + [kwargs[k] for k in sorted(kwargs)]
                batched = [isinstance(a, torch.Tensor) and a.ndim >= 1 and a.shape[0] == n for a in flat]

                def one_row(params, *row_args):
                    it = iter(row_args)
                    vals = [next(it)[None] if b else a for a, b in zip(flat, batched)]
                    a, kw = vals[:len(args)], dict(zip(sorted(kwargs), vals[len(args):]))
                    return torch.func.functional_call(mod, params, tuple(a), kw)[0]

                busy[0] = True
                try:
                    new = torch.func.vmap(one_row)(noisy, *[degraded.take(a) for a, b in zip(flat, batched) if b])
                finally:
                    busy[0] = False
                return degraded.put(out, new.to(out.dtype))

            hooks.append(Hook(module, hook, "forward_kwargs"))
        return hooks


# -- identity attention ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _AttentionRule:
    identity: Callable   # fn(module, args, kwargs) -> (output with identity attention, batch axis of that output)
    is_self_attention: Callable[[torch.nn.Module], bool]


_IDENTITY_ATTENTION: dict[type, _AttentionRule] = {}


def register_identity_attention(module_type: type, fn: Callable,
                                is_self_attention: Callable[[torch.nn.Module], bool] = lambda m: True) -> None:
    """Teach `IdentityAttention` an attention module type: `fn(module, args, kwargs)` gets the module's forward
    arguments and returns `(output, batch_axis)`, the module's (first) output computed with the attention map
    replaced by the identity, i.e. from the values alone. `is_self_attention(module)` picks default sites. A module
    may instead define a method `identity_attention(*args, **kwargs)` returning that output (batch on axis 0)."""
    if not isinstance(module_type, type) or not callable(fn):
        raise TypeError("register_identity_attention(module_type, fn) needs a class and a callable")
    _IDENTITY_ATTENTION[module_type] = _AttentionRule(fn, is_self_attention)


def _attention_rule(module: torch.nn.Module) -> Optional[_AttentionRule]:
    if callable(getattr(module, "identity_attention", None)):
        return _AttentionRule(lambda m, a, k: (m.identity_attention(*a, **k), 0), lambda m: True)
    return _lookup(_IDENTITY_ATTENTION, module)


def _mha_identity(m: torch.nn.MultiheadAttention, args, kwargs):
    """`torch.nn.MultiheadAttention` with identity attention: `out_proj(value W_v^T + b_v)`."""
    names = ["query", "key", "value"]
    q, k, v = [args[i] if len(args) > i else kwargs.get(names[i]) for i in range(3)]
    if v.ndim != 3:
        raise ValueError("identity attention on MultiheadAttention needs batched 3-D inputs")
    if q.shape[:2] != v.shape[:2]:
        raise ValueError(f"identity attention needs self-attention (as many queries as keys); got query "
                         f"{list(q.shape)} and value {list(v.shape)}")
    e = m.embed_dim
    w_v = m.in_proj_weight[2 * e:] if m.in_proj_weight is not None else m.v_proj_weight
    b_v = m.in_proj_bias[2 * e:] if m.in_proj_bias is not None else None
    out = m.out_proj(torch.nn.functional.linear(v, w_v, b_v))
    return out, 0 if m.batch_first else 1


register_identity_attention(torch.nn.MultiheadAttention, _mha_identity)


@dataclass(frozen=True, eq=False)
class IdentityAttention(Perturbation):
    """Perturbed self-attention (Ahn et al. 2024, perturbed-attention guidance): in the degraded rows, the chosen
    self-attention modules use the identity as attention map, so each position's output is its own value
    (projections kept). `scale` blends the map, `A' = (1 - scale) A + scale I`, i.e. the module's output becomes
    `(1 - scale) attention(q, k, v) + scale v`; scale 1 is PAG. Deterministic (no randomness to seed).

    Supported: EDM2's `EDM2Attention` (`unet.enc.16x16_block0.attn` ...), `torch.nn.MultiheadAttention`
    (self-attention calls), diffusers' `Attention` (self-attention; via the diffusers adapter), and any module with
    a method `identity_attention` or a rule added by `register_identity_attention`. Default sites: every supported
    self-attention module."""

    scale: Union[float, Schedule] = 1.0   # blend toward the identity map, in [0, 1], or a Schedule scale(sigma)
    where: Where = None                   # self-attention modules (default: every supported one)
    name = "identity attention"

    def __post_init__(self):
        object.__setattr__(self, "scale", as_schedule(self.scale, "identity attention scale", check_rate))

    def sites(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        if self.where is None:
            def accept(m):
                rule = _attention_rule(m)
                return rule is not None and bool(rule.is_self_attention(m))
            return _default_sites(model, accept, "identity attention",
                                  "Name the self-attention modules with where=, or register their type with "
                                  "autoguidance.perturb.register_identity_attention.")
        sites = find_sites(model, self.where)
        for p, m in sites:
            if _attention_rule(m) is None:
                raise TypeError(f"identity attention site {p!r}: {type(m).__name__} is not a supported attention "
                                "module. Choose an attention module (EDM2Attention, nn.MultiheadAttention, diffusers "
                                "Attention), or register its type with register_identity_attention")
        return sites

    def _hooks(self, model, rows, keys, sigma):
        sites, idx, scale = self._sites_and_rows(model, self.scale, rows, sigma)
        if len(idx) == 0:
            return []
        n = len(rows)
        degraded = _RowSet(idx)
        hooks = []
        for path, module in sites:
            rule = _attention_rule(module)

            def hook(mod, args, kwargs, out, rule=rule, path=path):
                first = out if isinstance(out, torch.Tensor) else out[0]
                ident, axis = rule.identity(mod, args, kwargs)
                a, v = first.movedim(axis, 0), ident.movedim(axis, 0)
                if a.shape[0] != n or v.shape != a.shape:
                    raise ValueError(f"identity attention at {path!r}: expected outputs with {n} rows on axis "
                                     f"{axis}, got {list(first.shape)} and identity {list(ident.shape)}")
                s = _rows_like(scale, a).to(a.dtype)
                new = degraded.put(a, (1 - s) * degraded.take(a) + s * degraded.take(v).to(a.dtype)).movedim(0, axis)
                return new if isinstance(out, torch.Tensor) else (new, *out[1:])

            hooks.append(Hook(module, hook, "forward_kwargs"))
        return hooks
