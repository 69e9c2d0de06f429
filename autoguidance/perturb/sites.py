"""Where a perturbation acts: module paths, types and globs resolved to sites; the per-type rule registries
(skip paths, identity attention) that model libraries fill through their adapters."""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Sequence, Union

import torch

__all__ = ["Where", "SiteError", "find_sites", "list_sites", "default_sites", "RuleRegistry",
           "register_rule_provider"]

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


def default_sites(model: torch.nn.Module, accept: Callable[[torch.nn.Module], bool], what: str, how: str):
    found = [(n, m) for n, m in model.named_modules() if n and accept(m)]
    if not found:
        raise SiteError(f"{type(model).__name__} has no module that supports {what} by default. {how} "
                        "List candidates with autoguidance.perturb.list_sites(model).")
    return found



#: module-name prefix (a library's top-level package, e.g. 'diffusers.') -> a function that registers that
#: library's rules. Adapters add theirs when imported (`autoguidance.adapters`); perturb never imports a library.
_RULE_PROVIDERS: dict[str, Callable[[], None]] = {}


def register_rule_provider(module_prefix: str, provider: Callable[[], None]) -> None:
    """Call `provider()` (once) the first time a rule is looked up for a module whose class lives in a module
    starting with `module_prefix`: how an adapter teaches perturbations its library's modules lazily."""
    if not isinstance(module_prefix, str) or not module_prefix or not callable(provider):
        raise TypeError("register_rule_provider(module_prefix, provider) needs a non-empty string and a callable")
    _RULE_PROVIDERS[module_prefix] = provider


def _run_providers(module: torch.nn.Module) -> None:
    name = type(module).__module__
    for prefix in [p for p in _RULE_PROVIDERS if name.startswith(p)]:
        _RULE_PROVIDERS.pop(prefix)()


class RuleRegistry(dict):
    """module type -> rule; `lookup(module)` walks the type's MRO, asking the adapters' providers once on a miss."""

    def lookup(self, module: torch.nn.Module):
        for _ in range(2):
            for t in type(module).__mro__:
                if t in self:
                    return self[t]
            _run_providers(module)
        return None
