"""Prefix sharing: in a batched guided call `[x; x]` whose second half is degraded by a perturbation that acts through
forward hooks, everything the network computes before it first enters a perturbed module is the same in both
halves. `SharedPrefix` computes that prefix once: the modules that finish before the first perturbed module
(found by recording one call's module order) run on the first half of their inputs only, and their outputs are
duplicated for the second half. Generic: any `torch.nn.Module`, no knowledge of its architecture.

What it cannot share, and then does not try (the call runs in full, silently):

- perturbations that change the inputs (`transform_inputs`: input noise) or CFG's dropped labels: the halves differ
  from the start;
- a module called again after the first perturbed module (its later calls run in full: only calls made before any
  perturbed module is entered are cut);
- work outside modules (the network's own tensor code between module calls runs on both halves; cheap);
- a prefix module whose output is not tensors with the cut batch on axis 0 (the whole call is redone unshared).

The network must treat rows independently (no batch statistics: true of diffusion networks at inference). The
shared prefix runs on N rows instead of 2N, so the result equals the unshared call up to the floating-point rounding
of kernels that sum differently at another batch size (on some CPUs bit for bit, e.g. the shipped networks on the
machine this was written on from 16 rows per pass, but no kernel promises it; tests/test_prefix_sharing.py checks
the float32 tolerance of `tests/helpers.assert_batch_close`).
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import _ACTIVE, HookScope, _owned, run_cache

__all__ = ["SharedPrefix", "PrefixMismatch", "sharing_prefix"]


class PrefixMismatch(RuntimeError):
    """A prefix module's output could not be duplicated: the caller redoes the call without sharing."""


def _cut(obj, n: int, b: int, hit: list):
    if isinstance(obj, torch.Tensor):
        if obj.ndim >= 1 and obj.shape[0] == b:
            hit[0] = True
            return obj[:n]
        return obj
    if isinstance(obj, tuple):
        return tuple(_cut(o, n, b, hit) for o in obj)
    if isinstance(obj, list):
        return [_cut(o, n, b, hit) for o in obj]
    if isinstance(obj, dict):
        return {k: _cut(v, n, b, hit) for k, v in obj.items()}
    return obj


def _dup(obj, n: int):
    if isinstance(obj, torch.Tensor):
        if obj.ndim < 1 or obj.shape[0] != n:
            raise PrefixMismatch(f"a prefix module returned a tensor of shape {list(obj.shape)}, not {n} rows")
        return torch.cat([obj, obj])
    if isinstance(obj, tuple):
        return tuple(_dup(o, n) for o in obj)
    if isinstance(obj, list):
        return [_dup(o, n) for o in obj]
    if isinstance(obj, dict):
        return {k: _dup(v, n) for k, v in obj.items()}
    if obj is None:
        return None
    raise PrefixMismatch(f"a prefix module returned {type(obj).__name__}")


def _record(model: torch.nn.Module, sites: set, token) -> tuple[list, list]:
    """Hooks on every module of `model` that log (enter/exit, invocation, module) while `token` is active."""
    events: list = []
    handles = []
    counter = [0]
    for m in model.modules():
        def pre(mod, args, m=m):
            counter[0] += 1
            events.append(("enter", counter[0], mod))
            return None

        def post(mod, args, out, m=m):
            events.append(("exit", None, mod))
            return None
        handles.append(m.register_forward_pre_hook(_owned(pre, token)))
        handles.append(m.register_forward_hook(_owned(post, token)))
    return events, handles


def _roots(events: list, sites: set, model: torch.nn.Module) -> Optional[list]:
    """The modules whose calls finish before the first perturbed module is entered, and whose caller is still
    running then (the outermost such calls), from a recorded call; None if no perturbed module was entered."""
    stack: list = []          # open invocations: (id, module, parent invocation id)
    done: list = []           # finished invocations: (module, parent invocation id)
    for kind, inv, mod in events:
        if kind == "enter":
            if mod in sites:
                open_ids = {i for i, _, _ in stack}
                roots, seen = [], set()
                for m, parent in done:
                    if parent in open_ids and id(m) not in seen and m is not model:
                        seen.add(id(m))
                        roots.append(m)
                return roots
            stack.append((inv, mod, stack[-1][0] if stack else None))
        else:
            # the innermost open invocation of this module ends
            for k in range(len(stack) - 1, -1, -1):
                if stack[k][1] is mod:
                    inv_id, m, parent = stack.pop(k)
                    done.append((m, parent))
                    break
    return None


class _PrefixToken:
    """The token of a `SharedPrefix` block."""

    __slots__ = ()


def sharing_prefix() -> bool:
    """Whether a `SharedPrefix` block (recording or sharing) is entered in this context. A guided denoiser called
    inside one raises `PrefixMismatch`: its passes are separate calls of the module, which a prefix cut to half the
    rows would break, so the call that shares is redone unshared."""
    return any(isinstance(t, _PrefixToken) for t in _ACTIVE.get())


class SharedPrefix(HookScope):
    """Context manager around ONE network call of `2 n` rows (exact rows `[0, n)`, degraded rows `[n, 2 n)`, equal
    inputs) in which `sites` are the perturbed modules: the first call in a sampling run records the module order
    (and is not shared); later calls share the prefix. `shared` says whether this call shares."""

    def __init__(self, model: torch.nn.Module, sites: list, n: int, key):
        super().__init__(_PrefixToken())
        self.model, self.sites, self.n, self.b = model, set(sites), n, 2 * n
        self.key = key
        self.shared = False
        self.events = None

    def __enter__(self) -> "SharedPrefix":
        cache = run_cache()
        if cache is None or not self.sites:
            return self
        hit = cache.get(self.key)
        token = self.token
        try:
            if hit is None:                                   # first call of the run: record the module order
                self.events, self.handles = _record(self.model, self.sites, token)
            elif hit is not False and hit:
                self._install(hit, token)
                self.shared = True
            else:
                return self
            self.activate()
        except BaseException:
            self.close()
            raise
        return self

    def _install(self, roots: list, token) -> None:
        n, b = self.n, self.b
        state = {"reached": False}
        cut_stack: dict = {}

        def site_pre(mod, args):
            if any(any(st) for st in cut_stack.values()):   # entered inside a cut module: the order changed
                raise PrefixMismatch("a perturbed module ran inside a shared prefix module")
            state["reached"] = True
            return None

        def root_pre(mod, args, kwargs):
            st = cut_stack.setdefault(id(mod), [])
            if state["reached"]:
                st.append(False)
                return None
            hit = [False]
            args2, kwargs2 = _cut(args, n, b, hit), _cut(kwargs, n, b, hit)
            st.append(hit[0])
            return (args2, kwargs2) if hit[0] else None

        def root_post(mod, args, kwargs, out):
            if cut_stack[id(mod)].pop():
                return _dup(out, n)
            return None

        for s in self.sites:
            self.handles.append(s.register_forward_pre_hook(_owned(site_pre, token)))
        for m in roots:
            self.handles.append(m.register_forward_pre_hook(_owned(root_pre, token), with_kwargs=True))
            self.handles.append(m.register_forward_hook(_owned(root_post, token), with_kwargs=True))

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        cache = run_cache()
        if self.events is not None and exc_type is None and cache is not None:
            roots = _roots(self.events, self.sites, self.model)
            cache[self.key] = roots if roots else False
        if exc_type is not None and issubclass(exc_type, PrefixMismatch) and cache is not None:
            cache[self.key] = False                           # never again in this run
        return False
