"""`autoguidance free-guides toy`: every free guide that applies to an MLP, head to head on the exact 2D toy,
with cost per sample, a Pareto figure, and the in-situ toy-claim search."""
from __future__ import annotations

import argparse
import time

from ..experiments.free_guides import run_free_guides

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    p = sub.add_parser("free-guides", help="free guides head to head: the exact 2D toy (digits: later)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("target", choices=["toy"], help="where to run the comparison")
    p.add_argument("--out", default="docs/results/free_guides", help="output folder")
    p.add_argument("--n", type=int, default=1024, help="points per seed")
    p.add_argument("--tune-seed", type=int, default=0, help="seed on which w is tuned")
    p.add_argument("--seeds", default="1,2", help="held-out seeds (comma-separated)")
    p.add_argument("--steps", type=int, default=32, help="Heun steps")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per method")
    p.add_argument("--doc", default=None, help="also write the report here (e.g. docs/free_guides.md)")
    p.add_argument("--no-search", action="store_true", help="skip the in-situ toy-claim search")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.n < 16 or not seeds:
        raise ValueError("need --n >= 16 and at least one held-out seed")
    t0 = time.perf_counter()
    run_free_guides(args.out, n=args.n, tune_seed=args.tune_seed, eval_seeds=seeds, num_steps=args.steps,
                    rounds=args.rounds, search=not args.no_search, doc=args.doc)
    print(f"wrote {args.out}/free_guides.md, free_guides.json, free_guides_pareto.png, free_guides_samples.npz "
          f"in {time.perf_counter() - t0:.0f} s")
    return 0
