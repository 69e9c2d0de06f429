"""Where a perturbation acts: module paths, types and globs resolved to sites; the per-type rule registries
(skip paths, identity attention) that model libraries fill through their adapters; what default sites leave out
(adapters' own modules, calls that fold another axis into the batch); the token grid of image tokens."""
from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Callable, Optional, Sequence, Union

import torch

from .base import Hook

__all__ = ["Where", "SiteError", "find_sites", "list_sites", "default_sites", "RuleRegistry",
           "register_rule_provider", "register_adapter_layer", "register_folded_batch", "register_token_grid",
           "TokenGrids", "site_predicate"]

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


def default_sites(model: torch.nn.Module, accept: Callable[[torch.nn.Module, str], bool], what: str, how: str):
    """`[(path, module)]` of the modules `accept(module, path)` takes, in `named_modules()` order, leaving out the
    modules that are not the model's own (`register_adapter_layer`: an adapter's dropout and weights) and those
    called with another axis folded into the batch (`register_folded_batch`), where no per-row perturbation can
    act. A SiteError naming `how` (the flag to pass) if there is none."""
    skip = _not_default(model)
    found = [(n, m) for n, m in model.named_modules() if n and n not in skip and accept(m, n)]
    if not found:
        raise SiteError(f"{type(model).__name__} has no module that supports {what} by default. {how} "
                        "List candidates with autoguidance.perturb.list_sites(model).")
    return found


def site_predicate(fn: Callable) -> Callable[[torch.nn.Module, str], bool]:
    """A rule's site predicate as `pred(module, path)`: rules may register `fn(module)` or `fn(module, path)` (a
    path tells what the module is where its type does not: diffusers' `attn1` is the self-attention of a block)."""
    try:
        params = [q for q in inspect.signature(fn).parameters.values()
                  if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD) and q.default is q.empty]
    except (TypeError, ValueError):
        params = []
    if len(params) >= 2:
        return fn
    return lambda m, path: fn(m)


#: module-name prefix (a library's top-level package, e.g. 'diffusers.') -> a function that registers that
#: library's rules. Adapters add theirs when imported (`autoguidance.adapters`); perturb never imports a library.
_RULE_PROVIDERS: dict[str, Callable[[], None]] = {}
#: bumped whenever a rule or a provider is registered: the look-ups cached per type before are stale
_GENERATION = [0]


def register_rule_provider(module_prefix: str, provider: Callable[[], None]) -> None:
    """Call `provider()` (once) the first time a rule is looked up for a module whose class lives in a module
    starting with `module_prefix`: how an adapter teaches perturbations its library's modules lazily."""
    if not isinstance(module_prefix, str) or not module_prefix or not callable(provider):
        raise TypeError("register_rule_provider(module_prefix, provider) needs a non-empty string and a callable")
    _RULE_PROVIDERS[module_prefix] = provider
    _GENERATION[0] += 1


def _run_providers(module: torch.nn.Module) -> None:
    name = type(module).__module__
    for prefix in [p for p in _RULE_PROVIDERS if name.startswith(p)]:
        _RULE_PROVIDERS.pop(prefix)()


class RuleRegistry(dict):
    """module type -> rule; `lookup(module)` walks the type's MRO, asking the adapters' providers once on a miss.
    Look-ups are cached per type until the next registration (default sites look up every module of a model)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cache: dict = {}
        self._generation = -1

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        _GENERATION[0] += 1

    def lookup(self, module: torch.nn.Module):
        if self._generation != _GENERATION[0]:
            self._cache.clear()
            self._generation = _GENERATION[0]
        t = type(module)
        if t in self._cache:
            return self._cache[t]
        rule = None
        for _ in range(2):
            rule = next((self[c] for c in t.__mro__ if c in self), None)
            if rule is not None:
                break
            _run_providers(module)
        if self._generation == _GENERATION[0]:      # no provider registered anything meanwhile
            self._cache[t] = rule
        return rule


# -- what default sites leave out ----------------------------------------------------------------------------------

#: adapter layer type (peft's tuner layers) -> fn(module) -> the model's own layer it wraps (or None)
_ADAPTER_LAYERS = RuleRegistry()
#: module type -> fn(module) -> paths (relative) of its submodules that are called with another axis folded into
#: the batch (CogVideoX's patch embedding convolves every frame as its own row)
_FOLDED_BATCH = RuleRegistry()


def register_adapter_layer(module_type: type, base: Callable[[torch.nn.Module], Optional[torch.nn.Module]]) -> None:
    """Mark a module type as an adapter's layer (peft's `BaseTunerLayer`: LoRA and the like): the modules inside it
    belong to the adapter, not to the model, except the model's own layer it wraps, `base(module)` (and what that
    holds). Default sites leave the adapter's modules out (a LoRA's `lora_dropout` is the adapter's training
    regulariser, its `lora_A` / `lora_B` the adapter's weights), so loading an adapter does not change a guide's
    sites. Name them to include them: `where=torch.nn.Dropout` (every module of the type) or a glob such as
    `'*lora_dropout.*'`."""
    if not isinstance(module_type, type) or not callable(base):
        raise TypeError("register_adapter_layer(module_type, base) needs a class and a callable")
    _ADAPTER_LAYERS[module_type] = base


def register_folded_batch(module_type: type, inner: Callable[[torch.nn.Module], Sequence[str]]) -> None:
    """Mark the submodules `inner(module)` (paths relative to a module of `module_type`) as called with another axis
    folded into the batch (rows are not images): default sites leave them out, as a per-row perturbation cannot
    tell an image's rows there."""
    if not isinstance(module_type, type) or not callable(inner):
        raise TypeError("register_folded_batch(module_type, inner) needs a class and a callable")
    _FOLDED_BATCH[module_type] = inner


def _not_default(model: torch.nn.Module) -> set:
    """Paths of `model` that default sites leave out (see `default_sites`)."""
    roots: set = set()                      # paths whose subtree is left out
    for path, m in model.named_modules():
        pre = f"{path}." if path else ""
        base = _ADAPTER_LAYERS.lookup(m)
        if base is not None:
            own = base(m)
            roots.update(f"{pre}{n}" for n, c in m.named_children() if c is not own)
        fold = _FOLDED_BATCH.lookup(m)
        if fold is not None:
            roots.update(f"{pre}{rel}" for rel in fold(m))
    if not roots:
        return roots
    out = set()
    for path, _ in model.named_modules():
        parts = path.split(".")
        if any(".".join(parts[:k]) in roots for k in range(1, len(parts) + 1)):
            out.add(path)
    return out


# -- where image tokens lie ----------------------------------------------------------------------------------------

#: module type -> fn(module, args, kwargs) -> the token grid of the image tokens its attention layers see
_TOKEN_GRIDS = RuleRegistry()


def register_token_grid(module_type: type, fn: Callable) -> None:
    """Teach perturbations that act on image tokens (SEG's blur) where the image tokens lie in the attention layers
    inside a module type: `fn(module, args, kwargs)` reads one call of the module and returns the token grid,
    row-major (`(H, W)`; `(T, H, W)` for video), or None where this module does not know it (an enclosing module
    may); it raises ValueError where the tokens lie on no grid. A transformer's grid is its latent's size over its
    patch size; a U-Net's `Transformer2DModel` gives the size of its own input."""
    if not isinstance(module_type, type) or not callable(fn):
        raise TypeError("register_token_grid(module_type, fn) needs a class and a callable")
    _TOKEN_GRIDS[module_type] = fn


class TokenGrids:
    """The token grid each of `paths` (sites of `model`) sees in the current call: the grid the nearest enclosing
    module (the site itself first) with a `register_token_grid` rule read from its own call. `hooks()` are the
    pre-hooks that read them (not sites); `grid(path)` is the grid of the site's current call."""

    def __init__(self, model: torch.nn.Module, paths: Sequence[str]):
        self.chains: dict = {}
        self.readers: dict = {}
        self.seen: dict = {}
        for path in paths:
            parts = path.split(".") if path else []
            chain = []
            for k in range(len(parts), -1, -1):
                prefix = ".".join(parts[:k])
                m = model.get_submodule(prefix) if prefix else model
                rule = _TOKEN_GRIDS.lookup(m)
                if rule is not None:
                    chain.append(prefix)
                    self.readers[prefix] = (m, rule)
            self.chains[path] = chain

    def hooks(self) -> list:
        out = []
        for prefix, (m, rule) in self.readers.items():
            def read(mod, args, kwargs, prefix=prefix, rule=rule):
                g = rule(mod, args, kwargs)
                self.seen[prefix] = None if g is None else tuple(int(v) for v in g)
                return None
            out.append(Hook(m, read, "forward_pre_kwargs", site=False))
        return out

    def grid(self, path: str, what: str) -> tuple:
        for prefix in self.chains.get(path, ()):
            g = self.seen.get(prefix)
            if g is not None:
                return g
        raise SiteError(f"{what} at {path!r}: the grid of its image tokens is unknown (no enclosing module of a type "
                        "with a token-grid rule saw this call); register one with "
                        "autoguidance.perturb.register_token_grid")
