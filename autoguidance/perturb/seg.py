"""Smoothed energy guidance (SEG, Hong 2024, arXiv 2408.00760): blur the self-attention queries with a Gaussian.

In the degraded rows, every query of a chosen self-attention module is replaced by a Gaussian-weighted average of
the queries around it, over the token axes (a 2-D Gaussian over the H x W token grid for image tokens, 3-D over
T x H x W for video), and the attention is computed from the blurred queries and the unchanged keys and values.
Width `s` (in tokens): `s = 0` is the exact pass; `s = inf` replaces every query by the mean query (every query
position attends with the same weights, the SEG paper's limit of a flattened energy landscape). Blurring the
queries blurs the attention logits along the query axis, since the logits are linear in the queries.

The blur is exact and dense: `B[i, j] = exp(-(i - j)^2 / (2 s^2))`, each row normalised to sum 1 over the tokens
that exist (no padding), applied separably along each grid axis. A normalised blur keeps a constant, so blurring
the input of a query projection with a bias equals blurring the projected queries.

Two kinds of rules. A *recompute* rule (EDM2's attention, `nn.MultiheadAttention`, a `smoothed_attention` method)
computes the module's output again from blurred queries. A *query-projection* rule (diffusers' attention modules,
through the diffusers adapter: `register_query_projection`) blurs the output of the module's query projection
(`to_q`) in the degraded rows during the one forward pass, so nothing is computed twice. There the image tokens
are those of the token grid read by the nearest enclosing module with a `register_token_grid` rule (a transformer's
latent over its patch size, a U-Net's `Transformer2DModel` input); in joint attention (CogVideoX, Flux's single
blocks) the text tokens come first in the projection's output and are not blurred. Where the model normalises or
rotates queries after the projection (qk-norm, RoPE), the blur acts before that, on the projection's output, as
the SEG reference code does on `to_q`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from ..schedules import Schedule, as_schedule
from .base import Hook, Perturbation, _RowSet, _strength_rows
from .sites import RuleRegistry, SiteError, TokenGrids, Where, default_sites, find_sites, site_predicate

__all__ = ["SmoothedAttention", "gaussian_blur_matrix", "blur_tokens", "register_smoothed_attention",
           "register_query_projection"]


def gaussian_blur_matrix(n: int, s: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """`[n, n]` row-normalised Gaussian blur of width `s` tokens: identity at `s = 0`, the mean at `s = inf`."""
    if s == 0:
        return torch.eye(n, dtype=dtype, device=device)
    if math.isinf(s):
        return torch.full((n, n), 1.0 / n, dtype=dtype, device=device)
    i = torch.arange(n, dtype=torch.float64, device=device)
    b = torch.exp(-(i[:, None] - i[None, :]).square() / (2 * s * s))
    return (b / b.sum(1, keepdim=True)).to(dtype)


def blur_tokens(q: torch.Tensor, s: float, axis: int, grid: Optional[Sequence[int]] = None) -> torch.Tensor:
    """`q` blurred with width `s` along its token axis `axis`, which holds `prod(grid)` tokens in row-major order
    of `grid` (default: one axis of all tokens)."""
    n = q.shape[axis]
    grid = [n] if grid is None else [int(g) for g in grid]
    if math.prod(grid) != n:
        raise ValueError(f"token grid {grid} does not hold the {n} tokens of axis {axis}")
    t = q.movedim(axis, -1)
    lead = t.shape[:-1]
    t = t.reshape(*lead, *grid)
    for d, g in enumerate(grid):
        b = gaussian_blur_matrix(g, s, dtype=t.dtype, device=t.device)
        ax = t.ndim - len(grid) + d
        t = torch.movedim(torch.movedim(t, ax, -1) @ b.T, -1, ax)
    return t.reshape(*lead, n).movedim(-1, axis)


# -- rules: how each attention type recomputes its output from blurred queries -----------------------------------

@dataclass(frozen=True)
class _SEGRule:
    smoothed: Optional[Callable]   # recompute: fn(module, args, kwargs, blur) -> (output, batch axis)
    is_self_attention: Callable[[torch.nn.Module, str], bool]   # (module, path) -> a default site?
    query: Optional[Callable] = None    # in-pass: fn(module) -> the submodule whose output [B, L, C] holds the queries
    prefix: Optional[Callable] = None   # fn(module, args, kwargs) -> text tokens before the image tokens (None: the
                                        # image tokens are the last prod(grid) of the projection's output)


_SEG = RuleRegistry()


def register_smoothed_attention(module_type: type, fn: Callable,
                                is_self_attention: Callable[..., bool] = lambda m: True) -> None:
    """Teach `SmoothedAttention` an attention type: `fn(module, args, kwargs, blur)` returns `(output, batch_axis)`,
    the module's (first) output recomputed with its queries passed through `blur(q, token_axis, grid)`. A module may
    instead define `smoothed_attention(blur, *args, **kwargs)` returning that output (batch on axis 0).
    `is_self_attention(module)` (or `(module, path)`) picks default sites."""
    if not isinstance(module_type, type) or not callable(fn):
        raise TypeError("register_smoothed_attention(module_type, fn) needs a class and a callable")
    _SEG[module_type] = _SEGRule(fn, site_predicate(is_self_attention))


def register_query_projection(module_type: type, query: Callable[[torch.nn.Module], torch.nn.Module],
                              prefix: Callable = lambda m, args, kwargs: 0,
                              is_self_attention: Callable[..., bool] = lambda m: True) -> None:
    """Teach `SmoothedAttention` an attention type whose queries are the output of a submodule: `query(module)`
    returns it (diffusers' `to_q`; raise SiteError where the module does not use it, e.g. fused projections). Its
    output `[B, L, C]` is blurred in the degraded rows during the module's one forward pass, over the image tokens:
    the `prod(grid)` tokens after the first `prefix(module, args, kwargs)` (text first, as joint attention
    concatenates it; None: the last `prod(grid)`), on the grid of the nearest enclosing `register_token_grid` rule.
    `is_self_attention(module)` (or `(module, path)`) picks default sites and checks named ones."""
    if not isinstance(module_type, type) or not callable(query) or not callable(prefix):
        raise TypeError("register_query_projection(module_type, query, prefix) needs a class and callables")
    _SEG[module_type] = _SEGRule(None, site_predicate(is_self_attention), query, prefix)


def _square_grid(n: int) -> list[int]:
    r = math.isqrt(n)
    if r * r != n:
        raise ValueError(f"cannot lay {n} image tokens on a square grid: register a rule that knows H x W")
    return [r, r]


def _edm2_smoothed(m, args, kwargs, blur):
    """EDM2Attention: `q, k, v [N, heads, C/heads, HW]` on a square H x W grid (EDM2's resolutions are square)."""
    names = ["q", "k", "v"]
    q, k, v = [args[i] if len(args) > i else kwargs[names[i]] for i in range(3)]
    return m.forward(blur(q, 3, _square_grid(q.shape[3])), k, v), 0


def _mha_smoothed(m: torch.nn.MultiheadAttention, args, kwargs, blur):
    """nn.MultiheadAttention self-attention: blur the query input over the sequence axis (one token axis; the
    query projection is affine, so this blurs the projected queries)."""
    names = ["query", "key", "value"]
    q, k, v = [args[i] if len(args) > i else kwargs.get(names[i]) for i in range(3)]
    if q.ndim != 3:
        raise ValueError("smoothed attention on MultiheadAttention needs batched 3-D inputs")
    axis = 1 if m.batch_first else 0
    rest = {key: val for key, val in kwargs.items() if key not in names}
    rest["need_weights"] = False
    out = m.forward(blur(q, axis, None), k, v, *args[3:], **rest)
    return out[0], 0 if m.batch_first else 1


def _check_width(v, what="SEG blur width s"):
    v = float(v)
    if math.isnan(v) or v < 0:
        raise ValueError(f"{what} must be >= 0 (inf: mean query), got {v!r}")
    return v


def _register_builtin():
    register_smoothed_attention(torch.nn.MultiheadAttention, _mha_smoothed)
    # EDM2Attention lives in nets/ (a floor above): recognised by its type name and call signature, not imported.


_register_builtin()


def _seg_rule(module: torch.nn.Module) -> Optional[_SEGRule]:
    if callable(getattr(module, "smoothed_attention", None)):
        return _SEGRule(lambda m, a, k, blur: (m.smoothed_attention(blur, *a, **k), 0), lambda m, path: True)
    rule = _SEG.lookup(module)
    if rule is None and type(module).__name__ == "EDM2Attention":
        return _SEGRule(_edm2_smoothed, lambda m, path: True)
    return rule


@dataclass(frozen=True, eq=False)
class SmoothedAttention(Perturbation):
    """SEG (Hong 2024): in the degraded rows, the chosen self-attention modules see their queries blurred by a
    Gaussian of width `s` tokens over the token grid; `s = inf` uses the mean query. Deterministic.

    Supported: EDM2's `EDM2Attention` (square token grid), `torch.nn.MultiheadAttention` (one token axis),
    diffusers' self-attention modules (through the diffusers adapter: U-Nets' `attn1`, SD3 / Flux joint attention
    (image queries), DiT, PixArt, Sana, Wan, LTX, CogVideoX; see the module docstring), any module with a
    `smoothed_attention(blur, ...)` method or a rule added by `register_smoothed_attention` /
    `register_query_projection`. Default sites: every supported self-attention module."""

    s: Union[float, Schedule] = 10.0   # blur width in tokens (>= 0, inf allowed), or a Schedule s(sigma)
    where: Where = None
    name = "smoothed attention"

    def __post_init__(self):
        if isinstance(self.s, Schedule):
            as_schedule(self.s, "SEG blur width s", _check_width)
            return
        s = float(self.s)
        if math.isnan(s) or s < 0:
            raise ValueError(f"SEG blur width s must be >= 0 (inf: mean query), got {self.s!r}")
        object.__setattr__(self, "s", s)

    def sites(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        if self.where is None:
            sites = default_sites(model, lambda m, path: (r := _seg_rule(m)) is not None
                                  and bool(r.is_self_attention(m, path)), "smoothed attention",
                                  "Name the self-attention modules with where=, or register their type with "
                                  "autoguidance.perturb.register_smoothed_attention.")
        else:
            sites = find_sites(model, self.where)
        for p, m in sites:
            rule = _seg_rule(m)
            if rule is None:
                raise TypeError(f"smoothed attention site {p!r}: {type(m).__name__} is not a supported attention "
                                "module (EDM2Attention, nn.MultiheadAttention, diffusers attention, or "
                                "register_smoothed_attention)")
            if rule.query is not None:
                if not rule.is_self_attention(m, p):
                    raise SiteError(f"smoothed attention site {p!r} is a cross-attention module: SEG blurs the queries "
                                    "of self-attention; choose the self-attention modules (diffusers: attn1) or leave "
                                    "where= unset")
                rule.query(m)                       # refuses a module that does not use its query projection
        return sites

    def _groups(self, rows, sigma) -> list:
        """`[(degraded rows, width)]`: one group per width (one when s is a number or sigma is shared)."""
        if isinstance(self.s, Schedule):
            idx, widths = _strength_rows(self.s, rows, sigma)
            groups = [(idx[widths == u], float(u)) for u in torch.unique(widths)]
        else:
            idx = torch.nonzero(rows).flatten()
            groups = [(idx, self.s)] if self.s != 0 else []
        return [(_RowSet(i), w) for i, w in groups if len(i) > 0]

    def _hooks(self, model, rows, keys, sigma):
        sites = self._cached_sites(model)
        groups = self._groups(rows, sigma)
        if not groups:
            return []
        n = len(rows)
        hooks = []
        in_pass = [(p, m) for p, m in sites if _seg_rule(m).query is not None]
        grids = TokenGrids(model, [p for p, _ in in_pass]) if in_pass else None
        for path, module in sites:
            rule = _seg_rule(module)
            if rule.query is not None:
                hooks += _query_hooks(path, module, rule, grids, groups, n)
                continue

            def hook(mod, args, kwargs, out, rule=rule, path=path):
                first = out if isinstance(out, torch.Tensor) else out[0]
                new = None
                for degraded, s in groups:
                    def blur(q, axis, grid, s=s):
                        return blur_tokens(q, s, axis, grid)

                    new_out, axis = rule.smoothed(mod, args, kwargs, blur)
                    a, b = first.movedim(axis, 0), new_out.movedim(axis, 0)
                    if b.shape != a.shape:
                        raise ValueError(f"smoothed attention at {path!r}: output {list(b.shape)} does not match "
                                         f"{list(a.shape)}")
                    base = a if new is None else new
                    new = degraded.put(base, degraded.take(b).to(a.dtype))
                new = new.movedim(0, axis)
                return new if isinstance(out, torch.Tensor) else (new, *out[1:])

            hooks.append(Hook(module, hook, "forward_kwargs"))
        if grids is not None:
            hooks += grids.hooks()
        return hooks


def _query_hooks(path: str, attn: torch.nn.Module, rule: _SEGRule, grids: TokenGrids, groups: list, n: int) -> list:
    """The hooks of one query-projection site: the attention's pre-hook reads where its image tokens start, the
    projection's hook blurs them in the degraded rows, the attention's post-hook checks that the projection ran."""
    proj = rule.query(attn)
    call: dict = {}

    def enter(mod, args, kwargs):
        call["prefix"] = rule.prefix(mod, args, kwargs)
        call["blurred"] = False
        return None

    def blur(mod, args, out):
        if "prefix" not in call:
            return None                      # called outside its attention's forward: not the attention's queries
        if not isinstance(out, torch.Tensor) or out.ndim != 3 or out.shape[0] != n:
            raise ValueError(f"smoothed attention at {path!r}: the query projection returned "
                             f"{list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}, not "
                             f"[{n}, tokens, channels]")
        grid = grids.grid(path, "smoothed attention")
        tokens = math.prod(grid)
        pre = call["prefix"]
        pre = out.shape[1] - tokens if pre is None else int(pre)
        if pre < 0 or pre + tokens != out.shape[1]:
            raise ValueError(f"smoothed attention at {path!r}: the queries hold {out.shape[1]} tokens, not {pre} text "
                             f"tokens and the {' x '.join(map(str, grid))} image grid ({tokens}); the token grid rule "
                             "does not fit this model's call")
        new = out
        for degraded, s in groups:
            q = degraded.take(new)
            img = blur_tokens(q[:, pre:], s, 1, grid).to(q.dtype)
            new = degraded.put(new, torch.cat([q[:, :pre], img], 1) if pre else img)
        call["blurred"] = True
        return new

    def leave(mod, args, kwargs, out):
        blurred = call.pop("blurred", False)
        call.pop("prefix", None)
        if not blurred:
            processor = type(getattr(mod, "processor", None)).__name__
            raise SiteError(f"smoothed attention at {path!r}: its query projection ({type(proj).__name__}) was not "
                            f"called by {type(mod).__name__}'s processor ({processor}), so nothing would be blurred; "
                            "use a processor that calls it (unfused projections)")
        return None

    return [Hook(attn, enter, "forward_pre_kwargs"), Hook(proj, blur, site=False),
            Hook(attn, leave, "forward_kwargs", site=False)]
