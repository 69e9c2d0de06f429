"""`autoguidance digits ...`: the papers' ImageNet tables, re-measured on real 8x8 digits with EDM2-style U-Nets.

Protocol (the same for every row; Karras et al. 2024, Sec. 5, at digits scale):

- Models: the shipped checkpoints of `autoguidance/weights/digits` (made by `scripts/train_digits_checkpoints.sh`):
  main S at T; guide XS at T/16; S at T/16; XS at T; unconditional XS (CFG guide at T, unconditional guide at
  T/16); S trained with dropout 0.1; unconditional S; XS on half the data. Each at two EMA lengths (0.050, 0.150).
- Sampling: EDM Heun, `num_steps` steps, sigma in [0.002, 80], rho 7, one seed per image. Conditional rows draw
  class `seed % 10`, so every seed set is class-balanced like the test split.
- Metrics (`autoguidance.metrics`): FD_digits (Frechet distance in the digits classifier's 64-d feature space),
  precision/recall (k = 3), density/coverage (k = 5), all against the 500-image test split, and the classifier's
  accuracy on the conditioning label.
- Tuning: each method's guidance weight w (and, for separate guide nets, the guide's EMA length; the main's EMA
  is chosen once, by FD without guidance) is swept on seed set 0, the best by FD is kept, and the reported
  numbers are mean and spread (std) over the held-out seed sets 1, 2, 3, never the set used for tuning.

Commands (each writes PNG figures, a Markdown table and a JSON record to --out; `--quick` = few samples, for CI):

    autoguidance digits table          the main table, the sweep figure (FD against w), the sample grids
    autoguidance digits degradations   Karras et al.'s synthetic-degradation table (dropout, input noise)
    autoguidance digits failures       "what did not work": less data, quantized main, interval on autoguidance
    autoguidance digits schedules      constant w vs a sigma interval vs a ramp, for CFG, autoguidance, in-situ
    autoguidance digits features       train the feature network of the metrics
    autoguidance digits manifest       add the digits checkpoints to weights/manifest.json
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..checkpoint import WEIGHTS_DIR, load
from ..guidance import Guide, Guided, Pass, autoguidance, cfg, cfg_autoguidance, insitu, no_guidance, \
    perturbation_guidance
from ..io import atomic_path, write_json, write_text
from ..metrics.features import extract, load_feature_net, reference_features
from ..metrics.frechet import frechet_distance_features
from ..metrics.prdc import prdc
from ..sampling import generate
from ..schedules import Interval, Ramp, as_schedule

__all__ = ["Settings", "FULL", "QUICK", "Lab", "run_table", "run_degradations", "run_failures", "run_schedules",
           "quantize_weights", "add_parser", "DIGITS_WEIGHTS", "METRICS"]

DIGITS_WEIGHTS = WEIGHTS_DIR / "digits"
METRICS = ("fd", "precision", "recall", "density", "coverage", "accuracy")
INTERVAL = (0.28, 2.9)   # the guidance interval of Kynkaanniemi et al. (EDM2-S 512) in sigma, used as is


@dataclass(frozen=True)
class Settings:
    n:          int = 300                      # images per seed set
    num_steps:  int = 12                       # Heun steps (2 num_steps - 1 denoiser calls)
    tune_set:   int = 0                        # the seed set on which w and EMA lengths are chosen
    eval_sets:  tuple = (1, 2, 3)              # held-out seed sets: mean and spread are over these
    ws:         tuple = (1.1, 1.25, 1.5, 2.0, 3.0)  # guidance weights swept (w = 1 is the unguided row)
    emas:       tuple = ("050", "150")         # EMA lengths (relative std x 1000) of the checkpoints
    batch:      int = 300                      # images per sampler call (results do not depend on it)

    def seeds(self, seed_set: int) -> torch.Tensor:
        """Image seeds of a seed set: `seed_set * 1_000_000 + [0, n)`."""
        return seed_set * 1_000_000 + torch.arange(self.n, dtype=torch.int64)


FULL = Settings()
QUICK = Settings(n=40, num_steps=4, eval_sets=(1, 2), ws=(1.5, 2.5), emas=("050", "150"), batch=40)


def _fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


class Lab:
    """Shared state of one experiment run: checkpoints (loaded once), the feature net, the reference features,
    and every evaluation done so far (keyed by method, parameters and seed set, so rows share work)."""

    def __init__(self, settings: Settings = FULL, weights=None, features=None, progress: bool = True):
        self.s = settings
        self.weights = Path(weights) if weights is not None else DIGITS_WEIGHTS
        self.features_path = Path(features) if features is not None else self.weights / "features"
        self.feature_net = load_feature_net(self.features_path)
        self.ref = reference_features(self.features_path)
        self.progress = progress
        self._nets: dict[str, torch.nn.Module] = {}
        self.cache: dict[str, dict] = {}
        self.timing: dict[str, float] = {}          # seconds per evaluation (kept out of the numbers)
        self.samples: dict[str, torch.Tensor] = {}  # evaluation -> its first 100 images (first held-out set only)
        self.images: dict[str, torch.Tensor] = {}   # row key -> the samples of its reported parameters
        self.t0 = time.perf_counter()

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def net(self, name: str) -> torch.nn.Module:
        if name not in self._nets:
            path = self.weights / name
            if not (path / "config.json").exists():
                raise FileNotFoundError(f"digits checkpoint {name!r} is missing from {self.weights}: train the set "
                                        "with `bash scripts/train_digits_checkpoints.sh` (or pass --weights)")
            self._nets[name] = load(path)
        return self._nets[name]

    # -- one evaluation --------------------------------------------------------------------------------------------
    def _ck(self, build: Callable, params: dict, seed_set: int) -> str:
        """Evaluations are identified by the denoiser builder and its parameters (not the row), so rows that
        share a configuration (e.g. the autoguidance sweep and its 'same EMA' row) share the work."""
        return json.dumps([build.__qualname__, params, seed_set, self.s.n, self.s.num_steps], sort_keys=True)

    def evaluate(self, key: str, build: Callable, params: dict, seed_set: int, conditional: bool = True) -> dict:
        """Sample seed set `seed_set` with the denoiser `build(self, params)`; metrics against the test split."""
        ck = self._ck(build, params, seed_set)
        if ck in self.cache:
            return self.cache[ck]
        seeds = self.s.seeds(seed_set)
        classes = seeds % 10
        labels = torch.nn.functional.one_hot(classes, 10).float() if conditional else None
        D = build(self, params)
        t = time.perf_counter()
        with torch.no_grad():
            x = generate(D, seeds, [1, 8, 8], labels=labels, num_steps=self.s.num_steps, batch=self.s.batch,
                         progress=False)
        f, logits = extract(self.feature_net, x)
        rec = {"fd": frechet_distance_features(self.ref, f), **prdc(self.ref, f, 3, 5),
               "accuracy": float((logits.argmax(1) == classes).float().mean()) if conditional else None}
        self.cache[ck] = rec
        self.timing[ck] = time.perf_counter() - t
        if seed_set == self.s.eval_sets[0]:
            self.samples[ck] = x[:100].clone()
        if self.progress:
            print(f"  [{time.perf_counter() - self.t0:6.0f}s] {key:22s} {_fmt_params(params):44s} set {seed_set}: "
                  f"FD {rec['fd']:7.3f}  ({self.timing[ck]:.1f}s)", flush=True)
        return rec

    # -- sweep on the tuning set, then the held-out sets ------------------------------------------------------------
    def tune(self, key: str, build: Callable, grid: list[dict], conditional: bool = True) -> dict:
        """Evaluate every `params` of `grid` on the tuning set; keep the best by FD; report it on the held-out sets.
        Returns `{'best', 'sweep': [{params, fd}], 'mean': {metric}, 'std': {metric}, 'runs': [...]}`."""
        if not grid:
            raise ValueError(f"empty parameter grid for {key}")
        sweep = [{"params": p, **self.evaluate(key, build, p, self.s.tune_set, conditional)} for p in grid]
        best = min(sweep, key=lambda r: r["fd"])["params"]
        return {"best": best, "sweep": sweep, **self.heldout(key, build, best, conditional)}

    def heldout(self, key: str, build: Callable, params: dict, conditional: bool = True) -> dict:
        runs = [self.evaluate(key, build, params, s, conditional) for s in self.s.eval_sets]
        self.images[key] = self.samples.get(self._ck(build, params, self.s.eval_sets[0]))
        mean, std = {}, {}
        for m in METRICS:
            vals = [r[m] for r in runs if r[m] is not None]
            mean[m] = float(np.mean(vals)) if vals else None
            std[m] = float(np.std(vals, ddof=1)) if len(vals) > 1 else (0.0 if vals else None)
        return {"params": params, "mean": mean, "std": std, "runs": runs}

    def grid(self, **axes) -> list[dict]:
        """Cartesian product of named axes, in order: `grid(w=[..], guide=[..])`."""
        out = [{}]
        for name, values in axes.items():
            out = [dict(p, **{name: v}) for p in out for v in values]
        return out


# -- denoisers of the rows ------------------------------------------------------------------------------------------

def _ws(lab: Lab) -> list[float]:
    return [float(w) for w in lab.s.ws]


def _guide_names(lab: Lab, prefix: str) -> list[str]:
    return [f"{prefix}-ema{e}" for e in lab.s.emas]


def choose_main(lab: Lab, prefix: str, conditional: bool = True) -> tuple[str, dict]:
    """The main net's EMA length: the best FD without guidance on the tuning set."""
    res = lab.tune(f"none:{prefix}", _b_none, lab.grid(main=_guide_names(lab, prefix)), conditional)
    return res["best"]["main"], res


def _w(p: dict):
    """The weight of a row: a number, `Interval(w, *interval)` or `Ramp(w, 1, *ramp)` (sigma_from, sigma_to)."""
    if "interval" in p:
        return Interval(p["w"], *p["interval"])
    if "ramp" in p:
        return Ramp(p["w"], 1.0, sigma_from=p["ramp"][0], sigma_to=p["ramp"][1])
    return p["w"]


def _b_none(L, p):
    return no_guidance(L.net(p["main"]))


def _b_cfg(L, p):
    return cfg(L.net(p["main"]), _w(p), uncond=L.net(p["guide"]))


def _b_auto(L, p):
    return autoguidance(L.net(p["main"]), L.net(p["guide"]), _w(p))


def _b_insitu(L, p):
    return insitu(L.net(p["main"]), _w(p), p.get("p", 0.1))


_PERTURBATIONS = {"dropout": "Dropout", "inputnoise": "InputNoise", "blockdrop": "BlockDrop",
                  "identityattn": "IdentityAttention", "weightnoise": "WeightNoise"}


def _perturbation(kind: str, strength: float):
    """A perturbation of `autoguidance.perturb` by short name, with its strength as first argument."""
    from .. import perturb

    cls = getattr(perturb, _PERTURBATIONS.get(kind, "?"), None)
    if cls is None:
        raise RuntimeError(f"autoguidance.perturb has no perturbation {kind!r} ({_PERTURBATIONS.get(kind)}) in this "
                           f"version; known short names: {', '.join(_PERTURBATIONS)}")
    return cls(strength)


def _b_perturb(L, p):
    return perturbation_guidance(L.net(p["main"]), p["w"], _perturbation(p["kind"], p["strength"]))


def _b_cfg_auto(L, p):
    return cfg_autoguidance(L.net(p["main"]), L.net(p["guide"]), p["w"], p["a"], uncond=L.net(p["uncond"]))


def _b_degraded(L, p):
    """`D_good` = main under perturbation `good`, `D_bad` = main under `bad` (Karras et al. 2024, Sec. 5.1)."""
    net = L.net(p["main"])
    good = Pass(net, perturbation=_perturbation(*p["good"]))
    if "bad" not in p or p["w"] == 1.0:
        return Guided(good)
    return Guided(good, [Guide(Pass(net, perturbation=_perturbation(*p["bad"])), as_schedule(p["w"]))])


def quantize_weights(net: torch.nn.Module, bits: int = 4) -> torch.nn.Module:
    """A copy of an EDM2 net whose conv/linear weights are quantized to `bits` bits, symmetric and uniform per
    output channel (after EDM2's weight normalisation): the "weight-quantized main" guide of Karras et al."""
    from ..nets.mp import normalize

    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    q = copy.deepcopy(net).eval().requires_grad_(False)
    levels = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for name, p in q.named_parameters():
            if name.endswith("weight") and p.ndim >= 2:
                w = normalize(p.float()).double()
                scale = w.abs().flatten(1).amax(1).clamp_min(1e-12).reshape(-1, *([1] * (w.ndim - 1))) / levels
                p.copy_((torch.round(w / scale) * scale).to(p.dtype))
    return q


def _b_quant(L, p):
    key = f"{p['main']}@q{p['bits']}"
    if key not in L._nets:
        L._nets[key] = quantize_weights(L.net(p["main"]), p["bits"])
    return autoguidance(L.net(p["main"]), L._nets[key], p["w"])


# -- the experiments ---------------------------------------------------------------------------------------------

@dataclass
class Row:
    key: str
    label: str
    result: dict
    paper: str = ""       # the papers' ImageNet counterpart (RESEARCH.md section 2)
    group: str = "conditional"
    lab_key: str = ""     # the key of its evaluations in the Lab (default: `key`)

    def __post_init__(self):
        self.lab_key = self.lab_key or self.key


def _row_json(r: Row) -> dict:
    return {"key": r.key, "label": r.label, "paper": r.paper, "group": r.group, **r.result}


def _reference(r: Row, rows: list[Row]) -> tuple[Optional[dict], str]:
    """The result a row is compared with at matched seeds: D_good alone (degradations), else the first row of
    its group (the unguided main in the main table, autoguidance in 'failures', constant w in 'schedules')."""
    if "good_alone" in r.result:
        return r.result["good_alone"], "D_good alone"
    first = next(q for q in rows if q.group == r.group)
    return (None, "") if first is r else (first.result, first.label)


def paired_delta(result: dict, ref: dict, metric: str = "fd") -> Optional[tuple[float, float]]:
    """Mean and std over the held-out seed sets of `result - ref` (same seeds, so the seed sets' common
    variation cancels): `(mean, std)`, or None when the runs do not pair up."""
    a, b = result.get("runs", []), ref.get("runs", [])
    if not a or len(a) != len(b) or a[0].get(metric) is None or b[0].get(metric) is None:
        return None
    d = np.array([x[metric] - y[metric] for x, y in zip(a, b)])
    return float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0


def _table_md(rows: list[Row], title: str, note: str, s: Settings, extra_cols=()) -> str:
    head = ["method", "best params", "FD_digits", "dFD (matched seeds)", "precision", "recall", "density",
            "coverage", "accuracy", *[c for c, _ in extra_cols], "ImageNet (papers)"]
    lines = [f"# {title}", "", note, "",
             f"N = {s.n} images per seed set, Heun {s.num_steps} steps; mean +- std over held-out seed sets "
             f"{list(s.eval_sets)} (w and EMA lengths tuned on set {s.tune_set}). dFD: FD minus the FD of the "
             "reference (the first row of the same group, or D_good alone) on the same seeds, mean +- std over "
             "the held-out sets; negative is better.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mains: set = set()
    for r in rows:
        m, sd = r.result["mean"], r.result["std"]

        def cell(k, digits=3):
            if m.get(k) is None:
                return "-"
            return f"{m[k]:.{digits}f} +- {sd[k]:.{digits}f}"
        ref, ref_label = _reference(r, rows)
        d = paired_delta(r.result, ref) if ref is not None else None
        delta = f"{d[0]:+.2f} +- {d[1]:.2f}" if d is not None else "(reference)"
        params = {k: v for k, v in r.result["params"].items() if k not in ("main", "good", "bad")}
        mains.add(r.result["params"].get("main", "?"))
        lines.append("| " + " | ".join([r.label, _fmt_params(params) or "-", cell("fd", 2), delta, cell("precision"),
                                        cell("recall"), cell("density"), cell("coverage"), cell("accuracy"),
                                        *[f(r) for _, f in extra_cols], r.paper]) + " |")
    lines += ["", f"Main checkpoints (EMA chosen by FD without guidance): {', '.join(sorted(mains - {'?'}))}."]
    return "\n".join(lines) + "\n"


def render(out) -> list[str]:
    """Re-write every `digits_*.md` in `out` from its JSON record (no sampling): for a change of table layout."""
    out = Path(out)
    done = []
    for name, (stem, title, _) in EXPERIMENTS.items():
        path = out / f"{stem}.json"
        if not path.exists():
            continue
        rec = json.loads(path.read_text())
        rows = [Row(r["key"], r["label"], {k: v for k, v in r.items() if k not in ("key", "label", "paper", "group")},
                    r["paper"], r["group"]) for r in rec["rows"]]
        md = _table_md(rows, title, NOTES[name], Settings(**{k: tuple(v) if isinstance(v, list) else v
                                                              for k, v in rec["settings"].items()}),
                       _deg_cols() if name == "degradations" else ())
        if stem == "digits_table":
            md += _costs_md(rec.get("training_costs", {}))
        write_text(out / f"{stem}.md", md)
        done.append(stem)
    return done


def run_table(lab: Lab, methods: Optional[list[str]] = None) -> list[Row]:
    """The main table (Karras et al. 2024, Table 1 at digits scale, plus the in-situ and perturbation rows)."""
    W = _ws(lab)
    want = (lambda k: methods is None or k in methods)
    main, _ = choose_main(lab, "s-T")
    rows: list[Row] = []

    def add(key, label, build, grid, paper="", group="conditional", conditional=True, force=False):
        if force or want(key):
            rows.append(Row(key, label, lab.tune(key, build, grid, conditional), paper, group))

    rows.append(Row("none", "S, no guidance", lab.heldout("none:s-T", _b_none, {"main": main}),
                    "FID 2.56 / FD_DINOv2 68.64", lab_key="none:s-T"))
    add("cfg", "CFG (uncond. XS at T)", _b_cfg, lab.grid(main=[main], guide=_guide_names(lab, "xs-uncond-T"), w=W),
        "2.23 (w 1.40) / 52.32 (w 1.90)")
    add("cfg-interval", f"CFG, interval sigma in ({INTERVAL[0]}, {INTERVAL[1]}]", _b_cfg,
        lab.grid(main=[main], guide=_guide_names(lab, "xs-uncond-T"), interval=[list(INTERVAL)], w=W),
        "1.68 (w 2.10) / 46.25 (w 3.20)")
    add("auto", "autoguidance (XS, T/16)", _b_auto, lab.grid(main=[main], guide=_guide_names(lab, "xs-T16"), w=W),
        "**1.34** (w 2.10) / **36.67** (w 2.45)")
    if want("auto-same-ema"):
        same = f"xs-T16-ema{main.rsplit('ema', 1)[1]}"
        add("auto-same-ema", "- guide EMA = main's EMA", _b_auto, lab.grid(main=[main], guide=[same], w=W),
            "1.53 (w 1.95) / 40.81 (w 2.25)")
    add("auto-S-T16", "- reduce training only (S, T/16)", _b_auto,
        lab.grid(main=[main], guide=_guide_names(lab, "s-T16"), w=W), "1.51 (w 2.20) / 42.27 (w 2.55)")
    add("auto-XS-T", "- reduce capacity only (XS, T)", _b_auto,
        lab.grid(main=[main], guide=_guide_names(lab, "xs-T"), w=W), "2.13 (w 1.80) / 59.89 (w 1.90)")
    add("insitu", "in-situ dropout p = 0.1 (main without dropout)", _b_insitu, lab.grid(main=[main], p=[0.1], w=W),
        "2.57 / 90.05 (w' 2.0 = w 3.0; EDM2-S)")
    for kind, strength, label in (("blockdrop", 0.1, "block drop p = 0.1"), ("inputnoise", 0.2, "input noise +20%"),
                                  ("identityattn", 1.0, "identity attention")):
        add(kind, f"perturbation: {label}", _b_perturb,
            lab.grid(main=[main], kind=[kind], strength=[strength], w=W), "-")
    if want("cfg+auto"):
        best_cfg = next((r.result["best"]["guide"] for r in rows if r.key == "cfg"), _guide_names(lab, "xs-uncond-T")[-1])
        best_auto = next((r.result["best"]["guide"] for r in rows if r.key == "auto"), _guide_names(lab, "xs-T16")[-1])
        add("cfg+auto", "CFG + autoguidance (a = 0.5)", _b_cfg_auto,
            lab.grid(main=[main], guide=[best_auto], uncond=[best_cfg], a=[0.5], w=W), "(App. B.2: no FID given)")
    if want("dropout-main"):
        drop_main, _ = choose_main(lab, "s-dropout-T")
        rows.append(Row("none-dropout", "S trained with dropout 0.1, no guidance",
                        lab.heldout("none:s-dropout-T", _b_none, {"main": drop_main}), "(EDM2-M..XXL train with 0.1)",
                        "dropout-trained main", lab_key="none:s-dropout-T"))
        add("insitu-dropout", "in-situ dropout p = 0.1 (main trained with dropout)", _b_insitu,
            lab.grid(main=[drop_main], p=[0.1], w=W), "-", "dropout-trained main", force=True)
    if want("uncond"):
        # The unconditional S main (s-uncond-T) when shipped; otherwise the unconditional XS at T, guided by its own
        # T/16 snapshot (reduced training only: the training budget of this machine did not cover a fourth S run).
        shipped_s = (lab.weights / f"s-uncond-T-ema{lab.s.emas[0]}" / "config.json").exists()
        prefix, size = ("s-uncond-T", "S") if shipped_s else ("xs-uncond-T", "XS")
        u_main, _ = choose_main(lab, prefix, conditional=False)
        rows.append(Row("uncond-none", f"unconditional {size}, no guidance",
                        lab.heldout(f"none:{prefix}", _b_none, {"main": u_main}, conditional=False),
                        "11.67 / 209.53", "unconditional", lab_key=f"none:{prefix}"))
        add("uncond-auto", f"unconditional {size} + autoguidance (uncond. XS, T/16)", _b_auto,
            lab.grid(main=[u_main], guide=_guide_names(lab, "xs-uncond-T16"), w=W), "3.86 (w 2.85) / 90.39",
            "unconditional", conditional=False, force=True)
    return rows


def run_degradations(lab: Lab) -> list[Row]:
    """Karras et al. 2024, Sec. 5.1: degrade the dropout-free main synthetically; guide the less degraded copy by
    the more degraded one. Matched pairs should undo the damage, mismatched pairs should not."""
    main, _ = choose_main(lab, "s-T")
    W = [1.0] + [w for w in _ws(lab) if w != 1.0]
    d5, d10, n10, n20 = ("dropout", 0.05), ("dropout", 0.10), ("inputnoise", 0.10), ("inputnoise", 0.20)
    names = {d5: "dropout 5%", d10: "dropout 10%", n10: "input noise +10%", n20: "input noise +20%"}
    alone = {}
    for deg in (d5, d10, n10, n20):
        alone[deg] = lab.heldout(f"deg:{names[deg]}", _b_degraded, {"main": main, "good": list(deg)})
    rows = [Row("base", "main (S at T, no dropout), undegraded", lab.heldout("none:s-T", _b_none, {"main": main}),
                "2.56", lab_key="none:s-T")]
    paper = {(d5, d10): "4.98 / 15.00 / 2.55 (w 2.25)", (n10, n20): "3.96 / 9.73 / 2.56 (w 2.00)",
             (d5, n20): "no gain: best w = 1", (n10, d10): "no gain: best w = 1"}
    for good, bad in ((d5, d10), (n10, n20), (d5, n20), (n10, d10)):
        key = f"deg:{names[good]}|{names[bad]}"
        params = [{"main": main, "good": list(good), "bad": list(bad), "w": w} for w in W]
        sweep = [{"params": params[0], **lab.evaluate(f"deg:{names[good]}", _b_degraded,
                                                      {"main": main, "good": list(good)}, lab.s.tune_set)}]
        sweep += [{"params": p, **lab.evaluate(key, _b_degraded, p, lab.s.tune_set)} for p in params[1:]]
        best = min(sweep, key=lambda r: r["fd"])["params"]
        res = {"best": best, "sweep": sweep}
        if best["w"] == 1.0:   # w = 1 is D_good alone: no gain from the guide
            res.update({k: alone[good][k] for k in ("mean", "std", "runs")}, params=best)
        else:
            res.update(lab.heldout(key, _b_degraded, best))
        res["good_alone"], res["bad_alone"] = alone[good], alone[bad]
        rows.append(Row(key[4:], f"D_good {names[good]}, D_bad {names[bad]}", res,
                        paper[(good, bad)], "matched" if good[0] == bad[0] else "mismatched", lab_key=key))
    return rows


def run_failures(lab: Lab) -> list[Row]:
    """Karras et al. 2024, Sec. 5: guides that did not work (less data, quantization, interval on autoguidance)."""
    main, _ = choose_main(lab, "s-T")
    W = _ws(lab)
    rows = [Row("auto", "autoguidance (XS, T/16), for reference",
                lab.tune("auto", _b_auto, lab.grid(main=[main], guide=_guide_names(lab, "xs-T16"), w=W)), "1.34")]
    rows.append(Row("auto-half-data", "guide XS, T/16, trained on half the data",
                    lab.tune("auto-half-data", _b_auto, lab.grid(main=[main], guide=_guide_names(lab, "xs-half-T16"),
                                                                 w=W)), "did not work"))
    rows.append(Row("auto-quantized", "guide = main with 4-bit weights",
                    lab.tune("auto-quantized", _b_quant, lab.grid(main=[main], bits=[4], w=W)), "did not work"))
    best_guide = rows[0].result["best"]["guide"]
    rows.append(Row("auto-interval", f"autoguidance + interval ({INTERVAL[0]}, {INTERVAL[1]}]",
                    lab.tune("auto-interval", _b_auto, lab.grid(main=[main], guide=[best_guide],
                                                               interval=[list(INTERVAL)], w=W)),
                    "removed part of the gain"))
    return rows


def run_schedules(lab: Lab) -> list[Row]:
    """Does each method want w at all sigmas, or only in an interval, or fading out? Constant w vs the
    interval (0.28, 2.9] vs a ramp from w at sigma >= 10 down to 1 at sigma <= 0.1, each at its best w."""
    main, _ = choose_main(lab, "s-T")
    drop_main, _ = choose_main(lab, "s-dropout-T")
    W = _ws(lab)
    ramp = [10.0, 0.1]
    rows: list[Row] = []
    specs = [("CFG", _b_cfg, {"main": main, "guide": f"xs-uncond-T-ema{lab.s.emas[-1]}"}),
             ("autoguidance", _b_auto, {"main": main, "guide": f"xs-T16-ema{lab.s.emas[-1]}"}),
             ("in-situ (dropout-trained main)", _b_insitu, {"main": drop_main, "p": 0.1})]
    for name, build, base in specs:
        for sched, extra in (("constant w", {}), (f"interval ({INTERVAL[0]}, {INTERVAL[1]}]", {"interval": list(INTERVAL)}),
                             (f"ramp w -> 1 over sigma {ramp[0]:g} -> {ramp[1]:g}", {"ramp": ramp})):
            key = f"sched:{name}:{sched}"
            rows.append(Row(key, f"{name}: {sched}", lab.tune(key, build, [dict(base, **extra, w=w) for w in W]),
                            group=name))
    return rows


# -- outputs -------------------------------------------------------------------------------------------------------

def _save_fig(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")


def plot_sweeps(lab: Lab, rows: list[Row], path: Path, title: str) -> None:
    """FD_digits on the tuning set against w, one line per method (best over EMA lengths at each w); unguided
    rows as horizontal lines (their tuning-set FD)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    hlines = []
    for i, r in enumerate(rows):
        sweep = r.result.get("sweep")
        if not sweep or "w" not in sweep[-1]["params"]:
            if r.lab_key.startswith("none:"):
                hlines.append((r.label, lab.evaluate(r.lab_key, _b_none, r.result["params"], lab.s.tune_set,
                                                     r.group != "unconditional")["fd"]))
            continue
        by_w: dict[float, float] = {}
        for e in sweep:
            w = e["params"]["w"]
            by_w[w] = min(by_w.get(w, math.inf), e["fd"])
        ws = sorted(by_w)
        ax.plot(ws, [by_w[w] for w in ws], marker="os^D"[i // 10 % 4], ms=3, ls=["-", "--", ":"][i // 10 % 3],
                label=r.label)
    for label, fd in hlines:
        ax.axhline(fd, ls=":", color="k", lw=1)
        ax.annotate(label, (ax.get_xlim()[0], fd), fontsize=6, va="bottom")
    ax.set_xlabel("guidance weight w  (D_bad + w (D_good - D_bad))")
    ax.set_ylabel(f"FD_digits (tuning seed set {lab.s.tune_set})")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    _save_fig(fig, path)
    plt.close(fig)


def plot_grids(lab: Lab, rows: list[Row], path: Path) -> None:
    """Sample grids (first 100 seeds of the first held-out set: classes 0..9 in columns), same seeds everywhere."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(r, r.lab_key) for r in rows if r.lab_key in lab.images]
    if not keys:
        return
    cols = min(4, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3 * cols, 3.3 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (r, k) in zip(axes.flat, keys):
        x = lab.images[k][:100]
        m = len(x)
        side = int(math.ceil(math.sqrt(m)))
        canvas = -np.ones((side * 9, side * 9))
        for i in range(m):
            a, b = divmod(i, side)
            canvas[a * 9:a * 9 + 8, b * 9:b * 9 + 8] = x[i, 0].clamp(-1, 1).numpy()
        ax.imshow(canvas, cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(r.label if len(r.label) < 40 else r.label[:38] + "...", fontsize=7)
    _save_fig(fig, path)
    plt.close(fig)


def forward_flops(config: dict) -> int:
    """FLOPs of one forward pass of `EDM2Precond(**config)` on one image (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..nets.edm2 import EDM2Precond

    net = EDM2Precond(**config).eval()
    x = torch.zeros(1, config["img_channels"], config["img_resolution"], config["img_resolution"])
    labels = torch.zeros(1, config["label_dim"]) if config["label_dim"] else None
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, torch.ones(1), labels)
    return int(counter.get_total_flops())


def training_costs(weights) -> dict[str, dict]:
    """Training cost of every checkpoint as recorded in its meta (`train_seconds` at its iteration), and as a
    percentage of the main's (s-T, same EMA): the papers quote +3.6% for an S main guided by XS at T/16."""
    weights = Path(weights)
    main = weights / "s-T-ema050" / "config.json"
    if not main.exists():
        return {}
    base = json.loads(main.read_text())["meta"]
    if "train_seconds" not in base or "train" not in base:
        return {}   # not written by `autoguidance train`
    base_flops = forward_flops(json.loads(main.read_text())["config"]) * base["iteration"] * base["train"]["batch"]
    out = {}
    for cfg_file in sorted(weights.glob("*-ema050/config.json")):
        meta = json.loads(cfg_file.read_text())["meta"]
        if "train_seconds" in meta:
            name = cfg_file.parent.name[:-len("-ema050")]
            flops = forward_flops(json.loads(cfg_file.read_text())["config"]) * meta["iteration"] * meta["train"]["batch"]
            out[name] = {"iteration": meta["iteration"], "train_seconds": meta["train_seconds"],
                         "percent_of_main_flops": round(100 * flops / base_flops, 2),
                         "percent_of_main_seconds": round(100 * meta["train_seconds"] / base["train_seconds"], 1),
                         "percent_of_main_images": round(100 * meta["iteration"] * meta["train"]["batch"] /
                                                         (base["iteration"] * base["train"]["batch"]), 2)}
    return out


def _costs_md(costs: dict) -> str:
    if not costs:
        return ""
    lines = ["", "Training cost (wall-clock seconds on one CPU core, from each checkpoint's meta):", "",
             "| checkpoint | iteration | seconds | % of main (seconds) | % of main (FLOPs) |", "|---|---|---|---|---|"]
    for k, c in costs.items():
        lines.append(f"| {k} | {c['iteration']} | {c['train_seconds']:.0f} | {c['percent_of_main_seconds']:.1f}% | "
                     f"{c['percent_of_main_flops']:.2f}% |")
    return "\n".join(lines) + "\n"


def _write(lab: Lab, out: Path, stem: str, rows: list[Row], title: str, note: str, extra_cols=()) -> dict:
    record = {"experiment": stem, "settings": asdict(lab.s), "rows": [_row_json(r) for r in rows],
              "seconds": round(time.perf_counter() - lab.t0, 1)}
    md = _table_md(rows, title, note, lab.s, extra_cols)
    if stem == "digits_table":
        record["training_costs"] = training_costs(lab.weights)
        md += _costs_md(record["training_costs"])
    write_json(out / f"{stem}.json", record)
    write_text(out / f"{stem}.md", md)
    return record


def _deg_cols():
    def alone(which):
        def f(r):
            a = r.result.get(which)
            return f"{a['mean']['fd']:.2f} +- {a['std']['fd']:.2f}" if a else "-"
        return f
    return [("FD D_good alone", alone("good_alone")), ("FD D_bad alone", alone("bad_alone"))]


EXPERIMENTS = {
    "table": ("digits_table", "Main table: guidance methods on digits (EDM2-style S main)", run_table),
    "degradations": ("digits_degradations", "Synthetic degradations (Karras et al. 2024, Sec. 5.1)", run_degradations),
    "failures": ("digits_failures", "What did not work as a guide (Karras et al. 2024, Sec. 5)", run_failures),
    "schedules": ("digits_schedules", "Schedules of w(sigma): constant vs interval vs ramp", run_schedules),
}


NOTES = {
    "table": "Best w (and guide EMA) per method; 'ImageNet (papers)' is EDM2-S 512 FID / FD_DINOv2 at its best w "
             "(RESEARCH.md section 2).",
    "degradations": "Main S at T (trained without dropout) degraded at sampling time; guided = D_bad + w (D_good - "
                    "D_bad) at the best w (w = 1 allowed: no gain). Dropout masks of the two passes share per-row "
                    "random numbers (the 10% mask contains the 5% mask).",
    "failures": "Each guide at its best w on the same S main; compare with the first row.",
    "schedules": "Each schedule at its best peak w; guide EMA 0.150; in-situ p = 0.1.",
}


def run_experiment(name: str, out, settings: Settings = FULL, weights=None, methods=None,
                   progress: bool = True, lab: Optional[Lab] = None) -> dict:
    """Run one experiment from the shipped (or `weights`) checkpoints and write `<stem>.md/.json/.png` to `out`."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown digits experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    stem, title, fn = EXPERIMENTS[name]
    lab = lab or Lab(settings, weights, progress=progress)
    out = Path(out)
    rows = fn(lab, methods) if name == "table" else fn(lab)
    note = NOTES[name]
    record = _write(lab, out, stem, rows, title, note, _deg_cols() if name == "degradations" else ())
    if name in ("table", "failures", "schedules"):
        plot_sweeps(lab, rows, out / f"{stem}_sweep.png", f"{title}: FD_digits against w")
    if name == "table":
        plot_grids(lab, rows, out / f"{stem}_samples.png")
    return record


# -- the manifest --------------------------------------------------------------------------------------------------

_DESCRIPTIONS = {
    "s": "EDM2-style S U-Net (142k params), conditional, digits 8x8",
    "xs": "EDM2-style XS U-Net (63k params), conditional, digits 8x8",
    "xs-uncond": "EDM2-style XS U-Net, unconditional (CFG guide at T, unconditional autoguide at T/16)",
    "s-dropout": "EDM2-style S U-Net trained with dropout 0.1 (in-situ guidance on a net that saw dropout)",
    "s-uncond": "EDM2-style S U-Net, unconditional (main of the unconditional rows)",
    "xs-half": "EDM2-style XS U-Net trained on half the train split ('less data' guide)",
}


def write_manifest(folder=None) -> int:
    """Add every checkpoint folder of `folder` (default weights/digits) to weights/manifest.json as
    `digits-<subfolder>`, with a description and the command that made it."""
    folder = Path(folder) if folder is not None else DIGITS_WEIGHTS
    manifest_path = WEIGHTS_DIR / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"checkpoints": {}}
    count = 0
    for cfg_file in sorted(folder.glob("*/config.json")):
        cfg_json = json.loads(cfg_file.read_text())
        sub = cfg_file.parent.name
        meta = cfg_json.get("meta", {})
        if cfg_json["family"] == "digits-features":
            desc = f"digits feature network (CNN classifier; test accuracy {meta.get('test_accuracy', 0):.3f})"
        else:
            stem, snap = sub.rsplit("-T", 1)[0], sub.rsplit("-T", 1)[1]
            when = "T" if snap.startswith("-") else f"T/{snap.split('-')[0]}"
            desc = (f"{_DESCRIPTIONS.get(stem, stem)}; snapshot {when} (iteration {meta.get('iteration')}), "
                    f"EMA std {meta.get('ema_std')}, {meta.get('train_seconds')} s of training")
        manifest["checkpoints"][f"digits-{sub}"] = {
            "path": str(cfg_file.parent.resolve().relative_to(WEIGHTS_DIR.resolve())),
            "family": cfg_json["family"], "description": desc, "command": meta.get("command", "")}
        count += 1
    write_json(manifest_path, manifest)
    return count


# -- command line --------------------------------------------------------------------------------------------------

def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("digits", help="the papers' tables on real 8x8 digits (EDM2-style U-Nets)")
    dsub = p.add_subparsers(dest="digits_command", required=True)
    for name, (stem, title, _) in EXPERIMENTS.items():
        q = dsub.add_parser(name, help=title, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        q.add_argument("--out", default="digits-results", help="output folder")
        q.add_argument("--quick", action="store_true", help="few samples and steps (CI); numbers are not meaningful")
        q.add_argument("--n", type=int, default=None, help="images per seed set (overrides the mode's)")
        q.add_argument("--steps", type=int, default=None, help="Heun steps (overrides the mode's)")
        q.add_argument("--weights", default=None, help="checkpoint folder (default: the shipped digits weights)")
        q.add_argument("--threads", type=int, default=1, help="torch threads (fixed, so numbers reproduce exactly)")
        if name == "table":
            q.add_argument("--methods", default="", help="comma-separated row keys (default: all)")
        q.add_argument("--quiet", action="store_true", help="no per-evaluation log lines")
        q.set_defaults(func=_run_cli, experiment=name)
    a = dsub.add_parser("all", help="every experiment in one process (shared evaluations), each written when done",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a.add_argument("--out", default="digits-results", help="output folder")
    a.add_argument("--quick", action="store_true", help="few samples and steps (CI); numbers are not meaningful")
    a.add_argument("--n", type=int, default=None, help="images per seed set (overrides the mode's)")
    a.add_argument("--steps", type=int, default=None, help="Heun steps (overrides the mode's)")
    a.add_argument("--weights", default=None, help="checkpoint folder (default: the shipped digits weights)")
    a.add_argument("--threads", type=int, default=1, help="torch threads (fixed, so numbers reproduce exactly)")
    a.add_argument("--only", default=",".join(EXPERIMENTS), help="comma-separated experiments, in order")
    a.add_argument("--quiet", action="store_true", help="no per-evaluation log lines")
    a.set_defaults(func=_all_cli)
    f = dsub.add_parser("features", help="train the feature network of the digits metrics",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    f.add_argument("--out", default=str(DIGITS_WEIGHTS / "features"))
    f.add_argument("--epochs", type=int, default=40)
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=_features_cli)
    r = dsub.add_parser("render", help="re-write the Markdown tables of --out from their JSON records")
    r.add_argument("--out", default="digits-results")
    r.set_defaults(func=lambda a: print(f"rendered: {', '.join(render(a.out)) or '(nothing)'}") or 0)
    m = dsub.add_parser("manifest", help="add the digits checkpoints to weights/manifest.json")
    m.add_argument("--folder", default=str(DIGITS_WEIGHTS))
    m.set_defaults(func=lambda a: print(f"manifest: {write_manifest(a.folder)} digits checkpoints") or 0)


def _settings(args) -> Settings:
    s = QUICK if args.quick else FULL
    if args.n is not None:
        s = replace(s, n=args.n, batch=min(s.batch, args.n) if s.batch else args.n)
    if args.steps is not None:
        s = replace(s, num_steps=args.steps)
    return s


def _run_cli(args) -> int:
    torch.set_num_threads(args.threads)
    methods = [m for m in getattr(args, "methods", "").split(",") if m.strip()] or None
    rec = run_experiment(args.experiment, args.out, _settings(args), args.weights, methods, progress=not args.quiet)
    stem = EXPERIMENTS[args.experiment][0]
    print((Path(args.out) / f"{stem}.md").read_text())
    print(f"wrote {args.out}/{stem}.md, {stem}.json (+ figures) in {rec['seconds']:.0f} s")
    return 0


def _all_cli(args) -> int:
    torch.set_num_threads(args.threads)
    lab = Lab(_settings(args), args.weights, progress=not args.quiet)
    for name in [e for e in args.only.split(",") if e.strip()]:
        rec = run_experiment(name, args.out, lab.s, lab=lab)
        stem = EXPERIMENTS[name][0]
        print((Path(args.out) / f"{stem}.md").read_text(), flush=True)
        print(f"wrote {args.out}/{stem}.* at {rec['seconds']:.0f} s", flush=True)
    return 0


def _features_cli(args) -> int:
    from ..metrics.features import train_feature_net

    cmd = f"autoguidance digits features --out {args.out} --epochs {args.epochs} --seed {args.seed}"
    net = train_feature_net(args.out, epochs=args.epochs, seed=args.seed, meta={"command": cmd})
    print(f"saved {args.out}: test accuracy {net.checkpoint_meta['test_accuracy']:.4f}")
    return 0
