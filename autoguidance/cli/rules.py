"""`autoguidance rules [NAME] [--json]`: the combination rules, their parameters with defaults and flags, the space
each acts in, and the paper each comes from; then the step forms of w and CFG++."""
from __future__ import annotations

import dataclasses
import json

from ..methods import RULE_PARAMS
from ..rules import RULES

__all__ = ["add_parser", "rule_table"]

#: rule parameter -> the flag of `sample` / `sweep` (and the TOML key without the dashes)
_FLAG = {v: "--" + k.replace("_", "-") for k, v in RULE_PARAMS.items()}

_EXTRAS = [
    ("cfg++", "--cfgpp (sampler euler or heun)", "the step re-noises with the guide's prediction instead of the "
     "guided one: x_next = D_w + sigma_next (x - D_bad) / sigma; w = the paper's lambda", "Chung et al. 2024, "
     "arXiv 2406.08070"),
    ("w per step", "--w-steps 7*45,3*3", "one w per sampler step (the run must have as many steps)",
     "Ideogram's step list"),
    ("step window", "--window 0.01,0.2", "w only for the steps int(START N) <= i < int(STOP N)",
     "diffusers' start/stop, SLG's 1-20%"),
    ("sigma threshold", "--interval LO,inf", "the guide pass stops below sigma LO", "Adaptive Guidance's skip "
     "at a fixed switch point, Castillo et al. 2023, arXiv 2312.12487"),
]


#: what a rule's default space (None) is, where
_DEFAULT_SPACE = "x0 for the library's denoisers, the model's own output in pipelines"


def rule_table() -> list[dict]:
    """One entry per rule: name, class, parameters `[{name, flag, default}]`, default space, formula, paper."""
    out = []
    for name, cls in RULES.items():
        params = [{"name": f.name, "flag": _FLAG.get(f.name, "--" + f.name.replace("_", "-")),
                   "default": list(f.default) if isinstance(f.default, tuple) else f.default}
                  for f in dataclasses.fields(cls)]
        space = _DEFAULT_SPACE if "space" in {f.name for f in dataclasses.fields(cls)} else "any (affine)"
        out.append({"name": name, "class": cls.__name__, "params": params, "space": space, "formula": cls.formula,
                    "paper": cls.paper})
    return out


def _show(r: dict) -> str:
    params = ", ".join(f"{p['flag']} {p['default'] if p['name'] != 'space' else 'default'}"
                       for p in r["params"]) or "(none)"
    return "\n".join([f"{r['name']} ({r['class']})",
                      f"  formula     {r['formula']}",
                      f"  parameters  {params}",
                      f"  space       {r['space']}" + ("  (--rule-space x0|eps|v)" if r["space"] != "any (affine)"
                                                      else ""),
                      f"  paper       {r['paper']}"])


def _cmd_rules(args) -> int:
    table = rule_table()
    if args.name:
        table = [r for r in table if r["name"] == args.name]
        if not table:
            raise ValueError(f"unknown rule {args.name!r}: expected one of {', '.join(RULES)}")
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print("\n\n".join(_show(r) for r in table))
    if not args.name:
        print("\nc: the main prediction, u: a guide's (several guides: see each rule's docstring). Beside the rules:")
        for name, flag, what, source in _EXTRAS:
            print(f"  {name:15s} {flag:34s} {what} ({source})")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("rules", help="the combination rules (APG, rescale, CFG-Zero*, ...): parameters, space, paper")
    p.add_argument("name", nargs="?", default=None, help="one rule (default: all)")
    p.add_argument("--json", action="store_true", help="machine-readable")
    p.set_defaults(func=_cmd_rules)
