"""Seeded, per-sample degradations of one forward pass, which leave the model exactly as it was found.

A perturbation degrades chosen rows of one batched call: forward hooks on chosen module paths, registered only
inside `Perturbation.active(...)` and removed on exit (also after an exception). Masks come from counter-based
per-row keys (`autoguidance.rng`), so one call can carry the exact pass and the degraded pass side by side, a
seed reproduces the image, and the result does not depend on batch size. The model is never put in `train()`
(which would also switch normalisation layers, and make EDM2's layers rewrite their weights).

Choosing where (`where=`):
    torch.nn.Dropout              every module of a type (or a tuple of types)
    "trunk.act*"                  a glob on module paths
    ["trunk.act0", "trunk.act1"]  explicit paths; a path that does not exist raises an error listing close matches
Use `list_sites(model)` (or `autoguidance sites MODEL`) to see the candidates.
"""
from __future__ import annotations

import difflib
import fnmatch
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch

from .rng import hash_uniform, mix_keys
from .schedules import Schedule, as_schedule, check_probability

__all__ = ["Perturbation", "Dropout", "find_sites", "list_sites", "Where", "SiteError"]

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


class Perturbation:
    """Base class. Subclasses override `transform_inputs` (perturb x, sigma of the degraded rows) and/or
    `_hooks` (forward hooks on sites). `strength` is a number or a `Schedule` of sigma."""

    name = "perturbation"

    def transform_inputs(self, x: torch.Tensor, sigma: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor):
        return x, sigma

    def _hooks(self, model, rows, keys, sigma) -> list:  # -> list of (module, hook_fn)
        return []

    @contextmanager
    def active(self, model: torch.nn.Module, rows: torch.Tensor, keys: torch.Tensor,
               sigma: torch.Tensor) -> Iterator[None]:
        """Within the block, `model`'s forward degrades the batch rows where `rows` is True.
        `keys` `[B]` int64 seeds the randomness row by row; `sigma` `[B]` evaluates strength schedules."""
        with ExitStack() as stack:
            for module, fn in self._hooks(model, rows, keys, sigma):
                stack.callback(module.register_forward_hook(fn).remove)
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

    def _hooks(self, model, rows, keys, sigma):
        sites = find_sites(model, self.where, default=torch.nn.Dropout)
        p = torch.where(rows, self.p(sigma).to(sigma.device), torch.zeros_like(sigma))
        idx = torch.nonzero(p > 0).flatten()
        if len(idx) == 0:
            return []
        hooks = []
        for site_index, (path, module) in enumerate(sites):
            site_keys = mix_keys(keys[idx], 0xD120, site_index)

            def hook(mod, inp, out, site_keys=site_keys):
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"dropout site {type(mod).__name__} returns {type(out).__name__}, not a tensor; "
                                    "choose a module whose output is a tensor")
                shape = list(out.shape[1:])
                if self.mode == "channel" and out.ndim > 2:
                    shape = [shape[0]] + [1] * (out.ndim - 2)
                u = hash_uniform(site_keys, shape)
                p_rows = _rows_like(p[idx], u)
                scale = torch.ones(out.shape[0], *shape, dtype=out.dtype, device=out.device)
                scale[idx] = ((u >= p_rows).to(out.dtype) / (1 - p_rows)).to(out.dtype)
                return out * scale

            hooks.append((module, hook))
        return hooks
