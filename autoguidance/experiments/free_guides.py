"""`autoguidance free-guides toy`: every free guide that applies to an MLP, head to head on the exact 2D toy.

For both network families (log-density MLP, EDM denoiser MLP; the shipped dropout-free mains) every method runs
at a small grid of w; w is tuned on seed 0 (lowest outlier rate + branch-mass TV), and the tuned w is reported on
held-out seeds 1 and 2 (mean +- std). Cost per sample is measured in the same run: the guided and the unguided
sampler timed alternately, `rounds` times, the median of the ratios. Then the toy-claim search: in-situ dropout at
small p and w on late dropout sites of the dropout-trained mains, on the held-out seeds.

SEG, TPG and SWG need attention, tokens or an image grid: the toy MLPs have none, so they are not in the toy table
(their tests are in tests/test_free_guides.py; the digits U-Nets are for a later study).
"""
from __future__ import annotations

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
from .toy_demo import SIGMA_MAX, _start_points

__all__ = ["FreeGuide", "free_guide_methods", "run_free_guides", "format_report", "write_doc"]

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
        write_doc(record, Path(out), Path(doc))
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
D = ag.perturbation_guidance(net, 2.0, TokenShuffle(where="unet.enc.*"))   # TPG: tokens of chosen blocks shuffled
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
  is the exact pass. Needs images (not the toy); the net must accept the crop size.
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
