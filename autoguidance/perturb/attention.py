"""Identity attention (perturbed-attention guidance): the attention map of chosen self-attention modules becomes
the identity in the degraded rows; rules per attention type."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from ..schedules import Schedule, as_schedule
from .base import Hook, Perturbation, _RowSet, _rows_like, check_rate
from .sites import RuleRegistry, Where, default_sites, find_sites, site_predicate

__all__ = ["IdentityAttention", "register_identity_attention"]

# -- identity attention ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _AttentionRule:
    identity: Callable   # fn(module, args, kwargs) -> (output with identity attention, batch axis of that output)
    is_self_attention: Callable[[torch.nn.Module, str], bool]   # (module, path) -> a default site?


_IDENTITY_ATTENTION = RuleRegistry()


def register_identity_attention(module_type: type, fn: Callable,
                                is_self_attention: Callable[..., bool] = lambda m: True) -> None:
    """Teach `IdentityAttention` an attention module type: `fn(module, args, kwargs)` gets the module's forward
    arguments and returns `(output, batch_axis)`, the module's (first) output computed with the attention map
    replaced by the identity, i.e. from the values alone. `is_self_attention(module)` (or `(module, path)`) picks
    default sites. A module may instead define a method `identity_attention(*args, **kwargs)` returning that output
    (batch on axis 0)."""
    if not isinstance(module_type, type) or not callable(fn):
        raise TypeError("register_identity_attention(module_type, fn) needs a class and a callable")
    _IDENTITY_ATTENTION[module_type] = _AttentionRule(fn, site_predicate(is_self_attention))


def _attention_rule(module: torch.nn.Module) -> Optional[_AttentionRule]:
    if callable(getattr(module, "identity_attention", None)):
        return _AttentionRule(lambda m, a, k: (m.identity_attention(*a, **k), 0), lambda m, path: True)
    return _IDENTITY_ATTENTION.lookup(module)


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
            def accept(m, path):
                rule = _attention_rule(m)
                return rule is not None and bool(rule.is_self_attention(m, path))
            return default_sites(model, accept, "identity attention",
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

