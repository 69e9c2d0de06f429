"""`autoguidance demo`: every guidance method on the 2D toy, from the shipped checkpoints (Karras et al. 2024, Fig. 1).

Each method samples class A with EDM Heun (32 steps, sigma in [0.002, 5], rho 7), starting, as the reference
does, from class A's ground truth smoothed to sigma_max. Per seed, `n` points; metrics are exact
(`autoguidance.metrics.toy`) and reported as mean +- std over seeds. The weights are the papers': CFG w = 4,
autoguidance w = 3 (and 2), in-situ dropout p = 0.1 at the in-situ paper's w' = 2.0, i.e. w = 3.

Outputs in `--out`: toy_demo.png (one panel per method), toy_demo.md (table), toy_demo.json (numbers and
settings), toy_demo_samples.npz (an array per method, keyed as in the table).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..checkpoint import load
from ..guidance import autoguidance, cfg, insitu, insitu_weight, no_guidance
from ..runs.files import atomic_path, write_json, write_text
from ..metrics.toy import METRICS, summarize, toy_metrics
from ..sampling import sample_heun, sigmas_karras
from ..toy.mixture import tree_mixture

__all__ = ["ToyMethod", "demo_methods", "run_demo"]

SIGMA_MAX = 5.0
W_CFG = 4.0
W_AUTO = 3.0
P_INSITU = 0.1
W_INSITU = insitu_weight(2.0)  # the in-situ paper's w' = 2.0


@dataclass(frozen=True)
class ToyMethod:
    key: str                      # table row and NPZ key
    label: str                    # panel title
    build: Callable[[Callable[[str], torch.nn.Module]], Callable]  # models -> denoiser
    passes: int                   # network passes per D call
    color: str = "#c0392b"


def _truth(models):
    gt = tree_mixture("A")
    return lambda x, sigma, labels=None: gt.denoise(x, sigma)


def demo_methods() -> list[ToyMethod]:
    """The demo's methods, in table order."""
    m = [ToyMethod("truth", "ground truth (exact score)", _truth, 0, "#2c3e50")]
    for fam in ("logp", "denoiser"):
        c = "#c0392b" if fam == "logp" else "#1f6fb2"
        main, drop = f"{fam}-main", f"{fam}-main-dropout"
        m += [
            ToyMethod(f"{fam}/none", f"{fam}: no guidance", lambda M, a=main: no_guidance(M(a)), 1, c),
            ToyMethod(f"{fam}/cfg-w4", f"{fam}: CFG w=4", lambda M, a=main, f=fam: cfg(M(a), W_CFG, uncond=M(f"{f}-uncond")), 2, c),
            ToyMethod(f"{fam}/autoguidance-w2", f"{fam}: autoguidance w=2",
                      lambda M, a=main, f=fam: autoguidance(M(a), M(f"{f}-guide"), 2.0), 2, c),
            ToyMethod(f"{fam}/autoguidance-w3", f"{fam}: autoguidance w=3",
                      lambda M, a=main, f=fam: autoguidance(M(a), M(f"{f}-guide"), W_AUTO), 2, c),
            ToyMethod(f"{fam}/insitu-p0.1-w3", f"{fam}: in-situ p=0.1 w=3",
                      lambda M, a=main: insitu(M(a), W_INSITU, P_INSITU), 2, c),
            ToyMethod(f"{fam}-dropout/none", f"{fam} trained w/ dropout: none",
                      lambda M, a=drop: no_guidance(M(a)), 1, c),
            ToyMethod(f"{fam}-dropout/insitu-p0.1-w3", f"{fam} trained w/ dropout: in-situ w=3",
                      lambda M, a=drop: insitu(M(a), W_INSITU, P_INSITU), 2, c),
        ]
    return m


def _start_points(n: int, seed: int) -> torch.Tensor:
    return tree_mixture("A").sample(n, SIGMA_MAX, generator=torch.Generator().manual_seed(seed))


def run_demo(out="autoguidance-demo", n: int = 2048, seeds=(0, 1, 2), num_steps: int = 32,
             methods: list[str] | None = None, progress: bool = True) -> dict:
    """Sample every method for each seed, compute exact metrics, write the four output files. Returns the
    JSON record."""
    if n < 16 or n > 1 << 17:
        raise ValueError(f"n must be in [16, 131072] points per seed, got {n}")
    if len(seeds) < 1:
        raise ValueError("give at least one seed")
    all_methods = demo_methods()
    if methods:
        unknown = sorted(set(methods) - {m.key for m in all_methods})
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {[m.key for m in all_methods]}")
        all_methods = [m for m in all_methods if m.key in methods]
    cache: dict[str, torch.nn.Module] = {}

    def model(name: str) -> torch.nn.Module:
        if name not in cache:
            cache[name] = load(f"toy-{name}")
        return cache[name]

    sigmas = sigmas_karras(num_steps, 0.002, SIGMA_MAX, 7.0)
    starts = {s: _start_points(n, s) for s in seeds}
    rows, samples = [], {}
    torch.set_grad_enabled(False)
    try:
        for m in all_methods:
            D = m.build(model)
            t0 = time.perf_counter()
            per_seed, xs = [], []
            for s in seeds:
                image_seeds = torch.arange(n, dtype=torch.int64) + int(s) * n
                x = sample_heun(D, starts[s].clone(), sigmas, seeds=image_seeds, progress=progress,
                                desc=f"{m.key} seed {s}")
                xs.append(x)
                per_seed.append(toy_metrics(x))
            samples[m.key] = torch.cat(xs).numpy()
            rows.append({"method": m.key, "label": m.label, "passes": m.passes,
                         "seconds": round(time.perf_counter() - t0, 2),
                         "metrics": summarize(per_seed), "per_seed": per_seed})
    finally:
        torch.set_grad_enabled(True)
    record = {"settings": {"n_per_seed": n, "seeds": list(seeds), "num_steps": num_steps, "sigma_min": 0.002,
                           "sigma_max": SIGMA_MAX, "rho": 7.0, "sampler": "heun", "w_cfg": W_CFG, "w_auto": W_AUTO,
                           "p_insitu": P_INSITU, "w_insitu": W_INSITU, "start": "class A truth at sigma_max"},
              "rows": rows}
    write_outputs(Path(out), record, samples, [m for m in all_methods])
    return record


def format_table(record: dict) -> str:
    """Markdown table: mean +- std over seeds for each metric."""
    heads = {"mean_logp": "mean log p (higher better)", "outlier_rate": "outlier rate (lower)",
             "coverage_tv": "branch-mass TV (lower)", "sliced_w2": "sliced W2 (lower)"}
    fmt = {"mean_logp": "{:.3f} ± {:.3f}", "outlier_rate": "{:.4f} ± {:.4f}", "coverage_tv": "{:.4f} ± {:.4f}",
           "sliced_w2": "{:.4f} ± {:.4f}"}
    lines = ["| method | passes | " + " | ".join(heads[k] for k in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for r in record["rows"]:
        cells = [fmt[k].format(r["metrics"][k]["mean"], r["metrics"][k]["std"]) for k in METRICS]
        lines.append(f"| `{r['method']}` | {r['passes']} | " + " | ".join(cells) + " |")
    s = record["settings"]
    lines.append("")
    lines.append(f"Class A, {s['n_per_seed']} points per seed, seeds {s['seeds']} (mean ± std over seeds); "
                 f"EDM Heun {s['num_steps']} steps, sigma in [{s['sigma_min']}, {s['sigma_max']}]. "
                 "An exact sample has outlier rate 0.01 by construction.")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, record: dict, samples: dict, methods: list[ToyMethod]) -> None:
    from .toy_plot import panel_figure

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "toy_demo.json", record)
    write_text(out / "toy_demo.md", format_table(record))
    with atomic_path(out / "toy_demo_samples.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **samples)
    by_key = {r["method"]: r for r in record["rows"]}
    panels = []
    for m in methods:
        mt = by_key[m.key]["metrics"]
        panels.append({"samples": samples[m.key], "title": m.label, "color": m.color,
                       "subtitle": f"logp {mt['mean_logp']['mean']:.2f}  out {mt['outlier_rate']['mean']:.3f}\n"
                                   f"TV {mt['coverage_tv']['mean']:.3f}"})
    fig = panel_figure(panels, cols=5)
    with atomic_path(out / "toy_demo.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    import matplotlib.pyplot as plt
    plt.close(fig)
