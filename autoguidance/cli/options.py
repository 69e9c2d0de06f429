"""Flags shared by several commands: the method and sampler flags of `sample` and `sweep` (-> a `MethodSpec`),
and number lists."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..methods import METHODS, PERTURBATIONS, MethodSpec, preset_fields, toml_loads
from ..sampling import SAMPLERS

__all__ = ["parse_floats", "add_method_arguments", "spec_from_args", "check_positive"]


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
    s = p.add_argument_group("sampler")
    s.add_argument("--sampler", default=None, choices=list(SAMPLERS), help="heun (EDM Alg. 2) or euler")
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default 32)")
    s.add_argument("--sigma-min", type=float, default=None, help="smallest noise level (default 0.002)")
    s.add_argument("--sigma-max", type=float, default=None, help="largest noise level (default 80)")
    s.add_argument("--rho", type=float, default=None, help="schedule exponent (default 7)")
    s.add_argument("--churn", type=float, default=None, help="S_churn (default 0: deterministic)")


def spec_from_args(args) -> MethodSpec:
    """Defaults <- the preset <- the TOML file (--config) <- explicit flags."""
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
                 churn=args.churn)
    if getattr(args, "interval", None):
        flags["interval"] = parse_floats(args.interval, 2, "--interval")
    if args.ramp:
        flags["ramp"] = parse_floats(args.ramp, 3, "--ramp")
    d.update({k: v for k, v in flags.items() if v is not None})
    preset = d.get("preset")
    if preset:
        d = {**preset_fields(preset), **d}
    return MethodSpec.from_dict(d)
