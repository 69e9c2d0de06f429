"""Panels in the style of Karras et al. (2024), Fig. 1: samples over the ground truth's outline."""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from ..metrics.toy import reference
from ..toy.mixture import tree_mixture

__all__ = ["VIEW", "truth_grid", "draw_panel", "panel_figure"]

VIEW = (-0.65, 1.5, -0.7, 1.55)   # x0, x1, y0, y1: the whole class-A tree
_RES = 320


@lru_cache(maxsize=None)
def truth_grid(classes: str = "A", view=VIEW, res: int = _RES):
    """Exact log p(x; 0) on a `res x res` grid over `view`: (xs, ys, logp [res, res])."""
    xs = np.linspace(view[0], view[1], res)
    ys = np.linspace(view[2], view[3], res)
    gx, gy = np.meshgrid(xs, ys)
    pts = torch.tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=torch.float32)
    lp = tree_mixture(classes).logp(pts).numpy().reshape(res, res)
    return xs, ys, lp


def draw_panel(ax, samples: np.ndarray, title: str = "", classes: str = "A", view=VIEW,
               color: str = "#c0392b", max_points: int = 8192, subtitle: str = "") -> None:
    """Truth density (grey) and its outline (the region holding ~99% of the mass) behind the samples."""
    xs, ys, lp = truth_grid(classes, view)
    q01 = reference(classes).logp_q01
    ax.imshow(np.exp(lp - lp.max()) ** 0.25, extent=(view[0], view[1], view[2], view[3]), origin="lower",
              cmap="Greys", vmin=0, vmax=1.6, interpolation="bilinear")
    ax.contour(xs, ys, lp, levels=[q01], colors="k", linewidths=0.6, alpha=0.8)
    pts = samples[:max_points]
    ax.scatter(pts[:, 0], pts[:, 1], s=0.6, c=color, alpha=0.55, linewidths=0, rasterized=True)
    ax.set_xlim(view[0], view[1])
    ax.set_ylim(view[2], view[3])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=7.5, pad=2)
    if subtitle:
        ax.text(0.02, 0.02, subtitle, transform=ax.transAxes, fontsize=6.5, va="bottom", family="monospace")


def panel_figure(panels: list[dict], cols: int = 4, size: float = 2.6):
    """`panels`: dicts with keys samples, title, subtitle, color. Returns a matplotlib Figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size * 1.02), squeeze=False)
    for ax, p in zip(axes.ravel(), panels):
        draw_panel(ax, p["samples"], p.get("title", ""), color=p.get("color", "#c0392b"),
                   subtitle=p.get("subtitle", ""))
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.tight_layout(pad=0.4)
    return fig
