"""Toy training speed: the library's loop against a straightforward implementation of the reference loop.

Both run the same computation per iteration (RESEARCH.md section 3): batch 4096 of fresh exact samples at
ln sigma ~ N(-2.3, 1.5^2), the exact score of the full 1016-component mixture for every sample, the log-density
MLP (width 64, 4 layers) with its score by autograd (double backward), Adam, power-function EMA. They differ
only in how the exact score is evaluated:

- straightforward: per (sample, component) 2x2 matrices, inverse covariance by eigendecomposition contracted
  with einsum, densities summed directly (the reference code's structure);
- library: `GaussianMixture.score`, which projects a batch on every component's eigenbasis with one matmul,
  works in log space (log-sum-exp), and processes cache-sized chunks.

The two are interleaved in one process (A, B, A, B, ...) so machine noise hits both alike; reported: iterations/s
of each and the ratio. Also checks that the two scores agree.

    python benchmarks/bench_toy_train.py [--iters 20] [--rounds 3] [--out benchmarks/results/toy_train.json]
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from autoguidance.nets.toy import LogDensityMLP
from autoguidance.toy.mixture import tree_mixture
from autoguidance.train.ema import PowerFunctionEMA


class StraightforwardMixture:
    """Direct evaluation: w_k = phi_k N(x; mu_k, Sigma_k + sigma^2 I) summed as densities, score = sum w z / sum w."""

    def __init__(self, gt):
        self.phi, self.mu, self.L, self.Q = gt.phi, gt.mu, gt.L, gt.Q

    def score(self, x, sigma):
        L = self.L + sigma[:, None, None] ** 2                                     # [N, K, 2]
        y = self.mu - x[:, None, :]                                                # [N, K, 2]
        z = torch.einsum("kij,nkj,klj,nkl->nki", self.Q, 1 / L, self.Q, y)        # inv(Sigma') (mu - x)
        c = self.phi / ((2 * math.pi) ** 2 * L.prod(-1)).sqrt()
        w = c * torch.exp(-0.5 * (y * z).sum(-1))                                  # [N, K]
        return (w[..., None] * z).sum(1) / w.sum(1, keepdim=True)


def make_step(score_fn, seed=0, batch=4096):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    gt = tree_mixture("A")
    net = LogDensityMLP(width=64).train()
    ema = PowerFunctionEMA(net, (0.010,))
    opt = torch.optim.Adam(net.parameters(), betas=(0.9, 0.99), lr=1e-2)

    def step():
        sigma = (torch.randn(batch, generator=gen) * 1.5 - 2.3).exp()
        x = gt.sample(batch, sigma, generator=gen)
        target = score_fn(x, sigma)
        loss = (sigma ** 2 * (target - net.score(x, sigma, create_graph=True)).square().mean(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(net)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20, help="iterations per timed round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--out", default="benchmarks/results/toy_train.json")
    args = ap.parse_args()

    gt = tree_mixture("A")
    slow = StraightforwardMixture(gt)
    # the two scores are the same computation
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(4096, generator=g) * 1.5 - 2.3).exp()
    x = gt.sample(4096, s, generator=g)
    a, b = slow.score(x, s), gt.score(x, s)
    ok = torch.isfinite(a).all(1)  # the direct sum can underflow to 0/0 far from the tree; ours cannot
    rel = ((a[ok] - b[ok]).norm(dim=1) / b[ok].norm(dim=1).clamp_min(1e-6)).max().item()

    steps = {"straightforward": make_step(slow.score), "library": make_step(gt.score)}
    times = {k: [] for k in steps}
    for k in steps:  # warm-up
        steps[k]()
    for _ in range(args.rounds):
        for k, f in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.iters):
                f()
            times[k].append(args.iters / (time.perf_counter() - t0))
    res = {k: {"it_per_s_mean": float(np.mean(v)), "it_per_s_rounds": [round(t, 3) for t in v]} for k, v in times.items()}
    res["speedup"] = res["library"]["it_per_s_mean"] / res["straightforward"]["it_per_s_mean"]
    res["score_max_rel_diff"] = rel
    res["score_nonfinite_rows_straightforward"] = int((~ok).sum())
    res["threads"] = torch.get_num_threads()
    res["settings"] = {"batch": 4096, "width": 64, "components": gt.num_components, "iters": args.iters,
                       "rounds": args.rounds}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"straightforward: {res['straightforward']['it_per_s_mean']:.2f} it/s   "
          f"library: {res['library']['it_per_s_mean']:.2f} it/s   speedup x{res['speedup']:.2f}   "
          f"(score max rel diff {rel:.1e}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
