"""`autoguidance free-guides toy|digits|schedules|proxies`: every free guide head to head (the exact 2D toy; the digits
EDM2 U-Net beside CFG and trained-guide autoguidance, with cost per sample and a Pareto figure), and the schedule
study (constant w vs an interval vs ramps) on the digits, and the proxy study (choosing a guide without
sampling: rank correlation of sampling-free proxies with the measured quality, toy and digits). Each part rewrites its section of --doc."""
from __future__ import annotations

import argparse
import time

from ..experiments.free_guides import run_free_guides, run_free_guides_digits, run_free_guides_schedules, \
    run_proxies

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    p = sub.add_parser("free-guides", help="free guides head to head: the exact 2D toy, digits, schedules",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("target", choices=["toy", "digits", "schedules", "proxies"], help="which part to run")
    p.add_argument("--out", default="docs/results/free_guides", help="output folder")
    p.add_argument("--n", type=int, default=1024, help="toy: points per seed")
    p.add_argument("--tune-seed", type=int, default=0, help="toy: seed on which w is tuned")
    p.add_argument("--seeds", default="1,2", help="toy: held-out seeds (comma-separated)")
    p.add_argument("--steps", type=int, default=32, help="toy: Heun steps")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per method")
    p.add_argument("--doc", default=None, help="also rewrite the assembled report here (e.g. docs/free_guides.md)")
    p.add_argument("--no-search", action="store_true", help="toy: skip the in-situ toy-claim search")
    p.add_argument("--quick", action="store_true", help="digits/schedules: few images and steps (CI)")
    p.add_argument("--only", default=None, help="digits/schedules: comma-separated row keys (unguided rows always); proxies: toy or digits")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    if args.target == "digits":
        run_free_guides_digits(args.out, quick=args.quick, doc=args.doc, only=only, rounds=args.rounds)
        print(f"wrote {args.out}/free_guides_digits.md, .json, _pareto.png in {time.perf_counter() - t0:.0f} s")
        return 0
    if args.target == "proxies":
        rec = run_proxies(args.out, doc=args.doc, quick=args.quick, sets=tuple(only or ("toy", "digits")))
        print(f"wrote {args.out}/proxies.md, .json, _wstar.png in {time.perf_counter() - t0:.0f} s; predicts: "
              f"{', '.join(rec['predicts']) or 'none'}")
        return 0
    if args.target == "schedules":
        run_free_guides_schedules(args.out, quick=args.quick, doc=args.doc, only=only)
        print(f"wrote {args.out}/free_guides_schedules.md, .json in {time.perf_counter() - t0:.0f} s")
        return 0
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.n < 16 or not seeds:
        raise ValueError("need --n >= 16 and at least one held-out seed")
    run_free_guides(args.out, n=args.n, tune_seed=args.tune_seed, eval_seeds=seeds, num_steps=args.steps,
                    rounds=args.rounds, search=not args.no_search, doc=args.doc)
    print(f"wrote {args.out}/free_guides.md, free_guides.json, free_guides_pareto.png, free_guides_samples.npz "
          f"in {time.perf_counter() - t0:.0f} s")
    return 0
