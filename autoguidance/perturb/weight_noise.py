"""Weight noise: multiplicative Gaussian noise on chosen weights, per degraded row; stored weights untouched."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Union

import torch

from ..rng import hash_normal, mix_keys
from ..schedules import Schedule, as_schedule
from .base import Hook, Perturbation, _RowSet, _rows_like, check_nonnegative, live_perturbation_hooks
from .sites import SiteError, Where, default_sites, find_sites

__all__ = ["WeightNoise"]

@dataclass(frozen=True, eq=False)
class WeightNoise(Perturbation):
    """Multiplicative Gaussian noise on chosen weights, different for every degraded row: the row is computed with
    `W' = W (1 + std n)`, `n ~ N(0, I)` from its key, at each chosen site. The stored weights are never written:
    the site's output for the degraded rows is recomputed with `torch.func.functional_call` on the noisy weights
    (vectorised over rows with `torch.func.vmap`), so exact rows in the same call stay exact. The recompute runs on
    a stand-in of the site (`_stand_in`: its code and weights, its own attribute dicts), so the module itself is
    never touched and another thread calling it meanwhile gets the plain net. The noisy output is the site's own:
    other perturbations of the same module act on it afterwards.

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
            sites = default_sites(model, lambda m, path: bool(self._names(m, False)), "weight noise",
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
        degraded = _RowSet(idx)
        hooks = []
        for site_index, (path, module) in enumerate(sites):
            names = self._names(module, True)

            def hook(mod, args, kwargs, out, names=names, site_index=site_index, path=path):
                if not isinstance(out, torch.Tensor) or out.shape[0] != n:
                    raise TypeError(f"weight noise site {path!r} ({type(mod).__name__}) must return a tensor with "
                                    f"the batch ({n} rows) on axis 0")
                stand_in = _stand_in(mod, path)
                own = dict(stand_in.named_parameters())
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
                    return torch.func.functional_call(stand_in, params, tuple(a), kw)[0]

                new = torch.func.vmap(one_row)(noisy, *[degraded.take(a) for a, b in zip(flat, batched) if b])
                return degraded.put(out, new.to(out.dtype))

            hook.weight_noise = True
            # first among the site's hooks: the degraded rows' output is the site's own output on noisy weights,
            # which other perturbations of the same module then act on, as they do on the exact rows
            hooks.append(Hook(module, hook, "forward_kwargs", first=True))
        return hooks


def _stand_in(site: torch.nn.Module, path: str) -> torch.nn.Module:
    """A stand-in for `site` to recompute its output on other weights: the same classes, code, attributes,
    parameters and buffers, and the same forward hooks inside it, but attribute dicts of its own, so that
    `functional_call` swaps the weights of the stand-in and never those of the module, which another thread may be
    calling meanwhile. The site's own hooks are left out (they act once, on the site's output). Refuses what the
    row-by-row recompute cannot honour: a forward replaced on an instance (it would run on the real module), a
    perturbation active inside the site (its hooks expect the batch, not one row), two weight noises on one site."""
    if sum(bool(getattr(h, "weight_noise", False)) for h in live_perturbation_hooks(site)) > 1:
        raise SiteError(f"two weight noise perturbations on site {path!r} in one call: the second would recompute "
                        "the rows of the first from the clean weights; combine them into one WeightNoise")
    made: dict = {}

    def copy(m: torch.nn.Module, name: str) -> torch.nn.Module:
        if id(m) in made:
            return made[id(m)]
        if "forward" in m.__dict__:
            raise SiteError(f"weight noise cannot recompute {name!r} ({type(m).__name__}): its forward is "
                            "replaced on the instance (an offload or wrapper hook); choose sites inside it, or "
                            "remove the hook")
        if m is not site and live_perturbation_hooks(m):
            raise SiteError(f"weight noise site {path!r} contains {name!r}, which another perturbation of this call "
                            "acts on; weight noise recomputes its site row by row, so choose sites that do not "
                            "contain each other")
        s = object.__new__(type(m))
        d = dict(m.__dict__)
        d["_parameters"] = type(m._parameters)(m._parameters)
        d["_buffers"] = type(m._buffers)(m._buffers)
        made[id(m)] = s
        d["_modules"] = type(m._modules)((k, None if c is None else copy(c, f"{name}.{k}"))
                                         for k, c in m._modules.items())
        if m is site:
            for k in _HOOK_DICTS:
                if k in d:
                    d[k] = type(d[k])()
        s.__dict__.update(d)
        return s
    return copy(site, path)


#: the attribute dicts of a module's forward hooks (torch 2.x)
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs")
