"""`autoguidance toy compat`: is a guide compatible? Measured exactly on the 2D toy.

Guidance moves D_good along `delta = D_good - D_bad`. It helps where that direction agrees with the good
model's true error `err = D_true - D_good` (D_true is the exact denoiser of the tree). On points drawn from
the diffused truth p(x; sigma), per noise level:

- `cos`: mean cosine between delta and err over points (1: guidance points straight at the truth; 0: unrelated;
  < 0: guidance pushes away from it);
- `cos_score`: mean cosine between delta and the true score direction `D_true - x` (towards higher true density
  p(x; sigma)). Guidance at w > 1 is not meant to reproduce D_true: it sharpens the distribution, which
  moves samples up the true density. A guide whose delta points up the density concentrates samples on the
  data; one with cos_score ~ 0 adds an unrelated push;
- `w_star`: the single best weight at that sigma, `argmin_w E|D_bad + w delta - D_true|^2 = 1 + <delta, err> / <delta, delta>`;
- `err_removed`: fraction of the good model's squared error that guidance at `w_star` removes (0 = none);
- `delta_rms` / `err_rms`: sizes of the two vectors.

This is RESEARCH.md open question 3 ("which perturbation is a compatible degradation?") in its exact form.
Outputs: toy_compat.md, toy_compat.json, toy_compat.png (cos and w_star against sigma, one line per guide).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..checkpoint import load
from ..guidance import Pass
from ..runs.files import atomic_path, write_json, write_text
from ..perturb import Dropout, Perturbation
from ..rng import mix_keys
from ..toy.mixture import tree_mixture

__all__ = ["GuideSpec", "guide_specs", "measure", "run_compat"]

SIGMAS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class GuideSpec:
    key: str
    main: str                              # shipped checkpoint of D_good
    guide: str | None = None               # shipped checkpoint of D_bad (None: the main under `perturbation`)
    perturbation: Perturbation | None = None


def guide_specs() -> list[GuideSpec]:
    specs = []
    for fam in ("logp", "denoiser"):
        specs += [
            GuideSpec(f"{fam}: autoguidance guide (w32, T/8)", f"toy-{fam}-main", f"toy-{fam}-guide"),
            GuideSpec(f"{fam}: CFG guide (unconditional AB)", f"toy-{fam}-main", f"toy-{fam}-uncond"),
            GuideSpec(f"{fam}: in-situ dropout 0.1", f"toy-{fam}-main", perturbation=Dropout(0.1)),
            GuideSpec(f"{fam}: in-situ dropout 0.1 on the dropout-trained main", f"toy-{fam}-main-dropout",
                      perturbation=Dropout(0.1)),
        ]
    return specs


def _bad_fn(spec: GuideSpec, main: torch.nn.Module, model: Callable[[str], torch.nn.Module]):
    if spec.guide is not None:
        return model(spec.guide)
    p = Pass(main, perturbation=spec.perturbation)

    def bad(x, sigma):
        n = len(x)
        keys = mix_keys(torch.arange(n, dtype=torch.int64), 77)
        with p.perturbation.active(p.hook_target(), torch.ones(n, dtype=torch.bool), keys, sigma):
            return main(x, sigma)
    return bad


def _mean_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = a.norm(dim=1), b.norm(dim=1)
    ok = (na > 0) & (nb > 0)
    return ((a * b).sum(1)[ok] / (na[ok] * nb[ok])).mean().item() if ok.any() else float("nan")


def measure(D_good: Callable, D_bad: Callable, sigmas=SIGMAS, n: int = 4096, seed: int = 0,
            classes: str = "A") -> list[dict]:
    """Exact compatibility numbers at each sigma (see module docstring)."""
    gt = tree_mixture(classes)
    rows = []
    for i, s in enumerate(sigmas):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        x = gt.sample(n, s, generator=g)
        sig = torch.full((n,), float(s))
        with torch.no_grad():
            d_true = gt.denoise(x, sig).double()
            d_good = D_good(x, sig).double()
            d_bad = D_bad(x, sig).double()
        delta, err = d_good - d_bad, d_true - d_good
        up = d_true - x.double()
        cos = _mean_cos(delta, err)
        cos_score = _mean_cos(delta, up)
        dd, de, ee = (delta * delta).sum().item(), (delta * err).sum().item(), (err * err).sum().item()
        w_star = 1 + de / dd if dd > 0 else float("nan")
        removed = (de * de / dd) / ee if dd > 0 and ee > 0 else 0.0
        rows.append({"sigma": float(s), "cos": cos, "cos_score": cos_score, "w_star": w_star, "err_removed": removed,
                     "delta_rms": float(np.sqrt(dd / n)), "err_rms": float(np.sqrt(ee / n))})
    return rows


def readout_inflation(net, perturbation: Perturbation, sigmas=SIGMAS, n: int = 4096, seed: int = 0) -> list[dict]:
    """For a log-density net (`logp = gain * mean(y^2) / sigma - |x_in|^2 / 2`): the ratio of the read-out
    `mean(y^2)` with the perturbation to without, `(logp_bad + |x_in|^2/2) / (logp_good + |x_in|^2/2)`, mean and
    median over points of the diffused truth. A ratio above 1 means the perturbed net models a sharper density."""
    gt = tree_mixture("A")
    rows = []
    for i, s in enumerate(sigmas):
        x = gt.sample(n, s, generator=torch.Generator().manual_seed(seed * 1000 + i))
        sig = torch.full((n,), float(s))
        quad = 0.5 * (x / (net.sigma_data ** 2 + sig[:, None] ** 2).sqrt()).square().sum(1)
        with torch.no_grad():
            good = net.logp(x, sig) + quad
            keys = mix_keys(torch.arange(n, dtype=torch.int64), 77)
            with perturbation.active(net, torch.ones(n, dtype=torch.bool), keys, sig):
                bad = net.logp(x, sig) + quad
        ratio = (bad / good).double()
        rows.append({"sigma": float(s), "mean": ratio.mean().item(), "median": ratio.median().item()})
    return rows


def run_compat(out="autoguidance-compat", n: int = 4096, seed: int = 0, sigmas=SIGMAS) -> dict:
    cache: dict[str, torch.nn.Module] = {}

    def model(name):
        if name not in cache:
            cache[name] = load(name)
        return cache[name]

    results = []
    for spec in guide_specs():
        main = model(spec.main)
        results.append({"guide": spec.key, "rows": measure(main, _bad_fn(spec, main, model), sigmas, n, seed)})
    inflation = {name: readout_inflation(model(name), Dropout(0.1), sigmas, n, seed)
                 for name in ("toy-logp-main", "toy-logp-main-dropout")}
    record = {"settings": {"n": n, "seed": seed, "sigmas": list(sigmas)}, "guides": results,
              "logp_readout_inflation_dropout_0.1": inflation}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "toy_compat.json", record)
    write_text(out / "toy_compat.md", format_table(record))
    _plot(record, out / "toy_compat.png")
    return record


def format_table(record: dict) -> str:
    sig = record["settings"]["sigmas"]
    head = "| guide | " + " | ".join(f"σ={s:g}" for s in sig) + " |"
    rule = "|---|" + "---|" * len(sig)
    lines = ["Does the guidance direction delta = D_good - D_bad point up the true density? "
             "cos(delta, D_true - x), mean over points of the diffused truth p(x; sigma):", "", head, rule]
    for g in record["guides"]:
        lines.append(f"| {g['guide']} | " + " | ".join(f"{r['cos_score']:+.2f}" for r in g["rows"]) + " |")
    lines += ["", "Does it point along the main model's own error? cos(delta, D_true - D_good), with w* (the "
              "single weight that brings D_w closest to D_true at that sigma) in brackets:", "", head, rule]
    for g in record["guides"]:
        cells = [f"{r['cos']:+.2f} ({r['w_star']:.2f})" for r in g["rows"]]
        lines.append(f"| {g['guide']} | " + " | ".join(cells) + " |")
    infl = record.get("logp_readout_inflation_dropout_0.1", {})
    if infl:
        lines += ["", "Log-density nets: read-out `mean(y^2)` with dropout 0.1 divided by without (median over points; "
                  "> 1: the perturbed net models a sharper density):", "", head, rule]
        for name, rows in infl.items():
            lines.append(f"| {name} | " + " | ".join(f"{r['median']:.3f}" for r in rows) + " |")
    lines += ["", f"{record['settings']['n']} points per sigma, seed {record['settings']['seed']}."]
    return "\n".join(lines) + "\n"


def _plot(record: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for g in record["guides"]:
        s = [r["sigma"] for r in g["rows"]]
        style = "-" if g["guide"].startswith("logp") else "--"
        axes[0].plot(s, [r["cos_score"] for r in g["rows"]], style, marker="o", ms=3, label=g["guide"])
        axes[1].plot(s, [r["cos"] for r in g["rows"]], style, marker="o", ms=3, label=g["guide"])
    axes[0].set_ylabel("cos(D_good - D_bad, D_true - x): up the true density")
    axes[1].set_ylabel("cos(D_good - D_bad, D_true - D_good): along the error")
    for ax in axes:
        ax.axhline(0.0, color="k", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("sigma")
    axes[0].legend(fontsize=6.5, loc="lower left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
