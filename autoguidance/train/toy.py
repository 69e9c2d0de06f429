"""Exact score matching of the toy networks on fresh ground-truth samples (Karras et al. 2024, App. C).

Each iteration draws a batch of noise levels `ln sigma ~ N(P_mean, P_std^2)` and exact samples of the diffused
tree `p(x; sigma)`, and regresses the network onto the exact target:

- log-density family: `loss = sigma^2 * mean_dims (score_true - score_net)^2`                  (score space)
- denoiser family:    `loss = lambda(sigma) * mean_dims (D_true - D_net)^2`, `D_true = x + sigma^2 score_true`,
                      `lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2`       (EDM's weighting, D space)

Adam (betas 0.9, 0.99), learning rate `lr_ref / sqrt(max(t / lr_iter, 1))`, power-function EMA.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import torch
import tqdm

from ..checkpoint import save
from ..nets.toy import DenoiserMLP, LogDensityMLP
from ..toy.mixture import tree_mixture
from .ema import PowerFunctionEMA

__all__ = ["FAMILIES", "build_toy_net", "snapshot_path", "toy_loss", "train_toy"]

FAMILIES = {"logp": LogDensityMLP, "denoiser": DenoiserMLP}


def build_toy_net(family: str, width: int = 64, num_layers: int = 4, dropout: float = 0.0,
                  sigma_data: float = 0.5) -> torch.nn.Module:
    if family not in FAMILIES:
        raise ValueError(f"unknown toy family {family!r}: expected one of {sorted(FAMILIES)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if width < 1 or num_layers < 1:
        raise ValueError(f"width and num_layers must be >= 1, got {width}, {num_layers}")
    return FAMILIES[family](width=width, num_layers=num_layers, dropout=dropout, sigma_data=sigma_data)


def snapshot_path(out, iteration: int) -> Path:
    """Where the snapshot at `iteration` of a run saving to `out` goes: a sibling folder `<out>-iter-XXXXXX`."""
    out = Path(out)
    return out.parent / f"{out.name}-iter-{iteration:06d}"


def toy_loss(net: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, score_true: torch.Tensor) -> torch.Tensor:
    """Per-sample exact score-matching loss `[N]` for either family (see module docstring)."""
    if isinstance(net, LogDensityMLP):
        return sigma**2 * (score_true - net.score(x, sigma, create_graph=True)).square().mean(1)
    sd = net.sigma_data
    D_true = x + sigma[:, None] ** 2 * score_true
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    return weight * (net(x, sigma) - D_true).square().mean(1)


def train_toy(
    family: str = "logp",        # 'logp' (log-density MLP, the papers') or 'denoiser' (EDM-preconditioned MLP)
    classes: str = "A",          # 'A', 'B' or 'AB' (the unconditional guide for CFG is trained on 'AB')
    width: int = 64,             # hidden features
    num_layers: int = 4,         # hidden layers
    dropout: float = 0.0,        # dropout after every hidden activation, during training only
    iters: int = 4096,           # training iterations
    batch: int = 4096,           # fresh ground-truth samples per iteration
    seed: int = 0,               # seeds the weights, noise levels and samples
    P_mean: float = -2.3,        # ln(sigma) ~ N(P_mean, P_std^2)
    P_std: float = 1.5,
    sigma_data: float = 0.5,
    lr_ref: float = 1e-2,        # lr = lr_ref / sqrt(max(t / lr_iter, 1))
    lr_iter: int = 512,
    ema_std: float = 0.010,      # power-function EMA relative std
    snapshots: Iterable[int] = (),  # iterations at which to also save the EMA (to <out>-iter-XXXXXX)
    out=None,                    # checkpoint folder for the final EMA (None: do not save)
    progress: bool = True,
    meta: dict | None = None,
) -> torch.nn.Module:
    """Train a toy net and return its EMA (eval mode). Saves `out` and snapshots as safetensors + JSON."""
    if iters < 1 or batch < 1:
        raise ValueError(f"iters and batch must be >= 1, got {iters}, {batch}")
    snapshots = sorted(set(int(s) for s in snapshots))
    if any(not 1 <= s <= iters for s in snapshots):
        raise ValueError(f"snapshot iterations must lie in [1, {iters}], got {snapshots}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # initial weights (randn in MPLinear) and dropout masks
    gt = tree_mixture(classes)
    net = build_toy_net(family, width, num_layers, dropout, sigma_data).train().requires_grad_(True)
    ema = PowerFunctionEMA(net, stds=(ema_std,))
    opt = torch.optim.Adam(net.parameters(), betas=(0.9, 0.99))
    record = dict(family=family, classes=classes, width=width, num_layers=num_layers, dropout=dropout,
                  iters=iters, batch=batch, seed=seed, P_mean=P_mean, P_std=P_std, lr_ref=lr_ref,
                  lr_iter=lr_iter, ema_std=ema_std, **(meta or {}))
    bar = tqdm.tqdm(range(iters), desc=f"train {family} {classes} w{width}", disable=not progress, unit="it")
    for t in bar:
        opt.param_groups[0]["lr"] = lr_ref / math.sqrt(max(t / lr_iter, 1.0))
        sigma = (torch.randn(batch, generator=gen) * P_std + P_mean).exp()
        x = gt.sample(batch, sigma, generator=gen)
        score_true = gt.score(x, sigma)
        loss = toy_loss(net, x, sigma, score_true).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(net)
        if t % 64 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if out is not None and (t + 1) in snapshots:
            save(ema.averages[ema_std], snapshot_path(out, t + 1), meta=dict(record, iters_done=t + 1))
    result = ema.averages[ema_std]
    if out is not None:
        save(result, out, meta=dict(record, iters_done=iters))
    return result
