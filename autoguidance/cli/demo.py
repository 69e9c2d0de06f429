"""`autoguidance demo`: the 2D toy, every method on the shipped checkpoints; figure, table, JSON, samples."""
from __future__ import annotations

import argparse
import time

from ..experiments.toy_demo import format_table, run_demo

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the 2D toy: sample every guidance method from the shipped checkpoints, "
                       "write figure, table, numbers and samples", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="autoguidance-demo", help="output folder")
    p.add_argument("--n", type=int, default=2048, help="points per seed")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated sampling seeds (spread is over these)")
    p.add_argument("--steps", type=int, default=32, help="Heun steps")
    p.add_argument("--methods", default="", help="comma-separated subset of method keys (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    methods = [m for m in args.methods.split(",") if m.strip()] or None
    t0 = time.perf_counter()
    record = run_demo(args.out, n=args.n, seeds=seeds, num_steps=args.steps, methods=methods,
                      progress=not args.no_progress)
    print(format_table(record))
    print(f"wrote {args.out}/toy_demo.png, toy_demo.md, toy_demo.json, toy_demo_samples.npz "
          f"in {time.perf_counter() - t0:.0f} s")
    return 0
