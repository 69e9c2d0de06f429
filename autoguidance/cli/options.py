"""Flags shared by several commands: the method, rule and sampler flags of `sample` and `sweep` (-> a `MethodSpec`),
and number lists."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..methods import METHODS, PERTURBATIONS, MethodSpec, preset_fields, toml_loads
from ..rules import RULES, SPACES
from ..sampling import SAMPLERS

__all__ = ["parse_floats", "parse_steps", "add_method_arguments", "add_step_arguments", "add_rule_arguments",
           "spec_from_args", "spec_fields_from_args", "rule_fields_from_args", "step_fields_from_args",
           "check_positive"]


def check_positive(v, flag: str, what: str) -> int:
    """A positive integer flag value, or a one-line error naming the flag."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{flag} must be a positive integer ({what}), got {v}")
    return v


def parse_floats(text: str, n: Optional[int] = None, what: str = "value") -> tuple:
    """'0.28,2.9' -> (0.28, 2.9); 'inf' allowed. Raises naming `what` when the count or a number is wrong."""
    try:
        vals = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        vals = ()
    if not vals or (n is not None and len(vals) != n):
        want = f"{n} numbers" if n else "numbers"
        raise ValueError(f"{what} must be {want} separated by commas, got {text!r}")
    return vals


def parse_steps(text: str, what: str = "--w-steps") -> tuple:
    """'7*45,3*3' -> (7.0,) * 45 + (3.0,) * 3: comma-separated values, each optionally repeated `*COUNT` times."""
    out: list = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        value, _, count = part.partition("*")
        try:
            v, k = float(value), int(count) if count else 1
        except ValueError:
            k = 0
        if k < 1:
            raise ValueError(f"{what} entry {part!r} must be VALUE or VALUE*COUNT (e.g. 7*45,3*3)")
        out += [v] * k
    if not out:
        raise ValueError(f"{what} must list one w per step, e.g. 7*45,3*3, got {text!r}")
    return tuple(out)


def add_method_arguments(p, with_grid: bool = False) -> None:
    """The method and sampler flags shared by `sample` and `sweep` (defaults None: unset flags do not override
    the config file or the preset). With `with_grid`, --method, --w, --p and --interval are left to the caller."""
    g = p.add_argument_group("model and guidance")
    g.add_argument("--config", default=None, help="TOML file of MethodSpec keys (flags override it)")
    g.add_argument("--net", default=None, help="main net: shipped name, checkpoint folder, or module:function")
    g.add_argument("--trust-code", action="store_true", help="allow nets given as module:function: importing them "
                   "runs their code (a config file cannot set this)")
    if not with_grid:
        g.add_argument("--method", default=None, choices=list(METHODS), help="guidance method")
        g.add_argument("--w", type=float, default=None, help="guidance weight w (1 = no guidance)")
        g.add_argument("--interval", default=None, help="LO,HI: apply w only for sigma in (LO, HI]")
        g.add_argument("--p", type=float, default=None, help="perturbation strength (dropout p, rate, k, std)")
    g.add_argument("--ramp", default=None, help="W_END,SIGMA_FROM,SIGMA_TO: w at sigma >= FROM down to W_END")
    g.add_argument("--perturbation", default=None, choices=list(PERTURBATIONS),
                   help="perturbation of method 'perturbation'")
    g.add_argument("--where", default=None, help="perturbation sites: a glob or comma-separated module paths "
                   "(see `autoguidance sites MODEL`)")
    g.add_argument("--gnet", default=None, help="guide net (autoguidance; a preset's gnet)")
    g.add_argument("--uncond", default=None, help="separate unconditional net for CFG")
    g.add_argument("--a", type=float, default=None, help="cfg-autoguidance mixing ratio in [0, 1]")
    g.add_argument("--preset", default=None, help="a preset name (autoguidance presets)")
    g.add_argument("--max-batch", type=int, default=None, help="rows per forward call (memory bound)")
    add_step_arguments(g)
    add_rule_arguments(p, with_rule=not with_grid)
    s = p.add_argument_group("sampler")
    s.add_argument("--sampler", default=None, choices=list(SAMPLERS), help="heun (EDM Alg. 2) or euler")
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default 32)")
    s.add_argument("--sigma-min", type=float, default=None, help="smallest noise level (default 0.002)")
    s.add_argument("--sigma-max", type=float, default=None, help="largest noise level (default 80)")
    s.add_argument("--rho", type=float, default=None, help="schedule exponent (default 7)")
    s.add_argument("--churn", type=float, default=None, help="S_churn (default 0: deterministic)")
    s.add_argument("--cfgpp", action="store_true", default=None, help="CFG++ steps (euler, heun): re-noise with the "
                   "guide's prediction (Chung et al. 2024)")


def add_step_arguments(g, what: str = "sampler step") -> None:
    """--w-steps and --window (the step forms of w) in the argument group `g` (`sample`, `sweep`, `pipe`)."""
    g.add_argument("--w-steps", default=None, help=f"one w per {what}, VALUE or VALUE*COUNT comma-separated "
                   "(e.g. 7*45,3*3); replaces --w")
    g.add_argument("--window", default=None, help="START,STOP: apply w only for the steps i with int(START N) <= i < "
                   "int(STOP N) (fractions of the N steps, e.g. 0.01,0.2)")


def add_rule_arguments(p, with_rule: bool = True, space_default: str = "x0") -> None:
    """The combination-rule flags (`autoguidance rules`) of `sample`, `sweep` and `pipe`, as their own group; with
    `with_rule`, --rule too (sweep's grid gives --rules). `space_default`: what an unset --rule-space means there."""
    r = p.add_argument_group("combination rule (autoguidance rules)")
    if with_rule:
        r.add_argument("--rule", default=None, choices=list(RULES), help="how the passes combine (default linear)")
    r.add_argument("--eta", type=float, default=None, help="apg: weight of the part parallel to the main prediction")
    r.add_argument("--norm-threshold", type=float, default=None, help="apg: bound on the difference's norm (0: none)")
    r.add_argument("--momentum", type=float, default=None, help="apg: running-average coefficient (e.g. -0.5)")
    r.add_argument("--phi", type=float, default=None, help="rescale: mix of the rescaled prediction (0.7)")
    r.add_argument("--zero-init-steps", type=int, default=None, help="cfg-zero: steps with a zero output first")
    r.add_argument("--alpha", type=float, default=None, help="mambo: fall-off of w with ||c - u|| / ||u||")
    r.add_argument("--scales", default=None, help="fdg: per-level (w_l - 1)/(w - 1), high to low frequency")
    r.add_argument("--parallel-weights", default=None, help="fdg: per-level weight of the parallel part")
    r.add_argument("--rule-space", default=None, choices=list(SPACES),
                   help=f"the space the rule acts in (default: {space_default})")
    r.add_argument("--rule-form", default=None, choices=["conditional", "unconditional"],
                   help="apg / fdg: update on the main prediction (paper) or on the guide's (diffusers)")


def rule_fields_from_args(args) -> dict:
    """The MethodSpec keys of the rule flags that are set (`rule`, `eta`, ..., `rule_form`; lists parsed)."""
    flags = dict(rule=getattr(args, "rule", None), eta=args.eta, norm_threshold=args.norm_threshold,
                 momentum=args.momentum, phi=args.phi, zero_init_steps=args.zero_init_steps, alpha=args.alpha,
                 rule_space=args.rule_space, rule_form=args.rule_form)
    for name in ("scales", "parallel_weights"):
        if getattr(args, name):
            flags[name] = parse_floats(getattr(args, name), None, "--" + name.replace("_", "-"))
    return {k: v for k, v in flags.items() if v is not None}


def step_fields_from_args(args) -> dict:
    """The MethodSpec keys of --w-steps and --window when set (`w_steps`, `window`)."""
    flags = {}
    if args.w_steps:
        flags["w_steps"] = parse_steps(args.w_steps)
    if args.window:
        flags["window"] = parse_floats(args.window, 2, "--window")
    return flags


def spec_from_args(args) -> MethodSpec:
    """Defaults <- the preset <- the TOML file (--config) <- explicit flags."""
    return MethodSpec.from_dict(spec_fields_from_args(args))


def spec_fields_from_args(args) -> dict:
    """The MethodSpec keys `spec_from_args` builds its spec from (unchecked)."""
    d: dict = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.exists():
            raise FileNotFoundError(f"--config {path}: no such file")
        if not path.is_file():
            raise ValueError(f"--config {path} is not a file: give a TOML file of method settings")
        try:
            text = path.read_text()
        except UnicodeDecodeError as e:
            raise ValueError(f"--config {path} is not a text (TOML) file ({e})") from e
        d.update(toml_loads(text, f"--config {path}"))
        if "trust_code" in d:
            raise ValueError(f"--config {path} sets trust_code: a config file cannot allow running code; drop "
                             "that key and pass --trust-code on the command line")
    flags = dict(net=args.net, method=getattr(args, "method", None), w=getattr(args, "w", None),
                 p=getattr(args, "p", None), perturbation=args.perturbation, where=args.where, gnet=args.gnet,
                 uncond=args.uncond, a=args.a, preset=args.preset, max_batch=args.max_batch, sampler=args.sampler,
                 steps=args.steps, sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho,
                 churn=args.churn, cfgpp=args.cfgpp, **rule_fields_from_args(args), **step_fields_from_args(args))
    if getattr(args, "interval", None):
        flags["interval"] = parse_floats(args.interval, 2, "--interval")
    if args.ramp:
        flags["ramp"] = parse_floats(args.ramp, 3, "--ramp")
    d.update({k: v for k, v in flags.items() if v is not None})
    preset = d.get("preset")
    if preset:
        d = {**preset_fields(preset), **d}
    return d
