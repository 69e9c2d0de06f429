"""Outputs of the image-table experiments (digits, MNIST, Fashion-MNIST): result rows, Markdown tables, sweep and sample figures, training costs.

`autoguidance.experiments.image_tables` runs the experiments and hands its rows here; nothing in this module samples.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..runs.files import atomic_path

__all__ = ["Row", "row_json", "paired_delta", "table_md", "comparisons_md", "extra_md", "TABLE_PAIRS", "plot_pr", "verdict", "space_prefixes", "plot_sweeps", "plot_grids", "forward_flops",
           "training_costs", "costs_md", "extra_cols", "fmt_params"]


def fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())



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


def row_json(r: Row) -> dict:
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


#: the further feature spaces' names in the tables (prefix of their metrics -> name)
SPACE_NAMES = {"ssl": "ssl", "pix": "pixels"}


def space_prefixes(rows: list[Row]) -> list[str]:
    """The prefixes of the further feature spaces the rows were measured in ('ssl', 'pix'), in record order."""
    if not rows:
        return []
    keys = rows[0].result.get("mean", {})
    return [k[:-3] for k in keys if k.endswith("_fd")]


def _trend(d: Optional[tuple[float, float]]) -> int:
    """-1: lower (better) beyond one spread, +1: higher beyond one spread, 0: within it (or no pairing)."""
    if d is None:
        return 0
    return -1 if d[0] + d[1] < 0 else (1 if d[0] - d[1] > 0 else 0)


_WORDS = {-1: "better", 0: "tie", 1: "worse"}


def verdict(result: dict, ref: dict, prefixes=("", "ssl")) -> str:
    """A row against its reference in the two feature spaces (pixel space is reported, not voted): 'better (both)',
    'tie (both)', 'worse (both)' where the spaces agree beyond one spread, else what each says."""
    trends = [_trend(paired_delta(result, ref, f"{p}_fd" if p else "fd")) for p in prefixes]
    if len(set(trends)) == 1:
        return f"{_WORDS[trends[0]]} (both)"
    return ", ".join(f"{SPACE_NAMES.get(p, 'cls')} {_WORDS[t]}" for p, t in zip(prefixes, trends))


def table_md(rows: list[Row], title: str, note: str, s, extra_cols=(), fd_name: str = "FD_digits") -> str:
    """The Markdown table of an experiment (`s`: its `Settings`). Rows measured in further feature spaces get, per
    space, dFD, precision and recall columns, and a verdict over the two feature spaces."""
    spaces = space_prefixes(rows)
    space_head = [f"{c} {SPACE_NAMES.get(p, p)}" for p in spaces for c in ("dFD", "precision", "recall")]
    head = ["method", "best params", fd_name, "dFD (matched seeds)", "precision", "recall", "density",
            "coverage", "accuracy", *space_head, *(["verdict (cls, ssl)"] if "ssl" in spaces else []),
            *[c for c, _ in extra_cols], "ImageNet (papers)"]
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
        space_cells = []
        for p in spaces:
            ds = paired_delta(r.result, ref, f"{p}_fd") if ref is not None else None
            space_cells += [f"{ds[0]:+.3f} +- {ds[1]:.3f}" if ds is not None else f"({cell(f'{p}_fd', 3)})",
                            cell(f"{p}_precision"), cell(f"{p}_recall")]
        if "ssl" in spaces:
            space_cells.append(verdict(r.result, ref) if ref is not None else "-")
        lines.append("| " + " | ".join([r.label, fmt_params(params) or "-", cell("fd", 2), delta, cell("precision"),
                                        cell("recall"), cell("density"), cell("coverage"), cell("accuracy"),
                                        *space_cells, *[f(r) for _, f in extra_cols], r.paper]) + " |")
    lines += ["", f"Main checkpoints (EMA chosen by FD without guidance): {', '.join(sorted(mains - {'?'}))}."]
    if "ssl" in spaces:
        lines += ["", f"Verdict: against the row's reference at matched seeds, in {fd_name} and FD_ssl; 'better' / "
                  "'worse' where the mean dFD is beyond one spread (std over the held-out sets), 'tie' within it; "
                  "where the two feature spaces disagree, each is named. Pixel space is reported, not voted."]
    return "\n".join(lines) + "\n"


def comparisons_md(rows: list[Row], pairs: list[tuple[str, str]], fd_name: str) -> str:
    """Paired differences `a - b` at matched seeds (mean +- std over the held-out sets) of chosen row pairs, in every
    feature space: FD, precision and recall. Pairs whose rows are absent are left out."""
    by_key = {r.key: r for r in rows}
    spaces = [""] + space_prefixes(rows)
    names = {"": fd_name.split("_", 1)[-1], **SPACE_NAMES}
    head = ["a - b"] + [f"{m} {names.get(p, p)}" for p in spaces for m in ("dFD", "d precision", "d recall")]
    lines = ["", "Head to head at matched seeds (a - b; negative dFD: a is better):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a, b in pairs:
        if a not in by_key or b not in by_key:
            continue
        cells = []
        for p in spaces:
            for m, digits in (("fd", 3 if p else 2), ("precision", 3), ("recall", 3)):
                d = paired_delta(by_key[a].result, by_key[b].result, f"{p}_{m}" if p else m)
                cells.append(f"{d[0]:+.{digits}f} +- {d[1]:.{digits}f}" if d is not None else "-")
        lines.append(f"| {by_key[a].label} - {by_key[b].label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: the head-to-head pairs of a main table measured in several feature spaces
TABLE_PAIRS = [("auto", "cfg"), ("cfg", "none"), ("auto", "none"), ("cfg-interval", "cfg"), ("auto-S-T16", "auto"),
               ("auto-XS-T", "none"), ("insitu", "none"), ("insitu-dropout", "none-dropout"), ("tpg", "auto"),
               ("cfg+auto", "auto")]


def verdicts_md(rows: list[Row], fd_name: str, pairs=None) -> str:
    """One line per head-to-head pair of a main table measured in two feature spaces: the verdict over both (as
    `verdict`) and the paired dFD in every space, mean +- std over the held-out sets. Pairs whose rows are absent are
    left out."""
    by_key = {r.key: r for r in rows}
    spaces = [""] + space_prefixes(rows)
    names = {"": fd_name, **{p: f"FD_{n}" for p, n in SPACE_NAMES.items()}}
    lines = []
    for a, b in pairs if pairs is not None else TABLE_PAIRS:
        if a not in by_key or b not in by_key:
            continue
        ra, rb = by_key[a].result, by_key[b].result
        cells = []
        for p in spaces:
            d = paired_delta(ra, rb, f"{p}_fd" if p else "fd")
            if d is not None:
                cells.append(f"{names.get(p, p)} {d[0]:+.{3 if p else 2}f} +- {d[1]:.{3 if p else 2}f}")
        la, lb = (by_key[k].label.removeprefix("- ") for k in (a, b))
        lines.append(f"- **{la}** against **{lb}**: {verdict(ra, rb)} "
                     f"({'; '.join(cells)})")
    return "\n".join(lines) + "\n"


def extra_md(name: str, rows: list[Row], fd_name: str) -> str:
    """What follows an experiment's table: for a main table measured in several feature spaces, the head-to-head."""
    return comparisons_md(rows, TABLE_PAIRS, fd_name) if name == "table" and space_prefixes(rows) else ""


def plot_pr(rows: list[Row], path: Path, title: str, baseline: Callable[[Row], dict], reference: str = "cfg") -> None:
    """Precision against recall over each method's w grid (tuning set; the guide EMA of its best row), one panel per
    feature space, CFG's w sweep (row `reference`) drawn thick in every panel as the curve to beat; unguided rows
    (lab key 'none:...') as stars at `baseline(row)`, their tuning-set record. A method is better than CFG only
    where its curve lies outside CFG's (higher recall at matched precision)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spaces = [""] + space_prefixes(rows)
    fig, axes = plt.subplots(1, len(spaces), figsize=(5.2 * len(spaces), 4.6), squeeze=False)
    for ax, p in zip(axes[0], spaces):
        pk, rk = (f"{p}_precision", f"{p}_recall") if p else ("precision", "recall")
        for i, r in enumerate(rows):
            sweep = r.result.get("sweep")
            if not sweep or "w" not in sweep[-1]["params"]:
                if r.lab_key.startswith("none:"):
                    b = baseline(r)
                    ax.plot([b[rk]], [b[pk]], marker="*", ms=11, ls="none", color="k", label=r.label)
                continue
            best = {k: v for k, v in r.result["best"].items() if k != "w"}
            pts = sorted((e["params"]["w"], e[rk], e[pk]) for e in sweep
                         if {k: v for k, v in e["params"].items() if k != "w"} == best)
            style = dict(color="k", lw=2.5, zorder=5) if r.key == reference else dict(lw=1, ms=3)
            ax.plot([q[1] for q in pts], [q[2] for q in pts], marker="o", label=r.label, **style)
            if r.key == reference:
                for w, x, y in pts:
                    ax.annotate(f"{w:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"recall ({SPACE_NAMES.get(p, 'classifier')} features)")
        ax.set_ylabel(f"precision ({SPACE_NAMES.get(p, 'classifier')} features)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=5.5, loc="lower left")
    fig.suptitle(title, fontsize=9)
    _save_fig(fig, path)
    plt.close(fig)



def _save_fig(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")


def plot_sweeps(rows: list[Row], path: Path, title: str, tune_set: int,
                baseline: Callable[[Row], float], fd_name: str = "FD_digits") -> None:
    """FD_digits on the tuning set against w, one line per method (best over EMA lengths at each w); unguided
    rows (lab key 'none:...') as horizontal lines at `baseline(row)`, their tuning-set FD."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    hlines = []
    for i, r in enumerate(rows):
        sweep = r.result.get("sweep")
        if not sweep or "w" not in sweep[-1]["params"]:
            if r.lab_key.startswith("none:"):
                hlines.append((r.label, baseline(r)))
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
    ax.set_ylabel(f"{fd_name} (tuning seed set {tune_set})")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    _save_fig(fig, path)
    plt.close(fig)


def plot_grids(images: dict[str, torch.Tensor], rows: list[Row], path: Path) -> None:
    """Sample grids (`images[row.lab_key]`: the first 100 seeds of the first held-out set, classes 0..9 in
    columns), the same seeds everywhere."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(r, r.lab_key) for r in rows if r.lab_key in images]
    if not keys:
        return
    cols = min(4, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3 * cols, 3.3 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (r, k) in zip(axes.flat, keys):
        x = images[k][:100]
        m = len(x)
        side = int(math.ceil(math.sqrt(m)))
        h = x.shape[-1]                                 # image side; one pixel of background between images
        canvas = -np.ones((side * (h + 1), side * (h + 1)))
        for i in range(m):
            a, b = divmod(i, side)
            canvas[a * (h + 1):a * (h + 1) + h, b * (h + 1):b * (h + 1) + h] = x[i, 0].clamp(-1, 1).numpy()
        ax.imshow(canvas, cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(r.label if len(r.label) < 40 else r.label[:38] + "...", fontsize=7)
    _save_fig(fig, path)
    plt.close(fig)


def forward_flops(config: dict) -> int:
    """FLOPs of one forward pass of `EDM2Precond(**config)` on one image (the make-guide budget's counter)."""
    from ..guidemaker.budget import count_flops
    from ..nets.edm2 import EDM2Precond

    net = EDM2Precond(**config).eval()
    x = torch.zeros(1, config["img_channels"], config["img_resolution"], config["img_resolution"])
    labels = torch.zeros(1, config["label_dim"]) if config["label_dim"] else None
    return count_flops(lambda: net(x, torch.ones(1), labels))


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


def costs_md(costs: dict) -> str:
    if not costs:
        return ""
    lines = ["", "Training cost (wall-clock seconds on one CPU core, from each checkpoint's meta):", "",
             "| checkpoint | iteration | seconds | % of main (seconds) | % of main (FLOPs) |", "|---|---|---|---|---|"]
    for k, c in costs.items():
        lines.append(f"| {k} | {c['iteration']} | {c['train_seconds']:.0f} | {c['percent_of_main_seconds']:.1f}% | "
                     f"{c['percent_of_main_flops']:.2f}% |")
    return "\n".join(lines) + "\n"


def _guide_cols():
    def alone(metric, digits):
        def f(r):
            a = r.result.get("guide_alone")
            return f"{a['mean'][metric]:.{digits}f} +- {a['std'][metric]:.{digits}f}" if a else "-"
        return f
    return [("guide alone: FD", alone("fd", 2)), ("guide alone: accuracy", alone("accuracy", 3))]


def extra_cols(name: str):
    return {"degradations": _deg_cols, "guides": _guide_cols}.get(name, lambda: ())()


def _deg_cols():
    def alone(which):
        def f(r):
            a = r.result.get(which)
            return f"{a['mean']['fd']:.2f} +- {a['std']['fd']:.2f}" if a else "-"
        return f
    return [("FD D_good alone", alone("good_alone")), ("FD D_bad alone", alone("bad_alone"))]

