"""Choosing a guide without sampling: proxies that need no sampling loop, against the measured sample quality.

For a guide, `Delta = D_good - D_bad` (here `D_2 - D_1`: the guided denoiser at w = 2 minus the main alone, which
is the same thing in this library's convention `D_bad + w (D_good - D_bad)`). At each noise level sigma of the
sampler's grid:

- on data: x = x0 + sigma n with real x0; `E[Delta . (x0 - D_good)]` estimates `E[Delta . (D_true - D_good)]`
  without bias, since E[x0 | x] = D_true(x). The MSE of `D_good + (w - 1) Delta` against x0 is minimal at
  `w*(sigma) = 1 + E[Delta . (x0 - D_good)] / E[|Delta|^2]`, and the correlation
  `c(sigma) = E[Delta . e] / sqrt(E|Delta|^2 E|e|^2)`, e = x0 - D_good, says how much of the main's error the guide
  direction can remove (c^2 of it, at w*).
- on the model's own sampling trajectories (toy only, where D_true is exact: `autoguidance.toy.mixture`): the same
  with e = D_true(x) - D_good(x) at the points x of the main's unguided Heun trajectories.
- the guide's loss gap: `log(E|D_bad - x0|^2 / E|D_good - x0|^2)` on data.
- the profile of |Delta| over sigma: its size relative to the main's error, and its |Delta|^2-weighted mean log sigma.

Each proxy is summarised by the mean over the sampler's levels (one sampler step per level). The pre-registered
test (PREDICTS): Spearman rank correlation, with the direction fixed in advance (DIRECTIONS), of the proxy with the
measured quality of the guides (toy: outlier rate + branch-mass TV at the tuned w, minus the unguided main's; digits:
held-out dFD at the tuned w) at least THRESHOLD on both the toy and the digits. The study itself (which guides,
which records) is `free_guides.run_proxies`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..rng import noise_context
from ..runs.files import atomic_path

__all__ = ["level_stats", "trajectory_stats", "summarize_levels", "spearman", "correlations", "guided_delta",
           "prev_step_delta", "format_proxies", "write_wstar_figure", "PROXIES", "DIRECTIONS", "THRESHOLD"]

THRESHOLD = 0.7
#: proxy -> (description, +1 if a larger value should mean a better guide, -1 if a smaller one)
PROXIES = {
    "data_corr":     ("on-data correlation of Delta with the main's error, c(sigma) averaged", +1),
    "data_removed":  ("on-data share of the main's MSE removable at w*(sigma), sign(c) c^2 averaged", +1),
    "data_corr_exact": ("the same on data with the exact error D_true - D_good instead of x0 - D_good (toy only)", +1),
    "traj_corr":     ("the same correlation on the main's own trajectories, exact D_true (toy only)", +1),
    "loss_gap":      ("the guide's loss gap on data, log(loss_bad / loss_good) averaged", -1),
    "delta_size":    ("‖Delta‖ relative to the main's error on data, averaged", -1),
    "delta_logsig":  ("‖Delta‖²-weighted mean log sigma (where the guide differs)", +1),
}
DIRECTIONS = {k: v[1] for k, v in PROXIES.items()}


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() * b.double()).flatten(1).sum(1).mean())


def _one_level(Dg: torch.Tensor, delta: torch.Tensor, err: torch.Tensor, x0: Optional[torch.Tensor]) -> dict:
    dd, de, ee = _dot(delta, delta), _dot(delta, err), _dot(err, err)
    out = {"dd": dd, "de": de, "ee": ee,
           "corr": de / math.sqrt(dd * ee) if dd > 0 and ee > 0 else 0.0,
           "w_star": 1 + de / dd if dd > 0 else float("nan")}
    if x0 is not None:
        bad = Dg - delta
        lg, lb = _dot(x0 - Dg, x0 - Dg), _dot(x0 - bad, x0 - bad)
        out.update(loss_good=lg, loss_bad=lb)
    return out


def level_stats(delta_fn: Callable, x0: torch.Tensor, sigmas, labels=None, seed: int = 0,
                target: Optional[Callable] = None) -> list[dict]:
    """On data: for each sigma, `x = x0 + sigma n` (n from `seed`), `(D_good, Delta) = delta_fn(x, sigma, labels,
    i)`; the error is `x0 - D_good`, or `target(x, sigma) - D_good` when `target` (an exact D_true) is given."""
    rows = []
    g = torch.Generator().manual_seed(seed)
    noise = [torch.randn(x0.shape, generator=g) for _ in sigmas]
    for i, s in enumerate(sigmas):
        s = float(s)
        x = x0 + s * noise[i]
        with torch.no_grad():
            Dg, delta = delta_fn(x, s, labels, i)
            err = (target(x, s) if target is not None else x0) - Dg
        rows.append({"sigma": s, **_one_level(Dg, delta, err, x0)})
    return rows


def trajectory_stats(main: Callable, delta_fn: Callable, target: Callable, x_start: torch.Tensor, sigmas,
                     labels=None) -> list[dict]:
    """On the main's own unguided Heun trajectories (first-order states at each level of `sigmas`, the grid with
    its final 0): the exact error `target(x, sigma) - D_good(x)` (D_true known, the toy)."""
    from ..sampling import sample_heun

    states = []
    seeds = torch.arange(len(x_start), dtype=torch.int64)
    cb = lambda d: states.append((float(d["sigma_next"]), d["x"].clone()))
    with torch.no_grad():
        sample_heun(main, x_start.clone(), sigmas, labels=labels, seeds=seeds, callback=cb, progress=False)
    pts = [(float(sigmas[0]), x_start.clone())] + [st for st in states if st[0] > 0]
    rows = []
    for i, (s, x) in enumerate(pts):
        with torch.no_grad():
            Dg, delta = delta_fn(x, s, labels, i, trajectory=pts)
            err = target(x, s) - Dg
        rows.append({"sigma": s, **_one_level(Dg, delta, err, None)})
    return rows


def summarize_levels(data: list[dict], traj: Optional[list[dict]] = None) -> dict:
    """The scalar proxies of one guide (means over the levels)."""
    c = np.array([r["corr"] for r in data])
    gap = np.array([math.log(r["loss_bad"] / r["loss_good"]) for r in data if r["loss_good"] > 0 and r["loss_bad"] > 0])
    size = np.array([math.sqrt(r["dd"] / r["ee"]) if r["ee"] > 0 else 0.0 for r in data])
    dd = np.array([r["dd"] for r in data])
    logs = np.log(np.array([r["sigma"] for r in data]))
    out = {"data_corr": float(c.mean()), "data_removed": float((np.sign(c) * c * c).mean()),
           "loss_gap": float(gap.mean()), "delta_size": float(size.mean()),
           "delta_logsig": float((dd * logs).sum() / dd.sum()) if dd.sum() > 0 else float("nan")}
    if traj is not None:
        out["traj_corr"] = float(np.mean([r["corr"] for r in traj]))
    return out


def _ranks(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(len(v), dtype=float)
    for val in np.unique(v):   # ties: mean rank
        m = v == val
        r[m] = r[m].mean()
    return r


def spearman(a, b) -> float:
    """Spearman rank correlation (Pearson correlation of the ranks, ties at their mean rank)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


# -- deltas of the candidates -----------------------------------------------------------------------------------

def guided_delta(make: Callable[[float], Callable], seed_base: int = 0) -> Callable:
    """`delta_fn` of a guide given as `make(w) -> guided denoiser`: `(D_1(x), D_2(x) - D_1(x))`, random perturbations
    keyed by image index and level (the sampler's noise context)."""
    D1, D2 = make(1.0), make(2.0)

    def fn(x, s, labels, i, trajectory=None):
        n = len(x)
        sig = torch.full((n,), s, dtype=x.dtype)
        seeds = seed_base + torch.arange(n, dtype=torch.int64)
        with noise_context(seeds, 2 * i):
            g = D1(x, sig, labels)
            d2 = D2(x, sig, labels)
        return g, d2 - g
    return fn


def prev_step_delta(net: Callable, sigmas, seed: int = 1) -> Callable:
    """SG-prev's Delta. On data: the bad prediction is the net at the previous (noisier) level of the grid, on `x`
    moved there by fresh noise; on a trajectory: the net at the trajectory's previous state. No previous level: 0."""
    grid = [float(s) for s in sigmas]

    def fn(x, s, labels, i, trajectory=None):
        n = len(x)
        g = net(x, torch.full((n,), s, dtype=x.dtype), labels)
        if i == 0:
            return g, torch.zeros_like(g)
        if trajectory is not None:
            sp, xp = trajectory[i - 1]
        else:
            sp = grid[i - 1]
            gen = torch.Generator().manual_seed(seed * 7919 + i)
            xp = x + math.sqrt(max(sp * sp - s * s, 0.0)) * torch.randn(x.shape, generator=gen)
        bad = net(xp, torch.full((n,), sp, dtype=x.dtype), labels)
        return g, g - bad
    return fn


def correlations(rows: list[dict]) -> dict:
    """Per set and proxy: the Spearman correlation of `direction * proxy` with `-quality` (1 = the proxy ranks the
    guides exactly as sampling does)."""
    out = {}
    for s in sorted({r["set"] for r in rows}):
        rs = [r for r in rows if r["set"] == s]
        out[s] = {}
        for k, d in DIRECTIONS.items():
            vals = [r["proxies"].get(k, r.get(k)) for r in rs]
            if any(v is None or not math.isfinite(v) for v in vals):
                continue
            out[s][k] = {"spearman": spearman([d * v for v in vals], [-r["quality"] for r in rs]), "n": len(rs)}
    return out


# -- report ---------------------------------------------------------------------------------------------------------

def format_proxies(record: dict, figure: str = "proxies_wstar.png") -> str:
    s = record["settings"]
    corr = record["correlations"]
    sets = sorted(corr)
    lines = ["## Choosing a guide without sampling: proxies against measured quality", "",
             f"Generated by `autoguidance free-guides proxies --doc docs/free_guides.md` (toy and digits: about 6 min "
             f"on one thread; `--only toy` or `--only digits` redoes one set, the last run took {s['seconds']:.0f} s). Every guide of the toy and digits head-to-heads (tuned rows, no unguided rows) is measured at "
             "each level of its sampler's sigma grid (toy: 32 Heun levels, 1024 points; digits: 12 levels, 256 "
             "training images, 64 for weight noise): Delta = D(w = 2) - D(w = 1) = D_good - D_bad. "
             "Quality: toy = outlier rate + branch-mass TV at the tuned w minus the unguided main's (held-out seeds); "
             "digits = held-out dFD at the tuned w. Both lower = better. Pre-registered test: a proxy *predicts* if "
             f"the Spearman rank correlation of (direction x proxy) with -quality is >= {s['threshold']} on both sets "
             "(directions fixed before measuring, from the theory: a larger correlation with the main's error, a "
             "smaller loss gap, a smaller Delta, a Delta concentrated at higher sigma should mean a better guide).",
             "", "| proxy | direction | " + " | ".join(f"Spearman, {x} (n)" for x in sets) + " | predicts? |",
             "|---|---|" + "---|" * len(sets) + "---|"]
    for k, (desc, d) in PROXIES.items():
        cells = [f"{corr[x][k]['spearman']:+.2f} ({corr[x][k]['n']})" if k in corr[x] else "n/a" for x in sets]
        yes = "**yes**" if k in record["predicts"] else "no"
        lines.append(f"| `{k}`: {desc} | {'higher' if d > 0 else 'lower'} better | " + " | ".join(cells) + f" | {yes} |")
    lines += ["", "Verdict: " + (f"{', '.join(record['predicts'])} predict(s) the ranking on both sets: "
                                 "`autoguidance calibrate` ships it." if record["predicts"] else
                                 f"no proxy reaches {s['threshold']} on both sets: none is shipped as a calibrator "
                                 "(negative result; the numbers below)."), ""]
    lines += ["| set | guide | quality (lower better) | tuned w | data_corr | data_corr_exact | traj_corr | loss_gap | "
              "delta_size | delta_logsig | median w*(sigma) on data |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(record["rows"], key=lambda r: (r["set"], r["quality"])):
        p = r["proxies"]
        ws = [x["w_star"] for x in r["levels"] if math.isfinite(x["w_star"])]
        tc = f"{p['traj_corr']:+.3f}" if "traj_corr" in p else "n/a"
        ex = p.get("data_corr_exact", r.get("data_corr_exact"))
        ex = f"{ex:+.3f}" if ex is not None else "n/a"
        tw = "" if r.get("tuned_w") is None else f"{r['tuned_w']:g}"
        lines.append(f"| {r['set']} | {r['label']} | {r['quality']:+.4f} | {tw} | {p['data_corr']:+.3f} | {ex} | {tc} | "
                     f"{p['loss_gap']:+.3f} | {p['delta_size']:.3f} | {p['delta_logsig']:+.2f} | "
                     f"{np.median(ws) if ws else float('nan'):.2f} |")
    lines += ["", f"![w*(sigma) on data, per guide]({figure})", ""]
    return "\n".join(lines) + "\n"


def write_wstar_figure(record: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({r["set"] for r in record["rows"]})
    fig, axes = plt.subplots(2, max(1, len(sets)), figsize=(6.5 * max(1, len(sets)), 8), squeeze=False)
    for j, s in enumerate(sets):
        for r in [r for r in record["rows"] if r["set"] == s]:
            sig = [x["sigma"] for x in r["levels"]]
            axes[0][j].plot(sig, [x["w_star"] for x in r["levels"]], marker=".", label=r["key"], lw=1)
            axes[1][j].plot(sig, [x["corr"] for x in r["levels"]], marker=".", label=r["key"], lw=1)
        axes[0][j].set_ylabel("w*(sigma) = 1 + E[Delta.(x0 - D_good)] / E|Delta|^2")
        axes[0][j].axhline(1, color="gray", lw=0.8)
        axes[0][j].set_ylim(-3, 5)
        axes[1][j].set_ylabel("corr(Delta, x0 - D_good)")
        axes[1][j].axhline(0, color="gray", lw=0.8)
        for ax in axes[:, j]:
            ax.set_xscale("log")
            ax.set_xlabel("sigma")
            ax.grid(alpha=0.3)
            ax.set_title(f"{s}: on data")
        axes[0][j].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
