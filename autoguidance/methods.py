"""One guided-denoiser factory for commands and experiments: a `MethodSpec` (flags, TOML or JSON) -> `Guided`.

    spec = MethodSpec(net="toy-denoiser-main", method="autoguidance", gnet="toy-denoiser-guide", w=3.0, steps=32,
                      sigma_max=5.0)
    D = build_method(spec)                                   # a Guided denoiser
    x = generate(D, seeds, sample_shape(D.main.net), **spec.sampling())
    spec.to_toml() / MethodSpec.from_toml(text)              # the same spec as a config file (flat keys)

Methods (weights in this library's convention `D_bad + w (D_good - D_bad)`, w = 1: no guidance):

| method             | guide                                                       | needs                  |
|--------------------|-------------------------------------------------------------|------------------------|
| `none`             | -                                                           | net                    |
| `cfg`              | net without labels, or a separate unconditional net         | net, [uncond]          |
| `cfg-interval`     | as cfg, w only for sigma in (lo, hi]                        | net, [uncond], interval|
| `autoguidance`     | a smaller / shorter-trained net (Karras et al. 2024)        | net, gnet              |
| `insitu`           | net with dropout p on (in-situ autoguidance, 2025)          | net (a module)         |
| `perturbation`     | net under `perturbation` at strength p (PERTURBATIONS)      | net (a module)         |
| `cfg-autoguidance` | uncond at w_u = (1-a)(w-1)+1 and gnet at w_c = a(w-1)+1 (Karras App. B.2) | net, gnet, [uncond] |

Every method with a guide takes a combination rule (`rule`, a key of `autoguidance.rules.RULES`; `autoguidance rules`
lists them) with its parameters as flat keys (`eta`, `norm_threshold`, `momentum`, `phi`, `zero_init_steps`, `alpha`,
`scales`, `parallel_weights`, `rule_space`, `rule_form`); `w_steps` (one w per sampler step) and `window` (w only in
a fraction of the steps) are the step forms of w; `cfgpp` switches the Euler / Heun step to CFG++.

A model is a shipped checkpoint name (`autoguidance models`), a checkpoint folder, or `package.module:function`
(a function of no arguments that returns a denoiser; a `torch.nn.Module` is put in eval mode). Importing a module
runs its code, so `module:function` needs an explicit opt-in, `trust_code=True` (the `--trust-code` flag); a
config file cannot grant it. A `preset`
(`autoguidance presets`) fixes method, w, interval and p and supplies sampler defaults; the nets stay yours.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import perturb
from .guidance import Guided, autoguidance, cfg, cfg_autoguidance, insitu, no_guidance, perturbation_guidance
from .rules import RULES, Rule, make_rule
from .sampling import SAMPLERS
from .schedules import Ramp, StepList, StepWindow, check_weight

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None


def toml_loads(text: str, where: str) -> dict:
    if tomllib is None:
        raise ValueError(f"reading {where} needs Python >= 3.11 (tomllib) or `pip install tomli`")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{where} is not valid TOML: {e}") from e

__all__ = ["MethodSpec", "METHODS", "PERTURBATIONS", "build_method", "load_model", "model_digest", "sample_shape",
           "label_dim", "make_perturbation", "parse_where", "toml_loads", "is_code_ref", "rule_from_keys"]

#: method name -> what it does (the `--method` choices).
METHODS = {
    "none":             "the net alone",
    "cfg":              "classifier-free guidance: guide = the net without labels (or --uncond)",
    "cfg-interval":     "CFG with w only for sigma in (lo, hi] (--interval), w = 1 elsewhere",
    "autoguidance":     "guide = a smaller and/or shorter-trained net of the same task (--gnet)",
    "insitu":           "guide = the same net with dropout p switched on (in-situ autoguidance)",
    "perturbation":     "guide = the same net under --perturbation at strength --p",
    "cfg-autoguidance": "CFG and autoguidance mixed by --a (Karras et al. 2024, App. B.2)",
}

#: perturbation name -> (class in autoguidance.perturb, its strength keyword, takes where=)
_PERTURBATION_TABLE = {
    "dropout":           ("Dropout", "p", True),
    "blockdrop":         ("BlockDrop", "p", True),
    "inputnoise":        ("InputNoise", "k", False),
    "weightnoise":       ("WeightNoise", "std", True),
    "identityattention": ("IdentityAttention", "scale", True),
    "seg":               ("SmoothedAttention", "s", True),
    "tokenshuffle":      ("TokenShuffle", None, True),
    "noisierlevel":      ("NoisierLevel", "k", False),
}
#: the perturbations this installation provides (those of the table present in autoguidance.perturb).
PERTURBATIONS = {k: v for k, v in _PERTURBATION_TABLE.items() if hasattr(perturb, v[0])}


@dataclass(frozen=True)
class MethodSpec:
    """Everything that decides a guided sample besides its seed and label. Round-trips to TOML and JSON."""

    net:          str = ""                         # main net D_good: shipped name, folder, or module:function
    method:       str = "none"                     # a key of METHODS
    w:            float = 1.0                      # guidance weight (D_bad + w (D_good - D_bad))
    interval:     Optional[tuple] = None           # (sigma_lo, sigma_hi]: w inside, 1 outside
    ramp:         Optional[tuple] = None           # (w_end, sigma_from, sigma_to): w at sigma >= from, w_end <= to
    perturbation: str = "dropout"                  # for method 'perturbation': a key of PERTURBATIONS
    p:            float = 0.1                      # perturbation strength (dropout p, block rate, k, std, scale)
    where:        Optional[str] = None             # perturbation sites: a glob or comma-separated module paths
    gnet:         Optional[str] = None             # guide net (autoguidance, cfg-autoguidance; a preset's gnet)
    uncond:       Optional[str] = None             # separate unconditional net for cfg (default: the net, no label)
    a:            float = 0.5                      # cfg-autoguidance mixing ratio (0: CFG, 1: autoguidance)
    preset:       Optional[str] = None             # a preset name (autoguidance presets)
    max_batch:    Optional[int] = None             # rows per forward call (memory bound); None = all
    sampler:      str = "heun"                     # 'heun' (EDM Algorithm 2) or 'euler'
    steps:        int = 32                         # sampling steps N
    sigma_min:    float = 0.002                    # smallest noise level of the schedule
    sigma_max:    float = 80.0                     # largest noise level (initial noise std)
    rho:          float = 7.0                      # schedule exponent (EDM Eq. 5)
    churn:        float = 0.0                      # S_churn (0: deterministic sampler)
    rule:         str = "linear"                   # combination rule: a key of autoguidance.rules.RULES
    eta:          Optional[float] = None           # apg: weight of the parallel part
    norm_threshold: Optional[float] = None         # apg: bound on the difference's norm (0: none)
    momentum:     Optional[float] = None           # apg: running-average coefficient (0: none)
    phi:          Optional[float] = None           # rescale: mix of the rescaled prediction
    zero_init_steps: Optional[int] = None          # cfg-zero: steps with a zero output at the start
    alpha:        Optional[float] = None           # mambo: fall-off of w with ||c - u|| / ||u||
    scales:       Optional[tuple] = None           # fdg: per-level (w_l - 1) / (w - 1), high to low frequency
    parallel_weights: Optional[tuple] = None       # fdg: per-level weight of the parallel part
    rule_space:   Optional[str] = None             # the space the rule acts in: x0, eps or v
    rule_form:    Optional[str] = None             # apg / fdg: conditional (paper) or unconditional (diffusers)
    w_steps:      Optional[tuple] = None           # one w per sampler step (replaces w; as many as steps)
    window:       Optional[tuple] = None           # (start, stop) fractions of the steps where w applies
    cfgpp:        bool = False                     # CFG++ steps (euler, heun): re-noise with the guide

    def __post_init__(self):
        _check_types(self)
        for name in ("scales", "parallel_weights", "w_steps", "window"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(float(x) for x in v))
        if self.zero_init_steps is not None:
            object.__setattr__(self, "zero_init_steps", int(self.zero_init_steps))
        for name in _OPTIONAL_FLOATS:
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("interval", "ramp"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(float(x) for x in v))
        for name in _FLOATS:
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "steps", int(self.steps))
        self.validate()

    # -- checks -------------------------------------------------------------------------------------------------
    def validate(self) -> "MethodSpec":
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: expected one of {', '.join(METHODS)}")
        check_weight(self.w)
        if self.interval is not None and len(self.interval) != 2:
            raise ValueError(f"interval must be two noise levels LO,HI, got {self.interval}")
        if self.ramp is not None and len(self.ramp) != 3:
            raise ValueError(f"ramp must be W_END,SIGMA_FROM,SIGMA_TO, got {self.ramp}")
        if self.interval is not None and self.ramp is not None:
            raise ValueError("give either --interval or --ramp, not both")
        if self.method == "cfg-interval" and self.interval is None:
            raise ValueError("method cfg-interval needs --interval LO,HI (e.g. 0.28,2.9)")
        if self.method in ("autoguidance", "cfg-autoguidance") and not self.gnet:
            raise ValueError(f"method {self.method} needs a guide net: --gnet MODEL")
        if self.method == "perturbation" and self.perturbation not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation {self.perturbation!r}: expected one of {', '.join(PERTURBATIONS)}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}: expected one of {', '.join(SAMPLERS)}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        for name in ("sigma_min", "sigma_max", "rho", "churn", "p", "a"):
            v = getattr(self, name)
            if not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v}")
        if self.churn < 0:
            raise ValueError(f"churn (S_churn) must be >= 0, got {self.churn}")
        if not self.rho > 0:
            raise ValueError(f"rho (schedule exponent) must be > 0, got {self.rho} (EDM uses 7)")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min {self.sigma_min}, sigma_max "
                             f"{self.sigma_max}")
        if not 0.0 <= self.a <= 1.0:
            raise ValueError(f"a (cfg-autoguidance mixing ratio) must be in [0, 1], got {self.a}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer (rows per forward call), got {self.max_batch}")
        self.make_rule()
        self._validate_steps()
        for name in ("interval", "ramp"):
            v = getattr(self, name)
            if v is not None and not all(math.isfinite(x) or (name == "interval" and x == math.inf) for x in v):
                raise ValueError(f"{name} must hold numbers, got {v}")
        if self.interval is not None and not (0 <= self.interval[0] < self.interval[1]):
            raise ValueError(f"interval must be LO,HI with 0 <= LO < HI, got {self.interval[0]:g},"
                             f"{self.interval[1]:g}")
        if self.method == "none" and not self.preset:
            given = [k for k, bad in (("w", self.w != 1.0), ("interval", self.interval is not None),
                                      ("ramp", self.ramp is not None), ("rule", self.rule != "linear"),
                                      ("w-steps", self.w_steps is not None), ("window", self.window is not None),
                                      ("cfgpp", self.cfgpp)) if bad]
            if given:
                raise ValueError(f"method none has no guidance, so {' and '.join(given)} would do nothing: drop "
                                 f"{', '.join('--' + k for k in given)}, or pick a --method")
        return self

    def _validate_steps(self) -> None:
        """The step forms of w and CFG++: one line naming the keys that clash or the value that is wrong."""
        shapes = [k for k, v in (("interval", self.interval), ("ramp", self.ramp), ("w_steps", self.w_steps),
                                 ("window", self.window)) if v is not None]
        if len(shapes) > 1:
            raise ValueError(f"give one shape of w, not {' and '.join(shapes)}: interval / ramp (in sigma), "
                             "w_steps (per step) or window (fraction of the steps)")
        if self.w_steps is not None:
            if self.w != 1.0:
                raise ValueError("w_steps gives w at every step: drop w (or drop w_steps)")
            if len(self.w_steps) != self.steps:
                raise ValueError(f"w_steps has {len(self.w_steps)} values for {self.steps} steps: give one per step "
                                 "(or set steps to match)")
            for v in self.w_steps:
                check_weight(v, "w_steps value")
        if self.window is not None:
            if len(self.window) != 2:
                raise ValueError(f"window must be START,STOP (fractions of the steps), got {list(self.window)}")
            StepWindow(self.w, *self.window)
        if self.cfgpp:
            if self.sampler not in ("euler", "heun"):
                raise ValueError(f"cfgpp runs on the euler and heun samplers (its paper defines Euler-type steps), "
                                 f"not {self.sampler}: pass --sampler euler or heun")
            if self.method in ("none", "cfg-autoguidance"):
                raise ValueError(f"cfgpp re-noises with the one guide's prediction: method {self.method} has "
                                 f"{'no guide' if self.method == 'none' else 'two guides'}")

    def make_rule(self) -> Rule:
        """The combination rule of the spec: `rule` with the parameters that are set (a parameter the rule does not
        take is refused, naming the rule's own)."""
        return rule_from_keys(self.rule, {k: getattr(self, k) for k in RULE_PARAMS})

    # -- conversions --------------------------------------------------------------------------------------------
    def sampling(self) -> dict:
        """Keyword arguments of `autoguidance.generate`: sampler, num_steps, sigma_min, sigma_max, rho, S_churn
        (and cfgpp when set)."""
        out = dict(sampler=self.sampler, num_steps=int(self.steps), sigma_min=self.sigma_min,
                   sigma_max=self.sigma_max, rho=self.rho, S_churn=self.churn)
        if self.cfgpp:
            out["cfgpp"] = True
        return out

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples as lists, None values kept). The rule and step keys (added with the rules)
        are written only when they differ from their defaults, so the identity of a run made before them (sample
        shards, sweep points) is unchanged."""
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
        for k in _LATER_KEYS:
            if out[k] == _DEFAULTS[k]:
                del out[k]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "MethodSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown method setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_toml(self) -> str:
        """Flat TOML (`key = value`, None values left out): `MethodSpec.from_toml(spec.to_toml()) == spec`."""
        lines = []
        for k, v in self.to_dict().items():
            if v is not None:
                lines.append(f"{k} = {_toml_value(v)}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text: str) -> "MethodSpec":
        return cls.from_dict(toml_loads(text, "the method config"))

    def replace(self, **changes) -> "MethodSpec":
        return dataclasses.replace(self, **changes)

    def label(self) -> str:
        """Short description for plots and logs, e.g. 'autoguidance w=2.5', 'cfg w=3 apg(eta=0.0)'."""
        extra = f" {self.perturbation} p={self.p:g}" if self.method == "perturbation" else \
            (f" p={self.p:g}" if self.method == "insitu" else "")
        iv = f" ({self.interval[0]:g},{self.interval[1]:g}]" if self.interval else ""
        rule = f" {self.make_rule().describe()}" if self.rule != "linear" else ""
        steps = (" w per step" if self.w_steps else "") + (f" steps {self.window[0]:g}-{self.window[1]:g}"
                                                             if self.window else "")
        return f"{self.method} w={self.w:g}{extra}{iv}{steps}{rule}{' cfg++' if self.cfgpp else ''}"


#: MethodSpec key -> parameter of the rule (the others have the parameter's own name)
RULE_PARAMS = {"eta": "eta", "norm_threshold": "norm_threshold", "momentum": "momentum", "phi": "phi",
               "zero_init_steps": "zero_init_steps", "alpha": "alpha", "scales": "scales",
               "parallel_weights": "parallel_weights", "rule_space": "space", "rule_form": "form"}


def rule_from_keys(rule: str, keys: dict) -> Rule:
    """The rule `rule` (a key of RULES) with the flat keys of `keys` that are set (`eta`, ..., `rule_space`,
    `rule_form`: RULE_PARAMS; None = unset), as MethodSpec, `sample`, `sweep` and `pipe` give them; a key the rule
    does not take is refused in one line naming its flag and the rule's own."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}: expected one of {', '.join(RULES)} (autoguidance rules)")
    unknown = sorted(set(keys) - set(RULE_PARAMS))
    if unknown:
        raise ValueError(f"unknown rule setting(s) {', '.join(unknown)}; known: {', '.join(RULE_PARAMS)}")
    own = {f.name for f in dataclasses.fields(RULES[rule])}
    given = {k: v for k, v in keys.items() if v is not None}
    extra = [k for k in RULE_PARAMS if k in given and RULE_PARAMS[k] not in own]
    if extra:
        def flag(k):
            return "--" + k.replace("_", "-")
        theirs = [flag(k) for k in RULE_PARAMS if RULE_PARAMS[k] in own]
        raise ValueError(f"rule {rule} takes no {', '.join(flag(k) for k in extra)}: its parameters are "
                         f"{', '.join(theirs) or '(none)'} (autoguidance rules)")
    return make_rule(rule, {RULE_PARAMS[k]: v for k, v in given.items()})
_LATER_KEYS = ("rule", *RULE_PARAMS, "w_steps", "window", "cfgpp")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MethodSpec)}
_FLOATS = ("w", "p", "a", "sigma_min", "sigma_max", "rho", "churn")
_OPTIONAL_FLOATS = ("eta", "norm_threshold", "momentum", "phi", "alpha")
_STRINGS = ("net", "method", "perturbation", "sampler", "rule")
_OPTIONAL_STRINGS = ("where", "gnet", "uncond", "preset", "rule_space", "rule_form")


def _check_types(spec: "MethodSpec") -> None:
    """Each field has its type (config files and the API give anything): a one-line error naming the key."""
    def bad(name, want):
        v = getattr(spec, name)
        return ValueError(f"method setting {name} must be {want}, got {type(v).__name__} {v!r}")

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    for name in _FLOATS:
        if not number(getattr(spec, name)):
            raise bad(name, "a number")
    for name in _STRINGS:
        if not isinstance(getattr(spec, name), str):
            raise bad(name, "a string")
    for name in _OPTIONAL_STRINGS:
        if getattr(spec, name) is not None and not isinstance(getattr(spec, name), str):
            raise bad(name, "a string")
    for name in _OPTIONAL_FLOATS:
        if getattr(spec, name) is not None and not number(getattr(spec, name)):
            raise bad(name, "a number")
    if spec.zero_init_steps is not None and not (number(spec.zero_init_steps)
                                                 and float(spec.zero_init_steps).is_integer()):
        raise bad("zero_init_steps", "an integer")
    if not isinstance(spec.cfgpp, bool):
        raise bad("cfgpp", "true or false")
    for name in ("scales", "parallel_weights", "w_steps", "window"):
        v = getattr(spec, name)
        if v is not None and not (isinstance(v, (list, tuple)) and v and all(number(x) for x in v)):
            raise bad(name, "a list of numbers")
    for name in ("steps", "max_batch"):
        v = getattr(spec, name)
        if not (v is None and name == "max_batch") and not (number(v) and float(v).is_integer()):
            raise bad(name, "an integer")
    for name, n in (("interval", 2), ("ramp", 3)):
        v = getattr(spec, name)
        if v is not None and not (isinstance(v, (list, tuple)) and len(v) == n and all(number(x) for x in v)):
            raise bad(name, f"a list of {n} numbers")
    if spec.max_batch is not None:
        object.__setattr__(spec, "max_batch", int(spec.max_batch))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string is a JSON string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


# -- models -----------------------------------------------------------------------------------------------------

def is_code_ref(ref) -> bool:
    """True if `ref` names code (`package.module:function`) rather than a checkpoint."""
    return isinstance(ref, str) and ":" in ref and not Path(ref).exists()


def load_model(ref: str, device="cpu", trust_code: bool = False) -> Callable:
    """A denoiser from a shipped checkpoint name, a checkpoint folder, or `package.module:function`. The last
    imports and runs code, so it needs `trust_code=True` (the `--trust-code` flag of the commands)."""
    from .checkpoint import load

    if not isinstance(ref, str) or not ref:
        raise ValueError("no model given: pass a shipped checkpoint name (autoguidance models), a checkpoint "
                         "folder, or package.module:function")
    if is_code_ref(ref):
        if not trust_code:
            raise ValueError(f"model {ref!r} names code (module:function), and importing it would run it: pass "
                             "--trust-code (trust_code=True) if you trust that module, or give a checkpoint")
        mod_name, _, fn_name = ref.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import {ref!r} ({e}): expected package.module:function, a function of no "
                             "arguments returning a denoiser D(x, sigma, labels)") from e
        net = fn()
        if isinstance(net, torch.nn.Module):
            net = net.to(device).eval().requires_grad_(False)
        if not callable(net):
            raise TypeError(f"{ref} returned a {type(net).__name__}, not a denoiser D(x, sigma, labels)")
        return net
    return load(ref, device=device)


def model_digest(ref: str) -> str:
    """What identifies a model reference in a run's identity: the checkpoint's digest (sha256 of its config.json
    and model.safetensors), or for `module:function` the reference itself (its code is not hashed)."""
    from .checkpoint import digest

    if is_code_ref(ref):
        return f"code:{ref}"
    return digest(ref)


def _config(net) -> dict:
    return getattr(net, "config", None) or {}


def sample_shape(net) -> list[int]:
    """One sample's shape for `net`: `[C, R, R]` from an image net's config, `[2]` for the toy nets, or the
    net's own `sample_shape` attribute. Raises when it cannot tell (pass --shape then)."""
    if hasattr(net, "sample_shape"):
        return [int(v) for v in net.sample_shape]
    c = _config(net)
    if "img_channels" in c and "img_resolution" in c:
        return [int(c["img_channels"]), int(c["img_resolution"]), int(c["img_resolution"])]
    if str(getattr(net, "family", "")).startswith("toy"):
        return [2]
    raise ValueError(f"cannot tell the sample shape of a {type(net).__name__}: pass --shape, e.g. --shape 3,64,64")


def label_dim(net) -> int:
    """Class-label dimension of `net` (0: unconditional)."""
    v = getattr(net, "label_dim", None)
    if v is None:
        v = _config(net).get("label_dim", 0)
    return int(v or 0)


def parse_where(where: Optional[str]):
    """`--where` text -> `where=` of a perturbation: None, a glob / path, or a list of paths (comma-separated)."""
    if where is None or "," not in where:
        return where
    return [s.strip() for s in where.split(",") if s.strip()]


def make_perturbation(name: str, strength: Any, where: Optional[str] = None) -> "perturb.Perturbation":
    """A perturbation by name (`PERTURBATIONS`) at `strength` (number or Schedule), on sites `where`
    (a glob, or comma-separated module paths; None: the perturbation's default sites)."""
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}: expected one of {', '.join(PERTURBATIONS)}")
    cls_name, key, takes_where = PERTURBATIONS[name]
    kwargs = {key: strength} if key else {}   # tokenshuffle has no strength (--p is ignored)
    if where is not None:
        if not takes_where:
            raise ValueError(f"perturbation {name} changes the inputs only and takes no --where")
        kwargs["where"] = parse_where(where)
    return getattr(perturb, cls_name)(**kwargs)


def _schedule(spec: MethodSpec):
    if spec.w_steps is not None:
        return StepList(spec.w_steps)
    if spec.window is not None:
        return StepWindow(check_weight(spec.w), *spec.window)
    if spec.ramp is not None:
        w_end, s_from, s_to = spec.ramp
        return Ramp(check_weight(spec.w), check_weight(w_end), sigma_from=s_from, sigma_to=s_to)
    return spec.w


def preset_fields(name: str) -> dict:
    from .edm2.presets import get_preset

    try:
        p = get_preset(name)
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    s = p.sampling()
    return dict(method=p.method, w=p.w, interval=p.interval, p=p.p if p.p is not None else 0.1,
                sampler=s["sampler"], steps=s["num_steps"], sigma_min=s["sigma_min"], sigma_max=s["sigma_max"],
                rho=s["rho"])


def build_method(spec: MethodSpec, load: Optional[Callable[[str], Callable]] = None, device="cpu",
                 trust_code: bool = False) -> Guided:
    """The guided denoiser of `spec`. `load(ref) -> denoiser` turns model references into nets (default:
    `load_model`; pass a caching loader to share nets across specs). Returns a `Guided` denoiser
    `D(x [N, *shape], sigma [N], labels [N, label_dim] or None) -> [N, *shape]`."""
    spec.validate()
    load = load or (lambda ref: load_model(ref, device, trust_code=trust_code))
    net = load(spec.net)
    if spec.preset:
        from .edm2.presets import build_preset

        fixed = preset_fields(spec.preset)
        clash = [k for k in ("method", "w", "interval", "p") if k in fixed and getattr(spec, k) != fixed[k]
                 and not (k == "p" and fixed["method"] != "insitu")]
        if clash:
            raise ValueError(f"preset {spec.preset} fixes {', '.join(f'{k}={fixed[k]}' for k in clash)}, but the "
                             f"spec says {', '.join(f'{k}={getattr(spec, k)}' for k in clash)}: drop those settings, "
                             "or drop --preset and give --method")
        own = [k for k in ("rule", *RULE_PARAMS, "w_steps", "window") if getattr(spec, k) != _DEFAULTS[k]]
        if own:
            raise ValueError(f"preset {spec.preset} builds its own guided denoiser, so "
                             f"{', '.join('--' + k.replace('_', '-') for k in own)} would do nothing: drop them, "
                             "or drop --preset and give --method")
        gnet = load(spec.gnet) if spec.gnet else None
        return build_preset(spec.preset, net, gnet, max_batch=spec.max_batch, device=device)
    m, w, mb = spec.method, _schedule(spec), spec.max_batch
    interval = spec.interval
    rule = spec.make_rule()
    if m == "none":
        return no_guidance(net)
    if m in ("cfg", "cfg-interval"):
        return cfg(net, w, uncond=load(spec.uncond) if spec.uncond else None, interval=interval, max_batch=mb,
                   rule=rule)
    if m == "autoguidance":
        return autoguidance(net, load(spec.gnet), w, interval=interval, max_batch=mb, rule=rule)
    if m == "cfg-autoguidance":
        if interval is not None or spec.ramp is not None or spec.w_steps is not None or spec.window is not None:
            raise ValueError("cfg-autoguidance takes a constant w: drop --interval / --ramp / --w-steps / --window")
        return cfg_autoguidance(net, load(spec.gnet), spec.w, spec.a,
                                uncond=load(spec.uncond) if spec.uncond else None, max_batch=mb, rule=rule)
    if not isinstance(net, torch.nn.Module):
        raise TypeError(f"method {m} hooks a perturbation into the network's modules: {spec.net} must give a "
                        f"torch.nn.Module, got {type(net).__name__}")
    if m == "insitu":
        return insitu(net, w, spec.p, where=parse_where(spec.where), module=net, interval=interval, max_batch=mb,
                      rule=rule)
    return perturbation_guidance(net, w, make_perturbation(spec.perturbation, spec.p, spec.where), module=net,
                                 interval=interval, max_batch=mb, rule=rule)
