"""`autoguidance toy train | compat`: train a toy network by exact score matching; the exact compatibility study."""
from __future__ import annotations

import argparse
import time

from ..experiments.toy_compat import format_table, run_compat
from .common import command_line_of_argv

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    toy = sub.add_parser("toy", help="the 2D toy: training, compatibility of guides")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    _add_compat(toy_sub)
    p = toy_sub.add_parser("train", help="train a toy network by exact score matching",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="checkpoint folder to write (safetensors + config.json)")
    p.add_argument("--family", default="logp", choices=["logp", "denoiser"],
                   help="logp: the papers' log-density MLP; denoiser: EDM-preconditioned denoiser MLP")
    p.add_argument("--classes", default="A", choices=["A", "B", "AB"], help="class set of the ground truth")
    p.add_argument("--width", type=int, default=64, help="hidden features")
    p.add_argument("--layers", type=int, default=4, help="hidden layers")
    p.add_argument("--dropout", type=float, default=0.0, help="training dropout after each hidden activation")
    p.add_argument("--iters", type=int, default=4096, help="training iterations")
    p.add_argument("--batch", type=int, default=4096, help="samples per iteration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema-std", type=float, default=0.010, help="power-function EMA relative std")
    p.add_argument("--snapshots", default="", help="comma-separated iterations at which to save the EMA too")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_toy_train)


def _toy_train(args) -> int:
    from ..train.toy import train_toy

    snaps = [int(s) for s in args.snapshots.split(",") if s.strip()]
    train_toy(family=args.family, classes=args.classes, width=args.width, num_layers=args.layers,
              dropout=args.dropout, iters=args.iters, batch=args.batch, seed=args.seed, ema_std=args.ema_std,
              snapshots=snaps, out=args.out, progress=not args.no_progress,
              meta={"command": command_line_of_argv()})
    print(f"saved {args.out}")
    return 0


def _add_compat(sub) -> None:
    p = sub.add_parser("compat", help="exact compatibility of each guide on the 2D toy (cos of guidance "
                       "direction with the true error, best w per sigma)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="autoguidance-compat", help="output folder")
    p.add_argument("--n", type=int, default=4096, help="points per sigma")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    t0 = time.perf_counter()
    record = run_compat(args.out, n=args.n, seed=args.seed)
    print(format_table(record))
    print(f"wrote {args.out}/toy_compat.md, toy_compat.json, toy_compat.png in {time.perf_counter() - t0:.0f} s")
    return 0
