"""Without the main's run or data, which recipe recovers how much of autoguidance's gain, at what cost?

The study (`autoguidance guides study`, docs/guides.md), on MNIST 14x14 with the shipped S main (`s-T-ema050`, the
main the tables chose at N = 1000) and the tables' protocol (`experiments/image_tables.py`'s `Lab`: held-out seed sets,
w and the guide's EMA tuned on set 0, dFD at matched seeds with its spread, precision / recall):

- **Made guides**: every recipe of `autoguidance make-guide` at budgets of about 1%, 3% and 10% of the main's training
  FLOPs, data-free (on the main's own samples, Heun 12 steps, their cost inside the budget) and with the training
  images (`--data mnist14`): `distill` from a fresh net and from the main's sliced weights (the XS architecture of the
  shipped run, 12 of the main's 16 channels), `self-synthetic` (data-free by definition), `weight-decay`.
- **Beside them**: the trained XS guide at T/16 (`xs-T16-*`, 3.6% of the main's training FLOPs, the papers' recipe
  with the main's run and data), the main's own T/16 snapshot (through `make-guide --recipe snapshot`: free), in-situ
  dropout and CFG (the unconditional XS at T).
- **Cost at sampling**: each row's model FLOPs per sampling step against CFG's (two passes of the main):
  `(F_main + F_guide) / (2 F_main)` for autoguidance, counted by `FlopCounterMode`; wall-clock ratios in
  `benchmarks/bench_guides.py`.

Commands: `autoguidance guides train --out DIR` makes the guides (resumable: a rerun skips finished guides and
resumes the interrupted one); `autoguidance guides study --out DIR` makes what is missing, then evaluates (every
evaluation kept in the store, `DIR/.evaluations`); `--quick` runs the same code on a few images, steps and guides, for
CI (numbers not meaningful). Outputs: `guides_study.md`, `guides_study.json`, `guides_study.png`.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

from ..runs.files import write_json, write_text
from .image_tables import FULL, QUICK, Lab, _auto_grid, _b_auto, _b_cfg, _b_insitu, _b_none, _cfg_grid, _ws
from .image_tables_report import Row, paired_delta, row_json
from .image_sets import MNIST14

__all__ = ["lab_for", "study_md", "plot_study", "StudySettings", "FULL_STUDY", "QUICK_STUDY", "QUICK_LAB",
           "GuideSpec", "study_guides", "make_study_guides",
           "run_study", "MAIN", "QUESTION"]

QUESTION = ("Without the main's run or data, which recipe recovers how much of autoguidance's gain, at what cost?")
#: the main of the study: the tables' S main at the EMA they chose at N = 1000 (docs/mnist.md)
MAIN = "s-T-ema050"
#: the main's own T/16 snapshot, at both EMA lengths of its run (the snapshot recipe's guides)
SNAPSHOT, SNAPSHOT_EMAS = "s-T16", ("ema050", "ema150")


@dataclass(frozen=True)
class StudySettings:
    """What guides the study makes (the evaluation protocol is the tables' `Settings`)."""

    budgets:      tuple = (0.01, 0.03, 0.10)   # fractions of the main's training FLOPs
    steps:        Optional[int] = None         # instead of the budgets: a step count (quick mode)
    recipes:      tuple = (("distill", "fresh"), ("distill", "main"), ("self-synthetic", None),
                           ("weight-decay", None))
    data:         tuple = (None, "mnist14")    # data-free (the main's samples), the training images
    width:        float = 0.75                 # distill: 12 of the main's 16 channels, the shipped XS
    batch:        int = 64                     # the main's batch
    sample_steps: int = 12                     # data-free inputs: Heun steps (the tables' sampler)
    samples:      Optional[int] = None         # data-free pool (None: a quarter of the budget)
    weight_decay: float = 1.0                  # recipe weight-decay (its default)
    seed:         int = 0
    only:         Optional[tuple] = None       # the names of the made guides to keep (None: every one)


FULL_STUDY = StudySettings()
QUICK_STUDY = StudySettings(budgets=(0.01,), steps=2, recipes=(("distill", "fresh"), ("self-synthetic", None),
                                                               ("weight-decay", None)),
                            batch=8, sample_steps=2, samples=16)


#: the quick evaluation: 16 images per set, 2 Heun steps, one w, one EMA (CI: the code runs; numbers meaningless)
QUICK_LAB = replace(QUICK, n=16, num_steps=2, ws=(2.0,), emas=("050",), batch=16)


@dataclass(frozen=True)
class GuideSpec:
    name: str                                  # folder under OUT/guides
    recipe: str
    init: Optional[str]
    data: Optional[str]
    budget: float                              # fraction of the main's training FLOPs
    steps: Optional[int] = None                # or a step count (quick mode)

    @property
    def label(self) -> str:
        r = f"{self.recipe}{' (init ' + self.init + ')' if self.init else ''}"
        cost = f"{self.steps} steps" if self.steps is not None else f"{100 * self.budget:g}%"
        return f"{r}, {'training images' if self.data else 'data-free'}, {cost}"


def study_guides(st: StudySettings) -> list[GuideSpec]:
    """The made guides of the study, in table order."""
    out = []
    for recipe, init in st.recipes:
        for data in st.data:
            if recipe == "self-synthetic" and data is not None:
                continue                       # SIMS trains on the main's own samples only
            for b in st.budgets:
                name = f"{recipe}{'-' + init if init else ''}-{'data' if data else 'free'}-{round(b * 1000):03d}"
                out.append(GuideSpec(name, recipe, init, data, b, st.steps))
    if st.only is not None:
        unknown = sorted(set(st.only) - {g.name for g in out})
        if unknown:
            raise ValueError(f"unknown study guide(s) {', '.join(unknown)}; known: {', '.join(g.name for g in out)}")
        out = [g for g in out if g.name in st.only]
    return out


def make_study_guides(out, st: StudySettings = FULL_STUDY, weights=None, progress: bool = True) -> dict[str, dict]:
    """Make (or resume, or read back) every guide of the study under `out/guides`; returns their records by name."""
    from ..guidemaker import make_guide

    weights = Path(weights) if weights is not None else MNIST14.weights
    main = str(weights / MAIN)
    guides = Path(out) / "guides"
    records = {f"snapshot-{e}": make_guide(main, "snapshot", guides / f"snapshot-{e}",
                                           snapshot=str(weights / f"{SNAPSHOT}-{e}"), progress=False)
               for e in SNAPSHOT_EMAS}
    for g in study_guides(st):
        t = time.perf_counter()
        budget = dict(steps=st.steps) if st.steps is not None else dict(budget=g.budget)
        kw = dict(batch=st.batch, sample_steps=st.sample_steps, samples=st.samples, seed=st.seed, width=st.width,
                  data=g.data, progress=progress)
        if g.recipe == "distill":
            kw["init"] = g.init
        else:
            kw.pop("width")
        if g.recipe == "weight-decay":
            kw["weight_decay"] = st.weight_decay
        records[g.name] = make_guide(main, g.recipe, guides / g.name, **budget, **kw)
        if progress:
            print(f"  guide {g.name}: {records[g.name]['budget']['spent_flops']:.3g} FLOPs "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
    return records


# -- evaluation ------------------------------------------------------------------------------------------------------

def _ema_names(folder: Path, rec: dict, emas: tuple) -> list[str]:
    """The guide's checkpoints at the EMA lengths `emas` ('050', '150': relative std x 1000)."""
    from ..guidemaker import ema_folder

    return [str(ema_folder(folder, int(e) / 1000, rec)) for e in emas]


def _guide_emas(lab: Lab) -> tuple:
    return tuple(lab.s.guide_emas or lab.s.emas)


def _cost(f_main: float, f_guide: Optional[float], kind: str) -> float:
    """Model FLOPs per sampling step relative to CFG's two passes of the main."""
    if kind == "none":
        return 0.5
    if kind in ("cfg", "insitu"):
        return 1.0
    return (f_main + f_guide) / (2 * f_main)


def run_study(lab: Lab, out, st: StudySettings = FULL_STUDY, records: Optional[dict] = None) -> dict:
    """Evaluate the study's rows (making the guides first when `records` is None); writes the Markdown table, the
    JSON record and the figure into `out`; returns the record."""
    from ..guidemaker.mains import EDM2Main

    out = Path(out)
    records = records if records is not None else make_study_guides(out, st, lab.weights, lab.progress)
    f_main = float(EDM2Main(str(lab.weights / MAIN)).flops())   # per sample, batch 1
    W = _ws(lab)
    main = MAIN
    rows: list[Row] = []
    meta: dict[str, dict] = {}

    def add(key, label, build, grid, kind, f_guide=None, group="reference", **extra):
        rows.append(Row(key, label, lab.tune(key, build, grid), group=group))
        meta[key] = {"cost_vs_cfg": _cost(f_main, f_guide, kind), **extra}

    rows.append(Row("none", "S, no guidance", lab.heldout("none:s-T", _b_none, {"main": main}), group="reference",
                    lab_key="none:s-T"))
    meta["none"] = {"cost_vs_cfg": 0.5, "train_percent": 0.0}
    m = EDM2Main(str(lab.weights / MAIN))
    uncond, xs = EDM2Main(str(lab.weights / "xs-uncond-T-ema050")), EDM2Main(str(lab.weights / "xs-T16-ema050"))
    add("cfg", "CFG (unconditional XS at T)", _b_cfg, _cfg_grid(lab, main), "cfg",
        train_percent=100 * uncond.training_flops() / m.training_flops(), data="training images")
    add("auto", "autoguidance, trained XS at T/16 (the main's data)", _b_auto, _auto_grid(lab, main), "auto",
        float(xs.flops()), train_percent=100 * xs.training_flops() / m.training_flops(), data="training images")
    for g in study_guides(st):
        rec = records[g.name]
        folder = out / "guides" / g.name
        add(g.name, g.label, _b_auto, lab.grid(main=[main], guide=_ema_names(folder, rec, _guide_emas(lab)), w=W),
            "auto", float(rec["guide"]["flops_per_call"]), group="made",
            train_percent=100 * (rec["budget"].get("spent_fraction_of_main") or 0.0),
            data="training images" if g.data else "data-free", recipe=g.recipe, init=g.init, budget=g.budget)
    snap = records[f"snapshot-{SNAPSHOT_EMAS[0]}"]
    add("snapshot", "snapshot recipe: the main's own T/16 (free)", _b_auto,
        lab.grid(main=[main], guide=[str(out / "guides" / f"snapshot-ema{e}") for e in _guide_emas(lab)], w=W),
        "auto", f_main, train_percent=100 * snap["snapshot"]["fraction_of_main_run"], data="the main's run")
    add("insitu", "in-situ dropout p = 0.1", _b_insitu, lab.grid(main=[main], p=[0.1], w=W), "insitu",
        train_percent=0.0, data="-")
    order = ["none", "cfg", "auto", "snapshot", "insitu"]    # the table's order; the made guides were evaluated
    rows.sort(key=lambda r: order.index(r.key) if r.key in order else len(order))   # first (stable among them)
    base = rows[0].result
    auto_gain = paired_delta(next(r for r in rows if r.key == "auto").result, base)
    record = {"experiment": "guides_study", "question": QUESTION, "main": main, "settings": asdict(lab.s),
              "study": json.loads(json.dumps(asdict(st))), "rows": [],
              "seconds": round(time.perf_counter() - lab.t0, 1)}
    for r in rows:
        d = paired_delta(r.result, base) if r is not rows[0] else None
        rec = {**row_json(r), **meta[r.key], "dfd": d}
        if d is not None and auto_gain is not None and auto_gain[0] < 0:
            rec["share_of_autoguidance_gain"] = d[0] / auto_gain[0]
        record["rows"].append(rec)
    write_json(out / "guides_study.json", record)
    write_text(out / "guides_study.md", study_md(record))
    plot_study(record, out / "guides_study.png")
    return record


def _pm(m: Optional[dict], s: Optional[dict], k: str, digits: int = 3) -> str:
    if not m or m.get(k) is None:
        return "-"
    return f"{m[k]:.{digits}f} +- {s[k]:.{digits}f}"


def study_md(record: dict) -> str:
    s = record["settings"]
    lines = [f"# {record['question']}", "",
             f"MNIST 14x14, main {record['main']}; N = {s['n']} images per seed set, Heun {s['num_steps']} steps; "
             f"mean +- std over held-out seed sets {s['eval_sets']} (w and the guide's EMA tuned on set "
             f"{s['tune_set']}). dFD: FD_mnist minus the unguided main's on the same seeds (negative is better); "
             "'share of gain': dFD / the trained XS guide's dFD. Training: FLOPs spent making the guide, % of the "
             "main's training FLOPs (data-free inputs included). Sampling cost: model FLOPs per step against CFG's.",
             "", "| guide | data | training (% main) | best params | FD_mnist | dFD | share of gain | precision | "
             "recall | sampling cost vs CFG |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        params = {k: v for k, v in r["params"].items() if k != "main"}
        if "guide" in params:       # a made guide: its folder and EMA, not the whole path
            g = Path(params["guide"])
            params["guide"] = "/".join(g.parts[-2:]) if g.name.startswith("ema") else g.name
        d = r.get("dfd")
        tp = r.get("train_percent")
        share = r.get("share_of_autoguidance_gain")
        lines.append("| " + " | ".join([
            r["label"], r.get("data", "-"), "-" if tp is None else f"{tp:.2f}%",
            ", ".join(f"{k}={v}" for k, v in params.items()) or "-", _pm(r["mean"], r["std"], "fd", 2),
            f"{d[0]:+.2f} +- {d[1]:.2f}" if d else "(reference)", f"{share:.2f}" if share is not None else "-",
            _pm(r["mean"], r["std"], "precision"), _pm(r["mean"], r["std"], "recall"),
            f"{r['cost_vs_cfg']:.2f}"]) + " |")
    return "\n".join(lines) + "\n"


def plot_study(record: dict, path: Path) -> None:
    """dFD against the training budget, one line per recipe and data mode; the reference guides as horizontal
    lines (the trained XS guide at its 3.6%)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..runs.files import atomic_path

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    lines: dict[tuple, list] = {}
    for r in record["rows"]:
        if r.get("group") == "made" and r.get("dfd"):
            lines.setdefault((r["recipe"], r.get("init"), r["data"]), []).append((r["train_percent"], *r["dfd"]))
    for (recipe, init, data), pts in sorted(lines.items(), key=lambda kv: str(kv[0])):
        pts.sort()
        x, m, s = (np.array(v) for v in zip(*pts))
        ax.errorbar(x, m, yerr=s, marker="o" if data == "data-free" else "s", ms=4, capsize=2,
                    ls="-" if data == "data-free" else "--",
                    label=f"{recipe}{' (' + init + ')' if init else ''}, {data}")
    ax.set_xscale("log")
    refs = sorted((r for r in record["rows"] if r.get("group") == "reference" and r.get("dfd")),
                  key=lambda r: r["dfd"][0])
    for i, r in enumerate(refs):            # labelled beside the axes (x in axes units, y in dFD)
        ax.axhline(r["dfd"][0], color="k", lw=0.8, ls=":")
        ax.text(1.01, r["dfd"][0], f"{r['label']} ({r['dfd'][0]:+.2f})", transform=ax.get_yaxis_transform(),
                fontsize=6, va="top" if i % 2 == 0 else "bottom")
    ax.set_xlabel("training cost of the guide (% of the main's training FLOPs)")
    ax.set_ylabel("dFD_mnist vs no guidance (held-out, matched seeds)")
    ax.set_title(QUESTION, fontsize=8)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def lab_for(quick: bool, store=None, progress: bool = True, n: Optional[int] = None) -> Lab:
    """The tables' Lab on MNIST 14x14: N = 1000 per seed set as docs/mnist.md, the w grid that holds the MNIST tables'
    best w (1.1 - 1.5) and one guide EMA (0.150: the papers' guides want a longer EMA than the main), so that 23 guides
    fit one CPU's afternoon; or QUICK."""
    s = QUICK_LAB if quick else replace(FULL, n=1000, batch=300, ws=(1.1, 1.25, 1.5, 2.0), guide_emas=("150",))
    if n is not None:
        s = replace(s, n=n, batch=min(s.batch, n))
    return Lab(s, progress=progress, data=MNIST14, store=store)
