"""Block drop (stochastic depth at sampling time): a residual block returns its skip path or its input."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from ..rng import hash_uniform, mix_keys
from ..schedules import Schedule, as_schedule
from .base import Hook, Perturbation, _RowSet, _take_rows, check_rate
from .sites import RuleRegistry, SiteError, Where, default_sites, find_sites
from .skip_layer import _BLOCK_INPUTS, pass_inputs

__all__ = ["BlockDrop", "register_skip_path"]

# -- block drop --------------------------------------------------------------------------------------------------

#: module type -> fn(module, *args, **kwargs) -> the block's output with its residual branch removed.
_SKIP_PATHS = RuleRegistry()


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
    return _SKIP_PATHS.lookup(module)


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
    every module with a skip-path rule (all `EDM2Block`s of an EDM2 net, a diffusers U-Net's `ResnetBlock2D`s);
    in a model without one, every block whose inputs are known (`register_block_inputs`: the transformer blocks of
    diffusers' SD3, Flux, DiT, PixArt, Sana, Wan, LTX, CogVideoX), which a dropped row passes through ('input').
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
            how = ("Name the residual blocks with where= (a type, a glob, or paths), and use path='input' for blocks "
                   "that keep their input's shape.")
            try:
                return default_sites(model, lambda m, path: _skip_path_rule(m) is not None, "block drop", how)
            except SiteError:
                return default_sites(model, lambda m, path: _BLOCK_INPUTS.lookup(m) is not None, "block drop", how)
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
                if rule is None:                      # path 'input': the dropped rows pass their inputs through
                    return pass_inputs(mod, args, kwargs, out, _RowSet(dropped), n, path, "block drop path='input'")
                if not isinstance(out, torch.Tensor) or out.shape[0] != n:
                    raise TypeError(f"block drop site {path!r} ({type(mod).__name__}) must return a tensor with "
                                    f"the batch ({n} rows) on axis 0; choose a residual block module")
                new = rule(mod, *_take_rows(args, dropped, n), **_take_rows(kwargs, dropped, n))
                return _RowSet(dropped).put(out, new.to(out.dtype))

            hooks.append(Hook(module, hook, "forward_kwargs"))
        return hooks

