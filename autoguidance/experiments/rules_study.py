"""`autoguidance mnist rules` (and `digits rules`): do the combination rules widen the usable w, or lower the best FD,
of CFG, autoguidance and in-situ guidance? The image tables' protocol (`digits.Lab`: seed sets, w tuned on set 0,
held-out sets, dFD at matched seeds, precision / recall, the evaluation store).

- Methods: CFG (guide: the unconditional XS at T), autoguidance (guide: the XS at T/16), both on the S main (EMA
  chosen by FD without guidance), and in-situ dropout p = 0.1 on the S main trained with dropout (the in-situ
  paper's setting); guide EMA 0.150 (as `digits schedules`).
- Rules (`RULE_SET`): linear, rescale (phi 0.7), APG (eta 0, momentum -0.5, no norm bound: its scale depends on
  the data), CFG-Zero* (one zero-init step); all in x0 space.
- w in `WS` = {1.25, 1.5, 2, 3, 4, 6} (quick mode: the settings' own w grid). The linear rows are the builders of
  the main table, so their evaluations are shared with it through the store.

Outputs (`<prefix>_rules.md/.json`, `<prefix>_rules_pr.png`, `<prefix>_rules_sweep.png`):

(a) each rule's best FD and dFD against the unguided main and against the same method's linear rule (paired over
    the held-out sets);
(b) the usable w: the w of the tuning-set sweep whose dFD is within one spread of the best, the spread being the
    std over the held-out sets of the best w's dFD; its range (w_lo, w_hi) and count;
(c) precision against recall over w (tuning set) for every method and rule, with CFG's linear w sweep as the
    reference curve in every panel ("Guidance Matters", arXiv 2602.22570: a method is better only where its curve
    lies outside CFG's at matched precision), and per curve the largest recall gain over CFG's curve at matched
    precision.

The verdict sentences of the Markdown are computed from these numbers.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np

from ..rules import make_rule
from ..runs.files import atomic_path, write_json, write_text
from .image_tables import Lab, _b_auto, _b_cfg, _b_insitu, _b_none, _b_ruled, choose_main
from .image_tables_report import paired_delta

__all__ = ["WS", "RULE_SET", "METHODS", "run_rules_study", "usable_w", "recall_gain"]

#: the study's guidance weights (quick mode uses the settings' grid)
WS = (1.25, 1.5, 2.0, 3.0, 4.0, 6.0)
#: rule key -> (rule name, its parameters): JSON in the evaluation's identity, so a change of settings recomputes
RULE_SET = {
    "linear": ("linear", {}),
    "rescale": ("rescale", {"phi": 0.7}),
    "apg": ("apg", {"eta": 0.0, "momentum": -0.5}),
    "cfg-zero": ("cfg-zero", {"zero_init_steps": 1}),
}
#: method key -> label
METHODS = {"cfg": "CFG (uncond. XS at T)", "auto": "autoguidance (XS, T/16)",
           "insitu": "in-situ dropout p = 0.1 (dropout-trained main)"}
_LINEAR = {"cfg": _b_cfg, "auto": _b_auto, "insitu": _b_insitu}


def usable_w(sweep: list[dict], best_fd: float, spread: float) -> list[float]:
    """The w of a tuning-set sweep whose FD is within `spread` of the best (`best_fd`), sorted."""
    return sorted(e["params"]["w"] for e in sweep if e["fd"] <= best_fd + spread)


def recall_gain(curve: list[tuple[float, float]], ref: list[tuple[float, float]]) -> Optional[float]:
    """The largest `recall - recall_ref(precision)` over the points (precision, recall) of `curve` whose precision
    lies within the reference curve's range (linear interpolation of the reference in precision); None if none
    does. Positive: the curve lies outside the reference at matched precision."""
    ref = sorted(ref)
    ps, rs = np.array([p for p, _ in ref]), np.array([r for _, r in ref])
    gains = [r - float(np.interp(p, ps, rs)) for p, r in curve if ps[0] <= p <= ps[-1]]
    return max(gains) if gains else None


def run_rules_study(lab: Lab, out, ws: Optional[tuple] = None, methods: Optional[tuple] = None,
                    rules: Optional[tuple] = None) -> dict:
    """Run the study on `lab` (every evaluation through its store) and write its outputs to `out`; `methods`: keys of
    `METHODS` (default every one; CFG always, its linear sweep is every curve's reference); `rules`: keys of `RULE_SET`
    (default every one; linear always, every rule is judged against it)."""
    out = Path(out)
    W = [float(w) for w in (ws if ws is not None else WS)]
    rules = tuple(rules) if rules else tuple(RULE_SET)
    unknown = [r for r in rules if r not in RULE_SET]
    if unknown:
        raise ValueError(f"unknown rules-study rule(s) {', '.join(unknown)}; known: {', '.join(RULE_SET)}")
    rule_set = {k: v for k, v in RULE_SET.items() if k == "linear" or k in rules}
    methods = tuple(methods) if methods else tuple(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown rules-study method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    methods = ("cfg",) + tuple(m for m in methods if m != "cfg")
    ema = lab.s.emas[-1]
    main, _ = choose_main(lab, "s-T")
    none = {"s-T": lab.heldout("none:s-T", _b_none, {"main": main})}
    drop_main = None
    if "insitu" in methods:
        drop_main, _ = choose_main(lab, "s-dropout-T")
        none["s-dropout-T"] = lab.heldout("none:s-dropout-T", _b_none, {"main": drop_main})
    bases = {"cfg": ({"main": main, "guide": f"xs-uncond-T-ema{ema}"}, "s-T"),
             "auto": ({"main": main, "guide": f"xs-T16-ema{ema}"}, "s-T"),
             "insitu": ({"main": drop_main, "p": 0.1}, "s-dropout-T")}
    bases = {m: bases[m] for m in methods}
    rows = []
    for m, (base, main_key) in bases.items():
        linear = None
        for rk, (name, args) in rule_set.items():
            key = f"rules:{m}:{rk}"
            if rk == "linear":
                res = lab.tune(key, _LINEAR[m], [dict(base, w=w) for w in W])
            else:
                res = lab.tune(key, _b_ruled, [dict(base, method=m, rule=name, rule_args=args, w=w) for w in W])
            d_none = paired_delta(res, none[main_key])
            spread = d_none[1] if d_none is not None else 0.0
            best_fd = min(e["fd"] for e in res["sweep"])
            use = usable_w(res["sweep"], best_fd, spread)
            row = {"key": key, "method": m, "rule": rk, "rule_text": make_rule(name, args).describe(),
                   "best_w": res["best"]["w"], "mean": res["mean"], "std": res["std"], "runs": res["runs"],
                   "sweep": [{"w": e["params"]["w"], **{k: e[k] for k in ("fd", "precision", "recall")}}
                             for e in res["sweep"]],
                   "dfd_none": d_none, "dfd_linear": paired_delta(res, linear) if linear is not None else None,
                   "usable_w": use, "usable_range": [use[0], use[-1]] if use else None, "spread": spread}
            if rk == "linear":
                linear = res
            rows.append(row)
    ref = [(e["precision"], e["recall"]) for e in next(r for r in rows if r["key"] == "rules:cfg:linear")["sweep"]]
    for r in rows:
        r["recall_gain_over_cfg"] = recall_gain([(e["precision"], e["recall"]) for e in r["sweep"]], ref)
    record = {"experiment": f"{lab.data.prefix}_rules", "settings": asdict(lab.s), "ws": W, "guide_ema": ema,
              "rules": {k: {"name": n, "params": a} for k, (n, a) in rule_set.items()},
              "mains": [m for m in (main, drop_main) if m],
              "unguided": {k: {"mean": v["mean"], "std": v["std"]} for k, v in none.items()}, "rows": rows,
              "verdicts": verdicts(rows), "seconds": round(time.perf_counter() - lab.t0, 1)}
    stem = f"{lab.data.prefix}_rules"
    write_json(out / f"{stem}.json", record)
    write_text(out / f"{stem}.md", render(record, lab))
    plot_pr(rows, out / f"{stem}_pr.png", lab.data.noun)
    plot_sweep(rows, out / f"{stem}_sweep.png", lab.data.fd_name)
    return record


def _present(rows: list[dict]) -> list[tuple[str, str]]:
    """The methods the rows hold, `(key, label)` in `METHODS` order."""
    return [(m, label) for m, label in METHODS.items() if any(r["method"] == m for r in rows)]


def verdicts(rows: list[dict]) -> list[str]:
    """One sentence per method: does a rule widen the usable w, and does one lower the best dFD beyond the spread?"""
    out = []
    for m, label in _present(rows):
        mine = [r for r in rows if r["method"] == m]
        lin = next(r for r in mine if r["rule"] == "linear")
        width = (lambda r: (r["usable_range"][1] / r["usable_range"][0]) if r["usable_range"] else 0.0)
        wider = [r["rule"] for r in mine if r is not lin and width(r) > width(lin)]
        better = [r["rule"] for r in mine if r is not lin and r["dfd_linear"] is not None
                  and r["dfd_linear"][0] + r["dfd_linear"][1] < 0]
        worse = [r["rule"] for r in mine if r is not lin and r["dfd_linear"] is not None
                 and r["dfd_linear"][0] - r["dfd_linear"][1] > 0]
        out.append(f"{label}: usable w wider than linear's ({lin['usable_range']}) with "
                   f"{', '.join(wider) or 'no rule'}; best FD lower than linear's beyond the spread with "
                   f"{', '.join(better) or 'no rule'}" + (f"; higher beyond the spread with {', '.join(worse)}"
                                                          if worse else "") + ".")
    return out


def _pm(d: Optional[tuple], digits: int = 2) -> str:
    return "-" if d is None else f"{d[0]:+.{digits}f} +- {d[1]:.{digits}f}"


def render(rec: dict, lab: Lab) -> str:
    s = lab.s
    fd = lab.data.fd_name
    short = {"cfg": "CFG", "auto": "autoguidance", "insitu": "in-situ"}
    rule_names = {"linear": "linear", "rescale": "rescale", "apg": "APG", "cfg-zero": "CFG-Zero*"}
    methods = [short[m] for m, _ in _present(rec["rows"])]
    mtext = methods[0] if len(methods) == 1 else f"{', '.join(methods[:-1])} and {methods[-1]}"
    lines = [f"# Combination rules on {lab.data.noun}: {mtext} with "
             f"{', '.join(rule_names.get(k, k) for k in rec['rules'])}", "",
             f"N = {s.n} images per seed set, Heun {s.num_steps} steps; w in {rec['ws']} tuned on set {s.tune_set}, "
             f"mean +- std over held-out sets {list(s.eval_sets)}; guide EMA 0.{rec['guide_ema']}. dFD: FD minus "
             "the reference's FD on the same seeds (the unguided main, or the same method with the linear rule), "
             "mean +- std over the held-out sets; negative is better. Usable w: the tuning-set w whose dFD is within "
             "one spread (the held-out std of the best w's dFD) of the best. Recall gain: the largest recall above "
             "CFG's linear curve at matched precision over the w sweep (positive: outside CFG's curve). "
             f"Rules: {', '.join(r['rule_text'] for r in rec['rows'][:len(rec['rules'])])}.", "",
             f"| method | rule | best w | {fd} | dFD vs unguided | dFD vs linear | precision | recall | usable w "
             "(count) | recall gain over CFG |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        m, sd = r["mean"], r["std"]
        ur = r["usable_range"]
        gain = r["recall_gain_over_cfg"]
        lines.append(f"| {METHODS[r['method']]} | {r['rule_text']} | {r['best_w']:g} | {m['fd']:.2f} +- "
                     f"{sd['fd']:.2f} | {_pm(r['dfd_none'])} | "
                     f"{_pm(r['dfd_linear']) if r['rule'] != 'linear' else '(reference)'} | "
                     f"{m['precision']:.3f} +- {sd['precision']:.3f} | {m['recall']:.3f} +- {sd['recall']:.3f} | "
                     f"{ur[0]:g}-{ur[1]:g} ({len(r['usable_w'])}) | "
                     f"{'-' if gain is None else f'{gain:+.3f}'} |")
    lines += ["", "Verdicts (from the numbers above):", ""] + [f"- {v}" for v in rec["verdicts"]]
    lines += ["", f"Mains: {', '.join(rec['mains'])}. Figures: `{rec['experiment']}_pr.png` (precision-recall over w, "
              f"CFG's linear sweep as reference), `{rec['experiment']}_sweep.png` ({fd} against w)."]
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")


_STYLE = {"linear": ("k", "o"), "rescale": ("tab:blue", "s"), "apg": ("tab:red", "^"), "cfg-zero": ("tab:green", "D")}


def plot_pr(rows: list[dict], path: Path, noun: str) -> None:
    """Precision against recall over w, one panel per method, every rule a curve, CFG linear as the reference."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = sorted(((e["precision"], e["recall"], e["w"]) for e in
                  next(r for r in rows if r["key"] == "rules:cfg:linear")["sweep"]), key=lambda t: t[2])
    present = _present(rows)
    fig, axes = plt.subplots(1, len(present), figsize=(4.4 * len(present), 4), squeeze=False, sharex=True,
                             sharey=True)
    for ax, (m, label) in zip(axes[0], present):
        ax.plot([p for p, _, _ in ref], [r for _, r, _ in ref], color="0.6", lw=4, alpha=0.6, label="CFG linear "
                "(reference)")
        for r in (q for q in rows if q["method"] == m):
            col, mk = _STYLE[r["rule"]]
            pts = sorted(r["sweep"], key=lambda e: e["w"])
            ax.plot([e["precision"] for e in pts], [e["recall"] for e in pts], color=col, marker=mk, ms=4, lw=1,
                    label=r["rule_text"])
            for e in pts[:1] + pts[-1:]:
                ax.annotate(f"w {e['w']:g}", (e["precision"], e["recall"]), fontsize=6, color=col)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("precision")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("recall")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{noun}: precision-recall over w (tuning set); further up and right is better", fontsize=10)
    _save(fig, path)
    plt.close(fig)


def plot_sweep(rows: list[dict], path: Path, fd_name: str) -> None:
    """FD on the tuning set against w, one panel per method, a line per rule."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = _present(rows)
    fig, axes = plt.subplots(1, len(present), figsize=(4.4 * len(present), 3.6), squeeze=False)
    for ax, (m, label) in zip(axes[0], present):
        for r in (q for q in rows if q["method"] == m):
            col, mk = _STYLE[r["rule"]]
            pts = sorted(r["sweep"], key=lambda e: e["w"])
            ax.plot([e["w"] for e in pts], [e["fd"] for e in pts], color=col, marker=mk, ms=4, label=r["rule_text"])
        ax.set_xscale("log")
        ax.set_xlabel("w")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{fd_name} (tuning set)")
    axes[0][0].legend(fontsize=6)
    _save(fig, path)
    plt.close(fig)
