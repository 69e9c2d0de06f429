"""Dropout at sampling time on chosen module outputs (in-situ autoguidance), with per-row counter-based masks."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch

import numpy as np

from ..rng import (DropoutMasks, _as_u64, _salt_np, _splitmix_np, current_state, dropout_factors,
                   dropout_factors_np, mix_keys, mix_keys_np, mix_keys_per_salt, mix_keys_per_salt_np)
from ..schedules import Schedule, as_schedule, check_probability
from .base import Perturbation, _RowSet, run_cache
from .sites import Where, default_sites, find_sites

__all__ = ["Dropout"]

@dataclass(frozen=True, eq=False)
class Dropout(Perturbation):
    """Dropout on the outputs of the chosen modules, rescaled by 1/(1-p) (in-situ autoguidance, p = 0.1).

    mode 'element' drops single activations (as torch.nn.Dropout); 'channel' drops whole channels (axis 1) of
    conv features. Default sites: every `torch.nn.Dropout` module of the model's own (where a net trained with
    dropout has it); an adapter's dropout (a peft LoRA's `lora_dropout`, see `register_adapter_layer`) is not the
    model's and is left out. To include it, name the sites: `where=torch.nn.Dropout` (every `nn.Dropout`, adapters'
    too) or a glob such as `where="*lora_dropout.*"`."""

    p: Union[float, Schedule] = 0.1
    where: Where = None
    mode: str = "element"
    name = "dropout"

    def __post_init__(self):
        object.__setattr__(self, "p", as_schedule(self.p, "dropout probability p", check_probability))
        if self.mode not in ("element", "channel"):
            raise ValueError(f"dropout mode must be 'element' or 'channel', got {self.mode!r}")

    def sites(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        if self.where is None:
            return default_sites(model, lambda m, path: isinstance(m, torch.nn.Dropout), "dropout",
                                 f"{type(model).__name__} has no module of type torch.nn.Dropout of its own "
                                 "(adapters' dropout is left out): name sites with where= (a module type, a glob on "
                                 "module paths, or paths).")
        return find_sites(model, self.where)

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

    def _factor_shape(self, out: torch.Tensor) -> list[int]:
        shape = list(out.shape[1:])
        if self.mode == "channel" and out.ndim > 2:
            shape = [shape[0]] + [1] * (out.ndim - 2)
        return shape

    def _hooks_span(self, model, span, keys, sigma):
        """The lean path of a batched guided call whose degraded rows are `a..b-1` at a constant p: the same
        masks as `_hooks` (per-row keys mixed in numpy, bit for bit), with no read-back of rows or strengths. Where
        a run (`run_cache`) has seen every site's output shape and the sites are small, all sites' multipliers
        of one size come from ONE hash over their concatenated keys, padded with exact 1.0 for the exact rows,
        so a site's hook is one product; when the degraded rows' keys are the sampler's (`span[2]`), the
        multipliers of the next few denoiser calls of the run are made in the same pass (per-op overhead paid once
        for several calls; each call's masks are still a function of its own keys). Larger sites keep the chunked
        per-site write (bounded memory)."""
        p = self.p.constant()
        if p is None:
            return None
        a, b = span[0], span[1]
        from_state = len(span) > 2 and bool(span[2])
        if p <= 0 or b <= a:
            return []
        B = len(keys)
        sites = self._cached_sites(model)
        masks, thr_int, inv_int = _masks_for(p)
        S = len(sites)
        device = sigma.device
        seeds: dict = {}

        def seeds_np():                                   # [S, K] uint32: the low 32 bits of each site's row keys
            if "np" not in seeds:
                seeds["np"] = mix_keys_per_salt_np(mix_keys_np(_as_u64(keys[a:b]), 0xD120), range(S)).astype(np.uint32)
            return seeds["np"]

        def seeds32(dev):                                 # the same as an int32 tensor on `dev`
            if "t" not in seeds:
                k = keys[a:b]
                if k.device.type == "cpu":
                    seeds["t"] = torch.from_numpy(seeds_np().view(np.int32))
                else:
                    full = mix_keys_per_salt(mix_keys(k, 0xD120), range(S))
                    seeds["t"] = (((full + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)).to(torch.int32)
            return seeds["t"].to(dev)

        cache = run_cache()
        shapes = None
        if cache is not None:
            key = ("dropout-shapes", id(self), id(model), B, a, b)
            hit = cache.get(key)
            if hit is None or hit[0] is not self or hit[1] is not model:
                hit = cache[key] = (self, model, {})
            shapes = hit[2]                                 # site index -> (shape of a row's factors, out.shape)
        pre: dict = {}
        if shapes is not None and b == B and len(shapes) == S:
            groups: dict = {}
            for i, (fshape, _) in shapes.items():
                groups.setdefault(math.prod(fshape), []).append(i)
            sizes = {numel: len(members) * B * numel for numel, members in groups.items()}
            state = current_state()
            if (from_state and device.type == "cpu" and state is not None and state.seeds_u64 is not None
                    and len(state.seeds) == b - a and sum(sizes.values()) <= _PRECOMPUTE_ELEMENTS):
                pre = self._prefetched(cache, model, state, groups, B, a, S, thr_int, inv_int,
                                       max(1, min(_PREFETCH_CALLS, _PRECOMPUTE_ELEMENTS // sum(sizes.values()))))
            else:
                budget = _PRECOMPUTE_ELEMENTS
                thr_m1, inv_bits = masks._params(device)
                for numel, members in groups.items():
                    if sizes[numel] > budget:
                        continue
                    budget -= sizes[numel]
                    if device.type == "cpu" and keys.device.type == "cpu":
                        sel = seeds_np() if len(members) == S else seeds_np()[members]
                        f = dropout_factors_np(sel, numel, thr_int, inv_int, pad=a)      # [S_g, B, numel]
                    else:
                        sel = seeds32(device) if len(members) == S else seeds32(device)[members]
                        f = dropout_factors(sel, numel, thr_m1, inv_bits, pad=a)
                    for j, i in enumerate(members):
                        pre[i] = f[j]
        degraded = None
        hooks = []
        for site_index, (path, module) in enumerate(sites):

            def hook(mod, inp, out, site_index=site_index):
                nonlocal degraded
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"dropout site {type(mod).__name__} returns {type(out).__name__}, not a tensor; "
                                    "choose a module whose output is a tensor")
                fac = pre.get(site_index)
                if fac is not None and out.shape == shapes[site_index][1] and out.device == fac.device:
                    fac = fac.reshape(B, *shapes[site_index][0])
                    return out * (fac if out.dtype == torch.float32 else fac.to(out.dtype))
                shape = self._factor_shape(out)
                if shapes is not None and site_index not in shapes:
                    shapes[site_index] = (tuple(shape), out.shape)
                numel = math.prod(shape)
                site_seeds = seeds32(out.device)[site_index:site_index + 1]
                thr, inv = masks._params(out.device)

                def scale(i, j):                                       # [j - i, *shape]: 0 or 1/(1-p)
                    f = dropout_factors(site_seeds[:, i:j], numel, thr, inv)[0]
                    return f.reshape(j - i, *shape).to(out.dtype)
                if degraded is None:
                    degraded = _RowSet.from_span(a, b, out.device)
                rows = max(1, _DROPOUT_CHUNK // max(1, numel))
                return degraded.put_product(out, scale, rows)                   # exact rows untouched

            hooks.append((module, hook))
        return hooks

    def _prefetched(self, cache, model, state, groups, B, a, S, thr_int, inv_int, calls) -> dict:
        """The precomputed multipliers (site index -> `[B, numel]`) of this denoiser call, made for `calls`
        consecutive call indices of the run at once: call c's are exactly those of its own keys
        `mix(mix(mix(seed, c), 0xD120), site)`, so nothing depends on which calls share a pass."""
        key = ("dropout-prefetch", id(self), id(model), B, a)
        hit = cache.get(key)
        if hit is not None and hit[0] is self and hit[1] is model and state.call in hit[2] \
                and (hit[3] is state.seeds_u64 or np.array_equal(hit[3], state.seeds_u64)):
            return hit[2][state.call]       # made for these seeds (a guided denoiser inside another's call: rows vary)
        c0 = state.call
        call_salts = np.array([_salt_np(c) for c in range(c0, c0 + calls)], dtype=np.uint64)[:, None]
        k = mix_keys_np(_splitmix_np(state.seeds_u64[None, :] ^ call_salts), 0xD120)         # [C, N]
        site_salts = np.array([_salt_np(v) for v in range(S)], dtype=np.uint64)[None, :, None]
        per_site = _splitmix_np(k[:, None, :] ^ site_salts).astype(np.uint32)              # [C, S, N]
        made: dict = {c: {} for c in range(c0, c0 + calls)}
        for numel, members in groups.items():
            sel = per_site if len(members) == S else per_site[:, members]
            f = dropout_factors_np(np.ascontiguousarray(sel).reshape(calls * len(members), -1), numel, thr_int,
                                   inv_int, pad=a).view(calls, len(members), B, -1)
            for ci in range(calls):
                for j, i in enumerate(members):
                    made[c0 + ci][i] = f[ci, j]
        cache[key] = (self, model, made, state.seeds_u64)
        return made[c0]


Dropout._hooks_span.span_of = Dropout._hooks          # the lean form of exactly these hooks (base._span_hooks_apply)

_MASKS: dict = {}


def _masks_for(p: float):
    """`(DropoutMasks, ceil(p 2^16) - 1, bits of 1/(1-p))` of one constant p for every row, made once per process."""
    m = _MASKS.get(p)
    if m is None:
        if len(_MASKS) > 64:
            _MASKS.clear()
        masks = DropoutMasks(torch.tensor(p, dtype=torch.float32))
        thr_m1, inv_bits = masks._params(torch.device("cpu"))
        m = _MASKS[p] = (masks, int(thr_m1), int(inv_bits))
    return m


#: elements per chunk of a dropout site's multipliers (int32 hash state and result: ~1.5 MB, cache-sized)
_DROPOUT_CHUNK = 1 << 18
#: elements of the multipliers made for all (small) sites of a call before its forward, ones of exact rows included
_PRECOMPUTE_ELEMENTS = 1 << 18
#: denoiser calls of a run whose small-site multipliers are made in one pass (within _PRECOMPUTE_ELEMENTS)
_PREFETCH_CALLS = 8
