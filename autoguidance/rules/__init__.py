"""Combination rules: how a guided denoiser turns its main prediction c and guide predictions u_i into one, for every
method that has a guide (`rule=` of `ag.cfg`, `ag.autoguidance`, `ag.insitu`, `ag.perturbation_guidance`,
`ag.cfg_autoguidance`, `Guided`). One module per rule; `autoguidance rules` lists them with their parameters.

    Linear()                                   c + sum_i (w_i - 1)(c - u_i); the default, bit-identical to before
    Rescale(phi=0.7)                           the linear result brought back to c's std (Lin et al. 2023)
    APG(eta=0, norm_threshold=0, momentum=0)   projected, bounded, momentum-averaged difference (Sadat et al. 2024)
    CFGZeroStar(zero_init_steps=1)             optimally scaled guide, zero output for the first steps (2025)
    TCFG()                                     guide reduced to the pair's first singular direction (2025)
    FDG(scales=(1.0, 0.5))                     per-level weights of a Laplacian pyramid (2025)
    MAMBO(alpha=8)                             w shrinks with ||c - u|| / ||u|| (2025)

Each acts in a space (`space='x0' | 'eps' | 'v'`, `base.to_space`; the default None is the caller's own: x0 for the
library's denoisers, the model output inside diffusers pipelines); stateful rules keep their state per image seed
and per sampling run (the sampler's run, `rng.current_state`; in a pipeline, per pipeline call). CFG++ (Chung et al. 2024) is not a rule: it changes
the sampler's step (`cfgpp=True` of `sample_euler`, `sample_heun`, `sample_flow_euler`).
"""
from __future__ import annotations

from typing import Optional, Union

from .apg import APG
from .base import SPACES, Rule, Space, combine, from_space, project, to_space
from .cfg_zero import CFGZeroStar
from .fdg import FDG
from .linear import Linear
from .mambo import MAMBO
from .rescale import Rescale, with_rescale
from .tcfg import TCFG

__all__ = ["Rule", "Linear", "Rescale", "APG", "CFGZeroStar", "TCFG", "FDG", "MAMBO", "RULES", "SPACES", "Space",
           "as_rule", "make_rule", "rule_record", "with_rescale", "combine", "to_space", "from_space", "project"]

#: rule name (the `--rule` key) -> class
RULES = {r.name: r for r in (Linear, Rescale, APG, CFGZeroStar, TCFG, FDG, MAMBO)}


def as_rule(rule: Union[None, str, dict, Rule]) -> Rule:
    """`None` -> `Linear()`, a name -> that rule with its defaults, a `rule_record` dict -> its rule, a `Rule` as it
    is."""
    if rule is None:
        return Linear()
    if isinstance(rule, str):
        return make_rule(rule)
    if isinstance(rule, dict):
        params = dict(rule)
        name = params.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(f"a rule record needs its rule's name ({', '.join(RULES)}) under 'name', got {rule!r}")
        return make_rule(name, params)
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be an autoguidance.rules.Rule or a rule name ({', '.join(RULES)}), got "
                        f"{type(rule).__name__}")
    return rule


def make_rule(name: str, params: Optional[dict] = None) -> Rule:
    """The rule `name` with `params` (its dataclass fields; others are refused naming the rule's parameters)."""
    import dataclasses

    if name not in RULES:
        raise ValueError(f"unknown rule {name!r}: expected one of {', '.join(RULES)} (see `autoguidance rules`)")
    cls = RULES[name]
    params = dict(params or {})
    known = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(params) - known)
    if extra:
        raise ValueError(f"rule {name} has no parameter {', '.join(extra)}; its parameters: "
                         f"{', '.join(sorted(known)) or '(none)'}")
    return cls(**params)


def rule_record(rule: Rule) -> dict:
    """A rule of `RULES` as JSON-able data, `{"name": ..., every parameter: its value}` (tuples as lists), for run
    records and configs; `as_rule` reads it back. A rule acting in a caller's own `Space` object is refused."""
    import dataclasses

    if type(rule) is not RULES.get(rule.name):
        raise ValueError(f"{type(rule).__name__} is not one of the rules {', '.join(RULES)}: it has no record")
    out = {"name": rule.name}
    for f in dataclasses.fields(rule):
        v = getattr(rule, f.name)
        if isinstance(v, Space):
            raise ValueError(f"rule {rule.describe()} acts in a space of its caller ({v!r}), which has no record")
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out
