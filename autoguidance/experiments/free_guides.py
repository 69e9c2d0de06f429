"""`autoguidance free-guides toy`: every free guide that applies to an MLP, head to head on the exact 2D toy.

For both network families (log-density MLP, EDM denoiser MLP; the shipped dropout-free mains) every method runs
at a small grid of w; w is tuned on seed 0 (lowest outlier rate + branch-mass TV), and the tuned w is reported on
held-out seeds 1 and 2 (mean +- std). Cost per sample is measured in the same run: the guided and the unguided
sampler timed alternately, `rounds` times, the median of the ratios. Then the toy-claim search: in-situ dropout at
small p and w on late dropout sites of the dropout-trained mains, on the held-out seeds.

SEG, TPG and SWG need attention, tokens or an image grid: the toy MLPs have none, so they are not in the toy table.

`autoguidance free-guides digits`: the same head-to-head on the digits EDM2-style U-Net (the digits Lab's protocol,
experiments/image_tables.py), every free guide that applies to it beside CFG and trained-guide autoguidance, cost per
sample timed in the same run. `free-guides proxies`: sampling-free proxies (estimators in proxies.py) against the
measured quality of the toy and digits guides. `free-guides schedules`: constant w vs an interval vs w(sigma) and
p(sigma) ramps vs the proxies' w*(sigma), for the best free guides. Each part writes its JSON and Markdown to --out
and re-assembles --doc (docs/free_guides.md) from every part's JSON found there.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..checkpoint import load
from ..guidance import autoguidance, cfg, insitu, no_guidance, perturbation_guidance
from ..guides import PreviousStepGuidance
from ..metrics.toy import summarize, toy_metrics
from ..perturb import Dropout, InputNoise, NoisierLevel, WeightNoise
from ..runs.files import atomic_path, write_json, write_text
from ..sampling import sample_heun, sigmas_karras
from .proxies import (DIRECTIONS, THRESHOLD, correlations, format_proxies, guided_delta, level_stats,
                      prev_step_delta, summarize_levels, trajectory_stats, write_wstar_figure)
from .toy_demo import SIGMA_MAX, _start_points

__all__ = ["FreeGuide", "free_guide_methods", "run_free_guides", "format_report", "write_doc", "DigitsGuide",
           "digits_guides", "run_free_guides_digits", "run_free_guides_schedules", "run_proxies", "assemble_doc"]

W_GRID = (1.25, 1.5, 2.0, 3.0)
W_GRID_CFG = (1.5, 2.0, 3.0, 4.0)
SEARCH_P = (0.01, 0.02, 0.05, 0.1)
SEARCH_W = (1.25, 1.5, 2.0, 3.0)
TV_SLACK = 0.02   # "branch-mass TV not much worse": at most this much above unguided


@dataclass(frozen=True)
class FreeGuide:
    key: str
    label: str
    build: Callable       # (models, family, w) -> denoiser
    grid: tuple
    passes: int
    n_cap: Optional[int] = None   # fewer points per seed (weight noise costs ~100x per sample on the toy)


def free_guide_methods() -> list[FreeGuide]:
    M = lambda models, fam, name: models(f"{fam}-{name}")
    return [
        FreeGuide("none", "no guidance", lambda m, f, w: no_guidance(M(m, f, "main")), (1.0,), 1),
        FreeGuide("cfg", "CFG (uncond net)", lambda m, f, w: cfg(M(m, f, "main"), w, uncond=M(m, f, "uncond")),
                  W_GRID_CFG, 2),
        FreeGuide("autoguidance", "autoguidance (trained guide)",
                  lambda m, f, w: autoguidance(M(m, f, "main"), M(m, f, "guide"), w), W_GRID, 2),
        FreeGuide("dropout", "in-situ dropout p=0.1",
                  lambda m, f, w: insitu(M(m, f, "main"), w, 0.1), W_GRID, 2),
        FreeGuide("inputnoise", "input noise k=0.2",
                  lambda m, f, w: perturbation_guidance(M(m, f, "main"), w, InputNoise(0.2)), W_GRID, 2),
        FreeGuide("weightnoise", "weight noise std=0.1",
                  lambda m, f, w: perturbation_guidance(M(m, f, "main"), w, WeightNoise(0.1)), W_GRID, 2, 128),
        FreeGuide("selfguidance", "self-guidance k=0.2",
                  lambda m, f, w: perturbation_guidance(M(m, f, "main"), w, NoisierLevel(0.2)), W_GRID, 2),
        FreeGuide("sg-prev", "SG-prev (previous step)",
                  lambda m, f, w: PreviousStepGuidance(M(m, f, "main"), w), W_GRID, 1),
    ]


def beats(m: dict, base: dict) -> bool:
    """Concentration without dropping branches: the outlier rate lower than `base`'s by more than the seed spread
    (the larger of the two stds), and branch-mass TV at most TV_SLACK above `base`'s (held-out means)."""
    gap = base["outlier_rate"]["mean"] - m["outlier_rate"]["mean"]
    return (gap > max(base["outlier_rate"]["std"], m["outlier_rate"]["std"])
            and m["coverage_tv"]["mean"] <= base["coverage_tv"]["mean"] + TV_SLACK)


def _late_dropout_sites(net: torch.nn.Module, count: int = 2) -> list[str]:
    paths = [n for n, mod in net.named_modules() if isinstance(mod, torch.nn.Dropout)]
    return paths[-count:]


def run_free_guides(out="docs/results/free_guides", n: int = 1024, tune_seed: int = 0, eval_seeds=(1, 2),
                    num_steps: int = 32, rounds: int = 3, families=("logp", "denoiser"), search: bool = True,
                    progress: bool = False, log: Callable = print, doc=None) -> dict:
    torch.set_num_threads(1)
    cache: dict = {}

    def models(name):
        if name not in cache:
            cache[name] = load(f"toy-{name}")
        return cache[name]

    sigmas = sigmas_karras(num_steps, 0.002, SIGMA_MAX, 7.0)
    seeds = [tune_seed, *eval_seeds]
    starts = {s: _start_points(n, s) for s in seeds}

    def sample(D, s, m=None):
        m = n if m is None else min(n, m)
        if hasattr(D, "reset"):
            D.reset()
        return sample_heun(D, starts[s][:m].clone(), sigmas, seeds=torch.arange(m, dtype=torch.int64) + s * n,
                           progress=progress)

    def metrics(D, s, m=None):
        return toy_metrics(sample(D, s, m))

    score = lambda m: m["outlier_rate"] + m["coverage_tv"]
    rows, samples, t_start = [], {}, time.perf_counter()
    torch.set_grad_enabled(False)
    try:
        for fam in families:
            for g in free_guide_methods():
                tune = {w: metrics(g.build(models, fam, w), tune_seed, g.n_cap) for w in g.grid}
                w_best = min(g.grid, key=lambda w: score(tune[w]))
                D = g.build(models, fam, w_best)
                per_seed, xs = [], []
                for s in eval_seeds:
                    x = sample(D, s, g.n_cap)
                    xs.append(x)
                    per_seed.append(toy_metrics(x))
                samples[f"{fam}/{g.key}"] = torch.cat(xs).numpy()
                same_n = None
                if g.n_cap and g.n_cap < n:   # the unguided main at the same number of points (TV grows at small n)
                    base_d = no_guidance(models(f"{fam}-main"))
                    same_n = summarize([metrics(base_d, s, g.n_cap) for s in eval_seeds])
                rows.append({"family": fam, "method": g.key, "label": g.label + (f" ({g.n_cap} points/seed)" if g.n_cap else ""),
                             "n": min(n, g.n_cap or n), "passes": g.passes, "w": w_best,
                             "tune": {str(w): tune[w] for w in g.grid}, "metrics": summarize(per_seed),
                             "per_seed": per_seed, "unguided_same_n": same_n})
                log(f"{fam:9s} {g.key:13s} w={w_best:<4g} outliers {rows[-1]['metrics']['outlier_rate']['mean']:.4f} "
                    f"TV {rows[-1]['metrics']['coverage_tv']['mean']:.4f}")
            # cost: guided vs unguided, interleaved, median of the per-round ratios
            base = no_guidance(models(f"{fam}-main"))
            for r in rows:
                if r["family"] != fam:
                    continue
                g = next(m for m in free_guide_methods() if m.key == r["method"])
                D = g.build(models, fam, r["w"])
                ratios, secs = [], []
                for _ in range(rounds):
                    m = r["n"]
                    t0 = time.perf_counter(); sample(base, tune_seed, m); t1 = time.perf_counter()
                    sample(D, tune_seed, m); t2 = time.perf_counter()
                    ratios.append((t2 - t1) / (t1 - t0))
                    secs.append((t2 - t1) / m)
                r["cost"] = {"ratio": statistics.median(ratios), "ratios": ratios,
                             "us_per_sample": 1e6 * statistics.median(secs)}
        search_rows = _search(models, families, eval_seeds, sample, log) if search else []
    finally:
        torch.set_grad_enabled(True)
    record = {"settings": {"n_per_seed": n, "tune_seed": tune_seed, "eval_seeds": list(eval_seeds),
                           "num_steps": num_steps, "sigma_min": 0.002, "sigma_max": SIGMA_MAX, "sampler": "heun",
                           "rounds": rounds, "tune_score": "outlier_rate + coverage_tv on the tune seed",
                           "search_p": list(SEARCH_P), "search_w": list(SEARCH_W), "tv_slack": TV_SLACK,
                           "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t_start, 1)},
              "rows": rows, "search": search_rows}
    _write(Path(out), record, samples)
    if doc is not None:
        assemble_doc(Path(out), Path(doc))
    return record


def _search(models, families, eval_seeds, sample, log) -> list[dict]:
    out = []
    for fam in families:
        net = models(f"{fam}-main-dropout")
        sites = _late_dropout_sites(net)
        base = [toy_metrics(sample(no_guidance(net), s)) for s in eval_seeds]
        out.append({"family": fam, "p": 0.0, "w": 1.0, "sites": sites, "metrics": summarize(base), "holds": None})
        b = summarize(base)
        for p in SEARCH_P:
            for w in SEARCH_W:
                D = perturbation_guidance(net, w, Dropout(p, sites))
                ms = summarize([toy_metrics(sample(D, s)) for s in eval_seeds])
                holds = beats(ms, b)
                out.append({"family": fam, "p": p, "w": w, "sites": sites, "metrics": ms, "holds": holds})
        log(f"search {fam}: holds in {sum(bool(r['holds']) for r in out if r['family'] == fam)} of "
            f"{len(SEARCH_P) * len(SEARCH_W)} cells")
    return out


# -- report --------------------------------------------------------------------------------------------------------

def _ms(m, k, f="{:.4f}"):
    return (f + " ± " + f).format(m[k]["mean"], m[k]["std"])


def format_table(record: dict) -> str:
    lines = ["| family | method | passes | w (tuned on seed 0) | outlier rate (lower) | branch-mass TV (lower) | "
             "mean log p | sliced W2 | cost (guided / unguided time) | µs per sample |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        m = r["metrics"]
        lines.append(f"| {r['family']} | {r['label']} | {r['passes']} | {r['w']:g} | {_ms(m, 'outlier_rate')} | "
                     f"{_ms(m, 'coverage_tv')} | {_ms(m, 'mean_logp', '{:.2f}')} | {_ms(m, 'sliced_w2')} | "
                     f"{r['cost']['ratio']:.2f}x | {r['cost']['us_per_sample']:.0f} |")
    return "\n".join(lines) + "\n"


def format_tune(record: dict) -> str:
    """Every w of the grid on the tuning seed: outlier rate / branch-mass TV."""
    ws = sorted({float(w) for r in record["rows"] for w in r["tune"]})
    lines = ["| family | method | " + " | ".join(f"w {w:g}" for w in ws) + " |", "|---|---|" + "---|" * len(ws)]
    for r in record["rows"]:
        cells = [(f"{r['tune'][k]['outlier_rate']:.3f} / {r['tune'][k]['coverage_tv']:.3f}"
                  if (k := next((t for t in r["tune"] if float(t) == w), None)) else "") for w in ws]
        lines.append(f"| {r['family']} | {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_search(record: dict) -> str:
    lines = ["| family | p | w | outlier rate | branch-mass TV | holds? |", "|---|---|---|---|---|---|"]
    for r in record["search"]:
        m = r["metrics"]
        h = "unguided" if r["holds"] is None else ("**yes**" if r["holds"] else "no")
        lines.append(f"| {r['family']}-main-dropout | {r['p']:g} | {r['w']:g} | {_ms(m, 'outlier_rate')} | "
                     f"{_ms(m, 'coverage_tv')} | {h} |")
    return "\n".join(lines) + "\n"


def _verdicts(record: dict) -> list[str]:
    out = []
    for fam in sorted({r["family"] for r in record["rows"]}, key=["logp", "denoiser"].index):
        rs = {r["method"]: r for r in record["rows"] if r["family"] == fam}
        none = rs["none"]["metrics"]
        o0, tv0 = none["outlier_rate"]["mean"], none["coverage_tv"]["mean"]
        better = [k for k, r in rs.items() if k != "none" and beats(r["metrics"], r.get("unguided_same_n") or none)]
        desc = ", ".join(f"{rs[k]['label']} (w {rs[k]['w']:g}: outliers {rs[k]['metrics']['outlier_rate']['mean']:.3f}, "
                         f"TV {rs[k]['metrics']['coverage_tv']['mean']:.3f}, {rs[k]['cost']['ratio']:.2f}x)"
                         for k in better) or "none"
        out.append(f"- **{fam}**: unguided outliers {o0:.3f}, TV {tv0:.3f}. Outliers lower by more than the seed "
                   f"spread with branch-mass TV at most {TV_SLACK} worse: {desc}.")
        worse, neutral = [], []
        for k, r in rs.items():
            if k == "none" or k in better:
                continue
            b, m = r.get("unguided_same_n") or none, r["metrics"]
            spread = max(b["outlier_rate"]["std"], m["outlier_rate"]["std"])
            tag = (f"{r['label']} w {r['w']:g}: {m['outlier_rate']['mean']:.3f} / {m['coverage_tv']['mean']:.3f}, "
                   f"{r['cost']['ratio']:.2f}x")
            bad = (m["outlier_rate"]["mean"] - b["outlier_rate"]["mean"] > spread
                   or m["coverage_tv"]["mean"] > b["coverage_tv"]["mean"] + TV_SLACK)
            (worse if bad else neutral).append(tag)
        out.append(f"  Within the seed spread of unguided (outliers / TV, cost): {'; '.join(neutral) or 'none'}. "
                   f"Worse: {'; '.join(worse) or 'none'}.")
    for fam in sorted({r["family"] for r in record["search"]}, key=["logp", "denoiser"].index):
        cells = [r for r in record["search"] if r["family"] == fam and r["holds"] is not None]
        hold = [f"p {r['p']:g} w {r['w']:g} ({r['metrics']['outlier_rate']['mean']:.3f} / "
                f"{r['metrics']['coverage_tv']['mean']:.3f})" for r in cells if r["holds"]]
        base = next(r for r in record["search"] if r["family"] == fam and r["holds"] is None)["metrics"]
        out.append(f"- **toy claim, {fam}-main-dropout** (unguided {base['outlier_rate']['mean']:.3f} / "
                   f"{base['coverage_tv']['mean']:.3f}): holds in {len(hold)} of {len(cells)} cells"
                   + (": " + ", ".join(hold) if hold else "") + ".")
    return out


USAGE = """## The free guides in this library

Every guide below is built from the main network alone (no second model, no training), in this library's weight
convention `D_bad + w (D_good - D_bad)`:

```python
import autoguidance as ag
from autoguidance.perturb import SmoothedAttention, TokenShuffle, NoisierLevel
from autoguidance.guides import PreviousStepGuidance, SlidingWindow

D = ag.perturbation_guidance(net, 2.0, SmoothedAttention(s=10.0))          # SEG: queries blurred, width s tokens
D = ag.perturbation_guidance(net, 2.0, TokenShuffle(where="unet.enc.*_block?"))  # TPG: the encoder blocks' tokens shuffled
D = ag.perturbation_guidance(net, 2.0, NoisierLevel(0.2))                  # self-guidance: D(x; 1.2 sigma)
D = PreviousStepGuidance(net, 2.0)                                         # SG-prev: no extra pass, per-image state
D = ag.autoguidance(net, SlidingWindow(net, window=16, stride=8), 2.0)     # SWG: the net on stitched crops
D = ag.autoguidance(net, ag.load("digits-s-T16-ema050"), 1.25)             # same-run guide: an earlier snapshot
```

- **SEG** (`SmoothedAttention`, `--perturbation seg --p S`): exact dense Gaussian blur of the queries over the token
  grid (separable, rows normalised over existing tokens, no padding); `s = 0` is the exact pass, `s = inf` the mean
  query. Sites: `EDM2Attention` (square grid) and `nn.MultiheadAttention` (one token axis); diffusers' `Attention`
  needs a rule in the diffusers adapter (not written: adapters/ is another room).
- **TPG** (`TokenShuffle`, `--perturbation tokenshuffle --where ...`): a permutation per image and denoiser call,
  drawn from the row keys (image seed, call, site), so batch composition does not matter; exact rows untouched.
- **Self-guidance** (`NoisierLevel(k)`, `--perturbation noisierlevel --p K`): the net evaluated on the same `x` but
  told the level `(1 + k) sigma` (`renoise=True` also adds the missing noise, which is `InputNoise(k)`).
- **SG-prev** (`PreviousStepGuidance`): the bad prediction is the image's own prediction at the previous, noisier
  sampler level. It cannot be a pass of `Guided` (every pass there sees the same x and sigma), so it wraps the
  denoiser; state is keyed by image seed from the sampler's noise context (batch-size independent), cleared by
  `reset()` or automatically when an image's level goes up (a new run).
- **SWG** (`SlidingWindow`): the same net on overlapping crops, stitched by averaging; one window covering the image
  is the exact pass. Needs images (not the toy); the net must accept the crop size (the digits EDM2 nets do not:
  they take 8x8 inputs only, so SWG is not in the digits table).
- **Same-run guide**: plain autoguidance with a checkpoint of the main's own run (an earlier snapshot or a shorter
  EMA): `--method autoguidance --gnet <snapshot>`. The digits S run ships its T/16 snapshot (`digits-s-T16-ema050`,
  `-ema150`, same command and seed as the main `digits-s-T-*`); guiding the main with it is the README's "reduce
  training only, S at T/16" row (w 1.25: dFD -2.48 ± 1.38 at N = 300, docs/digits.md). The toy ships no snapshot:
  `toy-*-guide` is a separate, smaller run, so the toy table has no same-run row.
"""


def format_report(record: dict, figure: str = "free_guides_pareto.png") -> str:
    s = record["settings"]
    return "\n".join([
        "# Free guides, head to head on the exact 2D toy",
        "",
        "Generated by `autoguidance free-guides toy --out docs/results/free_guides --doc docs/free_guides.md` "
        f"({s['seconds']} s, {s['threads']} thread). Class A, {s['n_per_seed']} points per seed (the demo: 2048), "
        f"EDM Heun {s['num_steps']} steps, sigma in [{s['sigma_min']}, {s['sigma_max']}]; w tuned on seed "
        f"{s['tune_seed']} by the lowest outlier rate + branch-mass TV, reported on held-out seeds {s['eval_seeds']} "
        "as mean ± std. Cost: guided and unguided sampling of the same points timed alternately, "
        f"{s['rounds']} rounds, median ratio (one thread, a shared machine: ±10% noise).",
        "",
        f"![quality against cost]({figure})",
        "",
        format_table(record),
        *[f"Rows with fewer points compare with the unguided main at the same number of points ({r['family']}, "
          f"{r['n']} points: outliers {r['unguided_same_n']['outlier_rate']['mean']:.4f} ± "
          f"{r['unguided_same_n']['outlier_rate']['std']:.4f}, TV {r['unguided_same_n']['coverage_tv']['mean']:.4f} ± "
          f"{r['unguided_same_n']['coverage_tv']['std']:.4f}); branch-mass TV grows as the points thin out."
          for r in record["rows"] if r.get("unguided_same_n")],
        "",
        "## Verdicts",
        "",
        *_verdicts(record),
        "",
        "## Every w on the tuning seed (outlier rate / branch-mass TV)",
        "",
        f"Seed {s['tune_seed']}; the tuned w minimises their sum. Guidance trades branch mass for concentration as w "
        "grows, so this sum prefers small w; read the trade-off here.",
        "",
        format_tune(record),
        "",
        "## The toy-claim search: in-situ dropout at small p and w",
        "",
        f"Dropout-trained mains, dropout only at the last two dropout sites ({', '.join(record['search'][0]['sites']) if record['search'] else ''} "
        "for the first family), held-out seeds. *Holds* = outlier rate below unguided by more than the seed spread "
        f"(the larger std) and branch-mass TV at most {s['tv_slack']} above unguided (2 held-out seeds: a crude spread).",
        "",
        format_search(record) if record["search"] else "(not run)",
        "",
        USAGE,
    ]) + "\n"


def write_doc(record: dict, out: Path, doc: Path) -> None:
    """The report at `doc` (e.g. docs/free_guides.md), its figure linked relative to it."""
    import os

    doc = Path(doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    write_text(doc, format_report(record, os.path.relpath(Path(out) / "free_guides_pareto.png", doc.parent)))


def _write(out: Path, record: dict, samples: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "free_guides.json", record)
    write_text(out / "free_guides.md", format_report(record))
    with atomic_path(out / "free_guides_samples.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **samples)
    write_figure(record, out / "free_guides_pareto.png")


def write_figure(record: dict, path: Path) -> None:
    """Quality (outlier rate, branch-mass TV) against cost (log axis), one column per family."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = sorted({r["family"] for r in record["rows"]}, key=["logp", "denoiser"].index)
    fig, axes = plt.subplots(2, len(fams), figsize=(5.2 * len(fams), 7.5), squeeze=False)
    marks = dict(zip([g.key for g in free_guide_methods()], "o^sDvP*X"))
    for j, fam in enumerate(fams):
        for i, (k, name) in enumerate((("outlier_rate", "outlier rate"), ("coverage_tv", "branch-mass TV"))):
            ax = axes[i][j]
            for r in record["rows"]:
                if r["family"] != fam:
                    continue
                m = r["metrics"][k]
                ax.errorbar(r["cost"]["ratio"], m["mean"], yerr=m["std"], marker=marks.get(r["method"], "o"),
                            linestyle="", label=f"{r['label']} (w {r['w']:g})")
            ax.set_xscale("log")
            ax.set_xlabel("cost: guided / unguided wall time per sample (log)")
            ax.set_ylabel(f"{name} (lower better)")
            ax.set_title(f"{fam} family")
            ax.grid(alpha=0.3)
            if i == 0:
                ax.legend(fontsize=6.5)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# == digits: the head-to-head on the EDM2-style U-Net ================================================================
#
# The digits Lab's protocol (experiments/image_tables.py): w tuned on seed set 0 by FD_digits, reported on the held-out
# sets (mean +- std), dFD against the unguided main of the same group at matched seeds, precision / recall (k = 3).

WN_N, WN_WS = 100, (1.25, 1.5, 2.0)      # weight noise: 22x the unguided cost per sample, so fewer images and w


def _strength(p: dict):
    """A perturbation strength: a number, or `Ramp(strength, 0)` over `p['pramp'] = [sigma_from, sigma_to]`
    (strength at high sigma, none at low sigma), or its reverse `p['pramp_up']` (none at high sigma)."""
    from ..schedules import Ramp

    s = p["strength"]
    if "pramp" in p:
        return Ramp(s, 0.0, sigma_from=p["pramp"][0], sigma_to=p["pramp"][1])
    if "pramp_up" in p:
        return Ramp(0.0, s, sigma_from=p["pramp_up"][0], sigma_to=p["pramp_up"][1])
    return s


def digits_perturbation(p: dict, net: torch.nn.Module):
    """The free guide's perturbation of a digits row (`p['kind']`, `p['strength']`) on the U-Net `net` (TPG and
    skip-layer act on its lowest-resolution blocks, as the image tables build them: `digits._perturbation`)."""
    from ..perturb import BlockDrop, IdentityAttention, SmoothedAttention
    from .image_tables import _perturbation

    kind, s = p["kind"], _strength(p)
    if kind in ("tpg", "skiplayer"):     # built where the image tables build them (no strength)
        return _perturbation(kind, s, net)
    if kind == "dropout":
        return Dropout(s)
    if kind == "blockdrop":
        return BlockDrop(s)
    if kind == "inputnoise":
        return InputNoise(s)
    if kind == "weightnoise":
        return WeightNoise(s)
    if kind == "pag":
        return IdentityAttention(s)
    if kind == "seg":
        return SmoothedAttention(s)
    if kind == "selfguidance":
        return NoisierLevel(s)
    raise ValueError(f"unknown digits free guide {kind!r}")


def _dw(p: dict):
    from .image_tables import _w

    if "wstar" in p:       # a tabulated w(sigma) (the proxy study's MSE-optimal profile)
        from ..guides import Tabulated

        return Tabulated(p["wstar"][0], p["wstar"][1])
    return _w(p)


def _b_free(L, p):
    net = L.net(p["main"])
    return perturbation_guidance(net, _dw(p), digits_perturbation(p, net))


def _b_sgprev(L, p):
    return PreviousStepGuidance(L.net(p["main"]), _dw(p))


def _b_trained(L, p):
    return autoguidance(L.net(p["main"]), L.net(p["guide"]), _dw(p))


def _b_cfgx(L, p):
    return cfg(L.net(p["main"]), _dw(p), uncond=L.net(p["guide"]))


@dataclass(frozen=True)
class DigitsGuide:
    key: str
    label: str
    build: Callable
    base: dict            # params besides main and w
    main: str = "s-T"     # main prefix: 's-T' (trained without dropout) or 's-dropout-T'
    passes: int = 2
    kind: str = "free"    # 'free', 'trained' (a second net), 'none'
    note: str = ""
    guides: tuple = ()    # guide nets to tune over (EMA lengths)


def digits_guides() -> list[DigitsGuide]:
    """Every row of the digits head-to-head (the order of the table)."""
    return [
        DigitsGuide("none", "S, no guidance", None, {}, passes=1, kind="none"),
        DigitsGuide("cfg", "CFG (uncond. XS at T)", _b_cfgx, {"guide": "xs-uncond-T-ema050"}, kind="trained",
                    note="the digits table's guide EMA"),
        DigitsGuide("auto", "autoguidance (XS at T/16, trained guide)", _b_trained, {"guide": "xs-T16-ema150"},
                    kind="trained", note="the digits table's guide EMA"),
        DigitsGuide("same-run", "same-run guide: the main's own T/16 snapshot", _b_trained, {},
                    guides=("s-T16-ema050", "s-T16-ema150"), note="guide EMA tuned too"),
        DigitsGuide("insitu", "in-situ dropout p = 0.1", _b_free, {"kind": "dropout", "strength": 0.1}),
        DigitsGuide("blockdrop", "block drop p = 0.1 (skip path)", _b_free, {"kind": "blockdrop", "strength": 0.1}),
        DigitsGuide("inputnoise", "input noise k = 0.2", _b_free, {"kind": "inputnoise", "strength": 0.2}),
        DigitsGuide("pag", "PAG: identity attention (every attention layer)", _b_free,
                    {"kind": "pag", "strength": 1.0}),
        DigitsGuide("seg", "SEG: queries blurred, s = 10 tokens", _b_free, {"kind": "seg", "strength": 10.0}),
        DigitsGuide("tpg", "TPG: tokens shuffled after the encoder's 4x4 blocks", _b_free,
                    {"kind": "tpg", "strength": 1.0}),
        DigitsGuide("skiplayer", "skip-layer: the 2 bottleneck blocks return their input", _b_free,
                    {"kind": "skiplayer", "strength": 1.0},
                    note="SkipLayers(blocks='unet.dec', layers=['4x4_in0', '4x4_in1'])"),
        DigitsGuide("selfguidance", "self-guidance: told 1.2 sigma", _b_free, {"kind": "selfguidance", "strength": 0.2}),
        DigitsGuide("sg-prev", "SG-prev: the previous step's prediction", _b_sgprev, {}, passes=1),
        DigitsGuide("none-dropout", "S trained with dropout 0.1, no guidance", None, {}, main="s-dropout-T", passes=1,
                    kind="none"),
        DigitsGuide("insitu-dropout", "in-situ dropout p = 0.1 (main trained with dropout)", _b_free,
                    {"kind": "dropout", "strength": 0.1}, main="s-dropout-T"),
        DigitsGuide("weightnoise", f"weight noise std = 0.1 ({WN_N} images per set)", _b_free,
                    {"kind": "weightnoise", "strength": 0.1}),
    ]


_DMETRICS = ("fd", "precision", "recall", "accuracy")


def _stats(vals) -> dict:
    vals = [float(v) for v in vals]
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}


def _row_record(g: DigitsGuide, res: dict, base: dict, main: str, n: int) -> dict:
    """A row of the digits record: held-out metrics, dFD at matched seeds against the unguided `base`."""
    runs = res["runs"]
    return {"key": g.key, "label": g.label, "kind": g.kind, "passes": g.passes, "main": main, "n": n,
            "note": g.note, "params": res["params"],
            "sweep": [{"params": s["params"], "fd": s["fd"]} for s in res.get("sweep", [])],
            **{m: _stats([r[m] for r in runs]) for m in _DMETRICS},
            "dfd": _stats([r["fd"] - b["fd"] for r, b in zip(runs, base["runs"])]),
            "runs": [{m: r[m] for m in _DMETRICS} for r in runs]}


def _time_cost(lab, build, params, n: int, rounds: int, seed_set: int = 9) -> dict:
    """Guided and unguided sampling of the same `n` images (seed set `seed_set`, unused by the metrics), timed
    alternately; the median of the per-round ratios."""
    from ..sampling import generate
    from .image_tables import _b_none

    seeds = seed_set * 1_000_000 + torch.arange(n, dtype=torch.int64)
    labels = torch.nn.functional.one_hot(seeds % 10, 10).float()

    def run(D):
        t = time.perf_counter()
        with torch.no_grad():
            generate(D, seeds, list(lab.data.shape), labels=labels, num_steps=lab.s.num_steps, batch=n, progress=False)
        return time.perf_counter() - t

    base = _b_none(lab, {"main": params["main"]})
    ratios, secs = [], []
    for _ in range(rounds):
        t0 = run(base)
        t1 = run(build(lab, params))
        ratios.append(t1 / t0)
        secs.append(t1 / n)
    return {"ratio": statistics.median(ratios), "ratios": ratios, "us_per_sample": 1e6 * statistics.median(secs),
            "n": n, "rounds": rounds}


def run_free_guides_digits(out="docs/results/free_guides", quick: bool = False, doc=None, only=None,
                           time_n: int = 64, rounds: int = 3, log: Callable = print, lab=None) -> dict:
    """The digits head-to-head: every free guide that applies to the EDM2 U-Net, beside CFG and trained-guide
    autoguidance, on the digits Lab's protocol; cost per sample timed in the same run. Writes
    `free_guides_digits.json/.md` and the Pareto figure to `out` after every row (a partial run leaves tables)."""
    from dataclasses import asdict, replace
    from .image_tables import FULL, QUICK, Lab, _b_none, choose_main

    torch.set_num_threads(1)
    settings = QUICK if quick else FULL
    lab = lab or Lab(settings, progress=True)
    out = Path(out)
    t0 = time.perf_counter()
    W = [float(w) for w in lab.s.ws]
    if quick:
        time_n, rounds = 8, 1
    mains, bases, rows = {}, {}, []
    record = {"settings": {**asdict(lab.s), "time_n": time_n, "rounds": rounds, "threads": torch.get_num_threads(),
                           "quick": quick, "weightnoise_n": WN_N, "weightnoise_ws": list(WN_WS)}, "rows": rows}
    small = None
    for g in digits_guides():
        if only and g.key not in only and g.kind != "none":
            continue
        if g.main not in mains:
            mains[g.main], _ = choose_main(lab, g.main)
        main = mains[g.main]
        L = lab
        if g.key == "weightnoise":   # a smaller Lab (fewer images and w), compared with the unguided main at its N
            if small is None:
                n_small = min(WN_N, lab.s.n)
                small = Lab(replace(lab.s, n=n_small, batch=n_small, ws=WN_WS if not quick else lab.s.ws),
                            lab.weights, lab.features_path, progress=lab.progress, data=lab.data, store=lab.store)
                small._nets = lab._nets
            L = small
        bkey = (g.main, L.s.n)
        if bkey not in bases:
            bases[bkey] = L.heldout(f"none:{g.main}", _b_none, {"main": main})
        t = time.perf_counter()
        if g.kind == "none":
            res = bases[bkey]
            cost = {"ratio": 1.0, "ratios": [1.0], "us_per_sample": None, "n": 0, "rounds": 0}
        else:
            guides = [{"guide": q} for q in g.guides] or [{}]
            grid = [dict(g.base, main=main, **q, w=w) for q in guides for w in (L.s.ws if L is small else W)]
            res = L.tune(g.key, g.build, grid)
            cost = _time_cost(L, g.build, res["params"], time_n if g.key != "weightnoise" else max(8, time_n // 4),
                              rounds if g.key != "weightnoise" else 1)
        row = _row_record(g, res, bases[bkey], main, L.s.n)
        row["cost"] = cost
        row["seconds"] = round(time.perf_counter() - t, 1)
        if L is small:
            row["unguided_same_n"] = {m: _stats([r[m] for r in bases[bkey]["runs"]]) for m in _DMETRICS}
        rows.append(row)
        log(f"[{time.perf_counter() - t0:6.0f}s] {g.key:15s} w={row['params'].get('w', 1):<5g} "
            f"FD {row['fd']['mean']:.2f} dFD {row['dfd']['mean']:+.2f} ± {row['dfd']['std']:.2f} "
            f"cost {cost['ratio']:.2f}x")
        record["settings"]["seconds"] = round(time.perf_counter() - t0, 1)
        _write_digits(out, record, doc)
    return record


def _write_digits(out: Path, record: dict, doc=None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "free_guides_digits.json", record)
    write_text(out / "free_guides_digits.md", format_digits(record))
    write_digits_figure(record, out / "free_guides_digits_pareto.png")
    if doc is not None:
        assemble_doc(out, doc)


def _pm(s: dict, f: str = "{:.2f}") -> str:
    return f.format(s["mean"]) + " ± " + f.replace("+", "").format(s["std"])


def _params_text(p: dict) -> str:
    bits = [f"w {p['w']:g}"] if "w" in p else []
    if "guide" in p:
        bits.append(p["guide"])
    return ", ".join(bits)


def format_digits_table(record: dict) -> str:
    lines = ["| method | main | passes | tuned (set 0) | FD_digits | dFD vs its unguided main | precision | recall | "
             "class accuracy | cost (guided / unguided) | µs per image |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        dfd = "" if r["kind"] == "none" else _pm(r["dfd"], "{:+.2f}")
        us = "" if r["cost"]["us_per_sample"] is None else f"{r['cost']['us_per_sample']:.0f}"
        lines.append(f"| {r['label']} | {r['main']} | {r['passes']} | {_params_text(r['params'])} | {_pm(r['fd'])} | "
                     f"{dfd} | {_pm(r['precision'], '{:.3f}')} | {_pm(r['recall'], '{:.3f}')} | "
                     f"{_pm(r['accuracy'], '{:.3f}')} | {r['cost']['ratio']:.2f}x | {us} |")
    return "\n".join(lines) + "\n"


def format_digits_sweep(record: dict) -> str:
    ws = sorted({float(s["params"]["w"]) for r in record["rows"] for s in r["sweep"] if "w" in s["params"]})
    lines = ["| method | " + " | ".join(f"w {w:g}" for w in ws) + " |", "|---|" + "---|" * len(ws)]
    for r in record["rows"]:
        if not r["sweep"]:
            continue
        best = {}
        for s in r["sweep"]:   # several guides: the best FD at each w
            w = float(s["params"]["w"])
            best[w] = min(best.get(w, math.inf), s["fd"])
        lines.append(f"| {r['label']} | " + " | ".join(f"{best[w]:.2f}" if w in best else "" for w in ws) + " |")
    return "\n".join(lines) + "\n"


def digits_verdicts(record: dict) -> list[str]:
    out = []
    rows = [r for r in record["rows"] if r["kind"] != "none"]
    beat = [r for r in rows if -r["dfd"]["mean"] > r["dfd"]["std"]]
    worse = [r for r in rows if r["dfd"]["mean"] > r["dfd"]["std"]]
    tag = lambda r: f"{r['label']} ({_pm(r['dfd'], '{:+.2f}')}, {r['cost']['ratio']:.2f}x)"
    out.append("- Better than the unguided main by more than the spread of dFD over the held-out sets: "
               + ("; ".join(tag(r) for r in sorted(beat, key=lambda r: r['dfd']['mean'])) or "none") + ".")
    rest = [r for r in rows if r not in beat and r not in worse]
    out.append("- Within the spread: " + ("; ".join(tag(r) for r in sorted(rest, key=lambda r: r['dfd']['mean']))
                                           or "none") + ".")
    out.append("- Worse by more than the spread: " + ("; ".join(tag(r) for r in worse) or "none") + ".")
    return out


def format_digits(record: dict, figure: str = "free_guides_digits_pareto.png") -> str:
    s = record["settings"]
    return "\n".join([
        "## Digits: every free guide on the EDM2-style U-Net, beside CFG and trained-guide autoguidance",
        "",
        f"Generated by `autoguidance free-guides digits --doc docs/free_guides.md` ({s.get('seconds', 0):.0f} s, "
        f"{s['threads']} thread{'s' if s['threads'] != 1 else ''}{', QUICK settings' if s['quick'] else ''}). "
        f"The digits Lab's protocol (docs/digits.md): S main (EMA chosen without guidance on set 0), EDM Heun "
        f"{s['num_steps']} steps, {s['n']} images per seed set, w in {list(s['ws'])} tuned on seed set "
        f"{s['tune_set']} by FD_digits, reported on held-out sets {list(s['eval_sets'])} as mean ± std; dFD = FD minus "
        "the unguided main's FD on the same seeds (per set, then mean ± std). Cost: guided and unguided sampling of "
        f"the same {s['time_n']} images timed alternately, {s['rounds']} rounds, median ratio (one thread on a "
        "shared machine: ±10% noise). Weight noise costs ~20x per image, so its row uses "
        f"{s['weightnoise_n']} images per set and w in {s['weightnoise_ws']}, and its dFD is against the unguided "
        "main at that N.",
        "",
        f"![FD_digits against cost]({figure})",
        "",
        format_digits_table(record),
        "",
        *digits_verdicts(record),
        "",
        "FD_digits at every w on the tuning set (several guide EMAs: the best at each w):",
        "",
        format_digits_sweep(record),
    ]) + "\n"


def write_digits_figure(record: dict, path: Path) -> None:
    """dFD (matched seeds, mean ± std over held-out sets) against cost, log axis; recall beside it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    colors = {"none": "black", "trained": "tab:red", "free": "tab:blue"}
    for r in record["rows"]:
        x = r["cost"]["ratio"]
        for ax, (m, e) in zip(axes, ((r["dfd"]["mean"], r["dfd"]["std"]),
                                     (r["recall"]["mean"], r["recall"]["std"]))):
            if r["kind"] == "none" and ax is axes[0]:
                continue
            ax.errorbar(x, m, yerr=e, marker="o" if r["kind"] != "trained" else "s", color=colors[r["kind"]],
                        linestyle="", alpha=0.8)
            ax.annotate(r["key"], (x, m), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].axhline(0, color="gray", lw=0.8)
    axes[0].set_ylabel("dFD_digits vs the unguided main (lower better)")
    axes[1].set_ylabel("recall (higher: more variety)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("cost: guided / unguided wall time per image (log)")
        ax.grid(alpha=0.3)
    axes[0].set_title("quality against cost (blue: no extra training, red: a separately trained net)")
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# == the assembled document ===========================================================================================

def assemble_doc(out, doc) -> None:
    """docs/free_guides.md from the parts' JSON records in `out` (each part's command rewrites it): digits
    head-to-head, schedules, proxies, the toy head-to-head, the usage notes."""
    import json
    import os

    out, doc = Path(out), Path(doc)
    rel = lambda name: os.path.relpath(out / name, doc.parent)
    load_ = lambda name: json.loads((out / name).read_text()) if (out / name).exists() else None
    parts = ["# Free guides, head to head: the field's zero-cost guidance methods on identical models", ""]
    summary = out / "free_guides_summary.md"
    if summary.exists():
        parts += [summary.read_text(), ""]
    if (d := load_("free_guides_digits.json")) is not None:
        parts += [format_digits(d, rel("free_guides_digits_pareto.png")), ""]
    if (s := load_("free_guides_schedules.json")) is not None:
        parts += [format_schedules(s), ""]
    if (p := load_("proxies.json")) is not None:
        parts += [format_proxies(p, rel("proxies_wstar.png")), ""]
    if (t := load_("free_guides.json")) is not None:
        toy = format_report(t, rel("free_guides_pareto.png"))
        toy = toy.replace("# Free guides, head to head on the exact 2D toy", "## The exact 2D toy", 1)
        toy = toy.split("## The free guides in this library")[0]
        parts += [toy.replace("\n## ", "\n### ").replace("\n### The exact 2D toy", "\n## The exact 2D toy"), ""]
    parts += [USAGE]
    doc.parent.mkdir(parents=True, exist_ok=True)
    write_text(doc, "\n".join(parts) + "\n")



# == schedules: constant w vs an interval vs ramps, for the best free guides =========================================

SCHED_INTERVAL = (0.28, 2.9)     # Kynkaanniemi et al.'s interval (as the digits schedule study)
SCHED_RAMP = (10.0, 0.1)         # w (or the strength) at sigma >= 10, down to 1 (or 0) at sigma <= 0.1
WSTAR_CLIP = (1.0, 4.0)          # the proxy study's w*(sigma), clipped to this range
#: the guides whose strength can follow sigma, and the strength key of digits_perturbation
_HAS_STRENGTH = {"insitu", "insitu-dropout", "blockdrop", "inputnoise", "pag", "seg", "skiplayer", "selfguidance",
                 "weightnoise"}


def schedule_variants(key: str, wstar=None) -> list[tuple[str, str, dict, bool]]:
    """`(schedule key, label, extra params, tune w?)` of one guide's schedule study."""
    lo, hi = SCHED_INTERVAL
    out = [("interval", f"w only for sigma in ({lo:g}, {hi:g}]", {"interval": [lo, hi]}, True),
           ("w-ramp", f"w(sigma): w at sigma >= {SCHED_RAMP[0]:g} down to 1 at <= {SCHED_RAMP[1]:g}",
            {"ramp": list(SCHED_RAMP)}, True)]
    if key in _HAS_STRENGTH:
        out += [("p-ramp", f"p(sigma): full strength at sigma >= {SCHED_RAMP[0]:g}, none at <= {SCHED_RAMP[1]:g}",
                 {"pramp": list(SCHED_RAMP)}, True),
                ("p-ramp-up", f"p(sigma) reversed: none at sigma >= {SCHED_RAMP[0]:g}, full at <= {SCHED_RAMP[1]:g}",
                 {"pramp_up": list(SCHED_RAMP)}, True)]
    if wstar is not None:
        out.append(("w-star", f"w*(sigma) of the proxy study (on-data MSE-optimal, clipped to {list(WSTAR_CLIP)}), "
                    "not tuned", {"wstar": wstar}, False))
    return out


def _wstar_profile(proxies: Optional[dict], key: str):
    if proxies is None:
        return None
    r = next((r for r in proxies["rows"] if r["set"] == "digits" and r["key"] == key), None)
    if r is None:
        return None
    lv = [x for x in r["levels"] if math.isfinite(x["w_star"])]
    return [[x["sigma"] for x in lv], [min(max(x["w_star"], WSTAR_CLIP[0]), WSTAR_CLIP[1]) for x in lv]]


def run_free_guides_schedules(out="docs/results/free_guides", quick: bool = False, doc=None, only=None, top: int = 3,
                              log: Callable = print, lab=None) -> dict:
    """For the `top` free guides of the digits head-to-head (by held-out dFD) and trained-guide autoguidance:
    constant w (the head-to-head's row) vs an interval vs a w(sigma) ramp vs a p(sigma) ramp (both directions) vs
    the proxy study's w*(sigma); each tuned on set 0 (w grid: the peak w), reported on the held-out sets."""
    import json
    from dataclasses import asdict
    from .image_tables import FULL, QUICK, Lab, _b_none

    torch.set_num_threads(1)
    out = Path(out)
    head = json.loads((out / "free_guides_digits.json").read_text())
    proxies = json.loads((out / "proxies.json").read_text()) if (out / "proxies.json").exists() else None
    lab = lab or Lab(QUICK if quick else FULL, progress=True)
    if lab.s.n != head["settings"]["n"] or lab.s.num_steps != head["settings"]["num_steps"]:
        raise ValueError("the schedule study needs the head-to-head run with the same settings (quick or not)")
    W = [float(w) for w in lab.s.ws]
    rows_by = {r["key"]: r for r in head["rows"]}
    free = sorted([r for r in head["rows"] if r["kind"] == "free" and r["key"] != "weightnoise"],
                  key=lambda r: r["dfd"]["mean"])
    picked = [r["key"] for r in free[:top]]
    if only:
        picked = [k for k in only if k in rows_by and rows_by[k]["kind"] != "none"]
    elif "auto" in rows_by:
        picked.append("auto")
    t0 = time.perf_counter()
    guides = {g.key: g for g in digits_guides()}
    rows, bases = [], {}
    if only and (out / "free_guides_schedules.json").exists():   # keep the other guides' rows of an earlier run
        prev = json.loads((out / "free_guides_schedules.json").read_text())
        rows += [r for r in prev["rows"] if r["key"] not in picked]
        picked = [k for k in prev["settings"]["picked"] if k not in picked] + picked
    record = {"settings": {**asdict(lab.s), "interval": list(SCHED_INTERVAL), "ramp": list(SCHED_RAMP),
                           "wstar_clip": list(WSTAR_CLIP), "picked": picked, "quick": quick,
                           "threads": torch.get_num_threads(),
                           "auto_dfd": rows_by["auto"]["dfd"] if "auto" in rows_by else None}, "rows": rows}
    for key in [k for k in picked if k not in {r["key"] for r in rows}]:
        h, g = rows_by[key], guides[key]
        main = h["params"]["main"]
        if main not in bases:
            bases[main] = lab.heldout(f"none:{g.main}", _b_none, {"main": main})
        base_params = {k: v for k, v in h["params"].items() if k != "w"}
        rows.append({"key": key, "label": h["label"], "schedule": "constant", "sched_label": "constant w (head-to-head)",
                     "params": h["params"], **{m: h[m] for m in ("fd", "dfd", "precision", "recall", "accuracy")},
                     "sweep": h["sweep"]})
        for skey, slabel, extra, tune in schedule_variants(key, _wstar_profile(proxies, key)):
            t = time.perf_counter()
            if tune:
                res = lab.tune(f"sched:{key}:{skey}", g.build, [dict(base_params, **extra, w=w) for w in W])
            else:
                res = lab.heldout(f"sched:{key}:{skey}", g.build, dict(base_params, **extra))
            runs = res["runs"]
            rows.append({"key": key, "label": h["label"], "schedule": skey, "sched_label": slabel,
                         "params": res["params"],
                         **{m: _stats([r[m] for r in runs]) for m in _DMETRICS},
                         "dfd": _stats([r["fd"] - b["fd"] for r, b in zip(runs, bases[main]["runs"])]),
                         "sweep": [{"params": s["params"], "fd": s["fd"]} for s in res.get("sweep", [])],
                         "runs": [{m: r[m] for m in _DMETRICS} for r in runs],
                         "seconds": round(time.perf_counter() - t, 1)})
            log(f"[{time.perf_counter() - t0:6.0f}s] {key:13s} {skey:10s} w={res['params'].get('w', '-')} "
                f"dFD {rows[-1]['dfd']['mean']:+.2f} ± {rows[-1]['dfd']['std']:.2f}")
            record["settings"]["seconds"] = round(time.perf_counter() - t0, 1)
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "free_guides_schedules.json", record)
            write_text(out / "free_guides_schedules.md", format_schedules(record))
            if doc is not None:
                assemble_doc(out, doc)
    return record


def format_schedules(record: dict) -> str:
    s = record["settings"]
    auto = s.get("auto_dfd")
    lines = ["## Schedules: constant w vs an interval vs w(sigma) and p(sigma) ramps", "",
             f"Generated by `autoguidance free-guides schedules --doc docs/free_guides.md` ({s.get('seconds', 0):.0f} s, "
             f"one thread{', QUICK settings' if s['quick'] else ''}), after `free-guides digits` and "
             "`free-guides proxies`. The best free guides of the digits head-to-head (held-out dFD; weight noise "
             "left out for its cost) and trained-guide autoguidance, on the same protocol: each schedule at its best "
             f"peak w on set {s['tune_set']} (grid {list(s['ws'])}), reported on the held-out sets; the w*(sigma) row is "
             "not tuned (the proxy study's on-data MSE-optimal weight per level, clipped). *Gap closed* = "
             "(dFD of constant w - dFD of the schedule) / (dFD of constant w - dFD of trained-guide autoguidance), "
             "for the free guides" + (f" (autoguidance: dFD {auto['mean']:+.2f} ± {auto['std']:.2f}). The in-situ rows on the "
             "dropout-trained main are against that main's own unguided FD (gap closed mixes the two baselines)."
             if auto else "."),
             "", "| guide | schedule | tuned (set 0) | FD_digits | dFD vs unguided | precision | recall | gap closed |",
             "|---|---|---|---|---|---|---|---|"]
    const = {r["key"]: r for r in record["rows"] if r["schedule"] == "constant"}
    for r in record["rows"]:
        c = const.get(r["key"])
        gap = ""
        if auto and c and r["key"] != "auto" and r["schedule"] != "constant":
            den = c["dfd"]["mean"] - auto["mean"]
            gap = f"{(c['dfd']['mean'] - r['dfd']['mean']) / den:+.0%}" if den > 0 else "(already at or past it)"
        w = f"w {r['params']['w']:g}" if "w" in r["params"] else "w*(sigma)"
        lines.append(f"| {r['label']} | {r['sched_label']} | {w} | {_pm(r['fd'])} | {_pm(r['dfd'], '{:+.2f}')} | "
                     f"{_pm(r['precision'], '{:.3f}')} | {_pm(r['recall'], '{:.3f}')} | {gap} |")
    return "\n".join(lines) + "\n"


# == the proxy study: choosing a guide without sampling (estimators in proxies.py) =====================================

def _toy_candidates(record: dict, models: Callable, sigmas) -> list[dict]:
    out = []
    by = {(r["family"], r["method"]): r for r in record["rows"]}
    for (fam, key), r in by.items():
        if key == "none":
            continue
        base = by[(fam, "none")]["metrics"]
        m = r.get("unguided_same_n") or base
        quality = ((r["metrics"]["outlier_rate"]["mean"] + r["metrics"]["coverage_tv"]["mean"])
                   - (m["outlier_rate"]["mean"] + m["coverage_tv"]["mean"]))
        g = next(x for x in free_guide_methods() if x.key == key)
        main = models(f"{fam}-main")
        fn = (prev_step_delta(main, sigmas) if key == "sg-prev"
              else guided_delta(lambda w, g=g, fam=fam: g.build(models, fam, w)))
        out.append({"set": "toy", "key": f"{fam}/{key}", "label": f"{fam}: {r['label']}", "quality": quality,
                    "tuned_w": r["w"], "delta_fn": fn, "main": main, "n_cap": g.n_cap})
    return out


def run_toy_proxies(free_guides_json, n: int = 1024, num_steps: int = 32, log: Callable = print) -> list[dict]:
    from ..checkpoint import load
    from ..sampling import sigmas_karras
    from ..toy.mixture import tree_mixture
    from .toy_demo import SIGMA_MAX, _start_points

    record = json.loads(Path(free_guides_json).read_text())
    cache = {}

    def models(name):
        if name not in cache:
            cache[name] = load(f"toy-{name}")
        return cache[name]

    grid = sigmas_karras(num_steps, 0.002, SIGMA_MAX, 7.0)
    levels = [float(s) for s in grid[:-1]]
    gt = tree_mixture("A")
    truth = lambda x, s: gt.denoise(x, torch.full((len(x),), s))
    x0 = gt.sample(n, 0.0, generator=torch.Generator().manual_seed(123))
    starts = _start_points(n, 123)
    rows = []
    for c in _toy_candidates(record, models, levels):
        m = min(n, c["n_cap"] or n)
        t = time.perf_counter()
        data = level_stats(c["delta_fn"], x0[:m], levels, seed=5)
        exact = level_stats(c["delta_fn"], x0[:m], levels, seed=5, target=truth)
        traj = trajectory_stats(c["main"], c["delta_fn"], truth, starts[:m], grid)
        rows.append({k: v for k, v in c.items() if k not in ("delta_fn", "main")}
                    | {"proxies": {**summarize_levels(data, traj),
                                   "data_corr_exact": float(np.mean([r["corr"] for r in exact]))},
                       "levels": data, "levels_traj": traj, "seconds": round(time.perf_counter() - t, 1)})
        log(f"  toy {c['key']:24s} quality {c['quality']:+.4f}  corr {rows[-1]['proxies']['data_corr']:+.3f} "
            f"(exact {rows[-1]['data_corr_exact']:+.3f}) traj {rows[-1]['proxies']['traj_corr']:+.3f} "
            f"({rows[-1]['seconds']} s)")
    return rows


def _digits_delta_fn(lab, row: dict, levels) -> Callable:
    g = next(x for x in digits_guides() if x.key == row["key"])
    params = {k: v for k, v in row["params"].items() if k != "w"}
    if g.key == "sg-prev":
        return prev_step_delta(lab.net(params["main"]), levels)
    return guided_delta(lambda w: g.build(lab, dict(params, w=w)))


def run_digits_proxies(digits_json, n: int = 256, lab=None, log: Callable = print, quick: bool = False) -> list[dict]:
    from ..sampling import sigmas_karras
    from .image_tables import FULL, QUICK, Lab

    record = json.loads(Path(digits_json).read_text())
    lab = lab or Lab(QUICK if quick else FULL, progress=False)
    grid = sigmas_karras(record["settings"]["num_steps"], 0.002, 80.0, 7.0)
    levels = [float(s) for s in grid[:-1]]
    d = lab.data.load("train")
    idx = torch.randperm(len(d), generator=torch.Generator().manual_seed(4))[:n]
    x0, labels = d.images[idx], torch.nn.functional.one_hot(d.classes[idx], 10).float()
    rows = []
    for r in record["rows"]:
        if r["kind"] == "none":
            continue
        m = min(n, 64) if r["key"] == "weightnoise" else n
        t = time.perf_counter()
        fn = _digits_delta_fn(lab, r, levels)
        data = level_stats(fn, x0[:m], levels, labels=labels[:m], seed=5)
        rows.append({"set": "digits", "key": r["key"], "label": r["label"], "quality": r["dfd"]["mean"],
                     "quality_std": r["dfd"]["std"], "tuned_w": r["params"].get("w"), "n": m,
                     "proxies": summarize_levels(data), "levels": data, "seconds": round(time.perf_counter() - t, 1)})
        log(f"  digits {r['key']:15s} dFD {r['dfd']['mean']:+.2f}  corr {rows[-1]['proxies']['data_corr']:+.3f} "
            f"gap {rows[-1]['proxies']['loss_gap']:+.3f} ({rows[-1]['seconds']} s)")
    return rows


def run_proxies(out="docs/results/free_guides", toy_json=None, digits_json=None, doc=None, quick: bool = False,
                sets=("toy", "digits"), log: Callable = print) -> dict:
    """The proxy study on the toy and digits head-to-head records in `out`; `sets` recomputes only those sets and
    keeps the other set's rows of an existing `proxies.json`."""
    torch.set_num_threads(1)
    out = Path(out)
    toy_json = Path(toy_json or out / "free_guides.json")
    digits_json = Path(digits_json or out / "free_guides_digits.json")
    t0 = time.perf_counter()
    rows = []
    old = out / "proxies.json"
    if set(sets) != {"toy", "digits"} and old.exists():
        rows += [r for r in json.loads(old.read_text())["rows"] if r["set"] not in sets]
    if "toy" in sets and toy_json.exists():
        rows += run_toy_proxies(toy_json, n=128 if quick else 1024, num_steps=8 if quick else 32, log=log)
    if "digits" in sets and digits_json.exists():
        rows += run_digits_proxies(digits_json, n=32 if quick else 256, log=log, quick=quick)
    corr = correlations(rows)
    sets = sorted(corr)
    predicts = [k for k in DIRECTIONS if len(sets) == 2 and all(k in corr[s] and corr[s][k]["spearman"] >= THRESHOLD
                                                               for s in sets)]
    record = {"settings": {"threshold": THRESHOLD, "directions": DIRECTIONS, "quick": quick,
                           "seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(),
                           "toy_json": str(toy_json), "digits_json": str(digits_json)},
              "rows": rows, "correlations": corr, "predicts": predicts}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "proxies.json", record)
    write_text(out / "proxies.md", format_proxies(record))
    write_wstar_figure(record, out / "proxies_wstar.png")
    if doc is not None:
        assemble_doc(out, doc)
    return record


