"""Skip-layer guidance (SLG, as in SD3.5; STG for video DiTs): chosen blocks of a block list return their input in
the degraded rows, for blocks returning one tensor or a tuple (MMDiT's `(encoder_hidden_states, hidden_states)`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .base import Hook, Perturbation, _RowSet
from .sites import RuleRegistry, SiteError

__all__ = ["SkipLayers", "register_block_inputs", "block_lists", "pass_inputs"]

#: block type -> fn(module, args, kwargs) -> the block's inputs arranged as its output (a tuple in output order)
_BLOCK_INPUTS = RuleRegistry()


def register_block_inputs(module_type: type, fn: Callable) -> None:
    """Teach `SkipLayers` a block that returns a tuple: `fn(module, args, kwargs)` returns the block's inputs in
    the order of its outputs (None where the output is None), so a skipped block passes its inputs through."""
    if not isinstance(module_type, type) or not callable(fn):
        raise TypeError("register_block_inputs(module_type, fn) needs a class and a callable")
    _BLOCK_INPUTS[module_type] = fn


def block_lists(model: torch.nn.Module) -> list[tuple[str, int]]:
    """`[(path, length)]` of the model's `ModuleList`s of blocks (the candidates for `SkipLayers(blocks=...)`)."""
    keep = ("blocks", "layers", "attentions", "resnets")
    return [(n, len(m)) for n, m in model.named_modules()
            if n and isinstance(m, torch.nn.ModuleList) and len(m) > 0 and any(k in n.rsplit(".", 1)[-1] for k in keep)]


def _default_inputs(module, args, kwargs):
    return args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))


def pass_inputs(mod: torch.nn.Module, args, kwargs, out, degraded: _RowSet, n: int, path: str, what: str):
    """`out` (the block's output for a call of `n` rows) with the rows `degraded` replaced by the block's inputs:
    the block returns its input there. A block returning a tuple needs its inputs in output order
    (`register_block_inputs`); elements without an input (None) keep the block's output."""
    rule = _BLOCK_INPUTS.lookup(mod)
    ins = rule(mod, args, kwargs) if rule is not None else _default_inputs(mod, args, kwargs)
    if isinstance(out, torch.Tensor):
        outs, ins_t, single = (out,), (ins if isinstance(ins, torch.Tensor) else ins[0],), True
    elif rule is None and len(out) == 1:         # (tensor,) as return_dict=False gives
        outs, ins_t, single = tuple(out), (ins,), False
    else:
        if rule is None:
            raise TypeError(f"{what} at {path!r}: {type(mod).__name__} returns a tuple; register its inputs in "
                            "output order with autoguidance.perturb.register_block_inputs")
        outs, ins_t, single = tuple(out), tuple(ins), False
    new = []
    for o, i in zip(outs, ins_t):
        if o is None or i is None:
            new.append(o)
            continue
        if not isinstance(i, torch.Tensor) or o.shape != i.shape or o.shape[0] != n:
            got = list(i.shape) if isinstance(i, torch.Tensor) else type(i).__name__
            raise ValueError(f"{what} at {path!r}: the block maps {got} to {list(o.shape)}, so it cannot return its "
                             "input; choose blocks that keep the shape")
        new.append(degraded.put(o, degraded.take(i).to(o.dtype)))
    new += list(outs[len(new):])
    return new[0] if single else type(out)(new) if isinstance(out, tuple) else tuple(new)


@dataclass(frozen=True, eq=False)
class SkipLayers(Perturbation):
    """Skip-layer guidance: in the degraded rows, the blocks `layers` (indices into the block list `blocks`)
    return their input unchanged (`SkipLayers(layers=[7, 8, 9])`: SD3.5's SLG). Deterministic. `blocks` is the path
    of a `ModuleList` of blocks; default: `transformer_blocks` (DiT, SD3, PixArt, Flux's double blocks), else the
    model's only block list. A `ModuleDict` of blocks (EDM2's `unet.dec`) works when named by `blocks=`, with
    `layers` as its keys or as indices in its order (`SkipLayers(blocks="unet.dec", layers=["4x4_in0", "4x4_in1"])`).
    Tuple-returning blocks need a rule (`register_block_inputs`; MMDiT's `JointTransformerBlock` comes with the
    diffusers adapter)."""

    layers: Sequence[int] = ()
    blocks: Optional[str] = None
    name = "skip layers"

    def __post_init__(self):
        layers = [self.layers] if isinstance(self.layers, (int, str)) else list(self.layers)
        if not layers or any(isinstance(i, bool) or not isinstance(i, (int, str)) for i in layers):
            raise ValueError(f"SkipLayers needs layers=[block indices] (or keys of a ModuleDict), e.g. "
                             f"layers=[7, 8, 9]; got {self.layers!r}")
        object.__setattr__(self, "layers", tuple(layers))

    def _block_list(self, model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
        modules = dict(model.named_modules())
        cands = block_lists(model)
        if self.blocks is not None:
            path = self.blocks
            if path not in modules:        # a path inside a wrapper (DiffusersDenoiser.unet): unique suffix match
                hits = [n for n in modules if n.endswith("." + path)]
                path = hits[0] if len(hits) == 1 else path
            m = modules.get(path)
            if not isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict)):
                raise SiteError(f"SkipLayers blocks={self.blocks!r} is not a ModuleList or ModuleDict of "
                                f"{type(model).__name__}; its block lists: "
                                f"{', '.join(f'{n} ({k})' for n, k in cands) or 'none'}")
            return path, m
        names = [n for n, _ in cands]
        named = [n for n in names if n.rsplit(".", 1)[-1] == "transformer_blocks"]
        pick = named[0] if len(named) == 1 else None     # several (a U-Net's attentions): the user must choose
        if pick is None and len(names) == 1:
            pick = names[0]
        if pick is None:
            raise SiteError(f"SkipLayers cannot tell which block list of {type(model).__name__} to use: pass "
                            f"blocks= one of {', '.join(f'{n} ({k})' for n, k in cands) or '(none found)'}")
        return pick, modules[pick]

    def sites(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        path, blocks = self._block_list(model)
        keys = list(blocks.keys()) if isinstance(blocks, torch.nn.ModuleDict) else list(range(len(blocks)))
        named = [i for i in self.layers if isinstance(i, str)]
        if named and not isinstance(blocks, torch.nn.ModuleDict):
            raise SiteError(f"SkipLayers layers {named}: {path} is a ModuleList, so layers are indices "
                            f"(0..{len(blocks) - 1})")
        bad = [i for i in self.layers if (i not in keys) if isinstance(i, str)] + \
              [i for i in self.layers if isinstance(i, int) and not -len(keys) <= i < len(keys)]
        if bad:
            raise SiteError(f"SkipLayers layers {bad} not in {path}: it has {len(keys)} blocks"
                            + (f" ({', '.join(map(str, keys))})" if named or isinstance(blocks, torch.nn.ModuleDict)
                               else f" (layers=[0..{len(keys) - 1}])"))
        idx = sorted({keys.index(i) if isinstance(i, str) else i % len(keys) for i in self.layers})
        return [(f"{path}.{keys[i]}", blocks[keys[i]]) for i in idx]

    def _hooks(self, model, rows, keys, sigma):
        sites = self.sites(model)
        idx = torch.nonzero(rows).flatten()
        if len(idx) == 0:
            return []
        n = len(rows)
        degraded = _RowSet(idx)
        hooks = []
        for path, module in sites:
            def hook(mod, args, kwargs, out, path=path):
                return pass_inputs(mod, args, kwargs, out, degraded, n, path, "skip layers")

            hooks.append(Hook(module, hook, "forward_kwargs"))
        return hooks
