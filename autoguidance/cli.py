"""The `autoguidance` command.

    autoguidance demo [--out DIR]              the 2D toy: every method on the shipped checkpoints, figure + table
    autoguidance toy train --out DIR ...       train a toy network (exact score matching)
    autoguidance toy compat                    exact compatibility of each guide: cos(D_good - D_bad, D_true - D_good)
    autoguidance models                        list the shipped checkpoints and the commands that made them
    autoguidance sample | metrics | sweep      many samples, their metrics, grids of settings (torchrun-ready)
    autoguidance train | digits                EDM2-style U-Nets on real digits, and the papers' tables on them
    autoguidance sites | presets | import-edm2 where perturbations can go; the papers' EDM2 configurations

Each subcommand lives in its own module, which provides `add_parser(subparsers)`; the parser it adds sets
`func` (called with the parsed args, returns the exit code). Add a subcommand by naming its module in
`SUBCOMMANDS`.
"""
from __future__ import annotations

import argparse
import shlex
import sys

__all__ = ["main"]


def _command_line() -> str:
    return "autoguidance " + " ".join(shlex.quote(a) for a in sys.argv[1:])


SUBCOMMANDS = [
    "autoguidance.experiments.toy_demo",
    "autoguidance.train_cli",
    "autoguidance.experiments.digits_cli",
    "autoguidance.edm2_import",
    "autoguidance.presets",
    "autoguidance.sites_cli",
    "autoguidance.sample_cli",
    "autoguidance.metrics_cli",
    "autoguidance.sweep_cli",
]


def _add_toy(sub) -> None:
    from .experiments import toy_compat

    toy = sub.add_parser("toy", help="the 2D toy: training, compatibility of guides")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    toy_compat.add_parser(toy_sub)
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
    from .train.toy import train_toy

    snaps = [int(s) for s in args.snapshots.split(",") if s.strip()]
    train_toy(family=args.family, classes=args.classes, width=args.width, num_layers=args.layers,
              dropout=args.dropout, iters=args.iters, batch=args.batch, seed=args.seed, ema_std=args.ema_std,
              snapshots=snaps, out=args.out, progress=not args.no_progress,
              meta={"command": _command_line()})
    print(f"saved {args.out}")
    return 0


def _models(args) -> int:
    from .checkpoint import shipped

    for name, rec in shipped().items():
        print(f"{name:24s} {rec.get('description', '')}\n{'':24s} made by: {rec.get('command', '?')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoguidance", description="Guide diffusion models with a bad version "
                                     "of themselves: autoguidance, in-situ autoguidance, CFG, guidance intervals.")
    sub = parser.add_subparsers(dest="command", required=True)

    import importlib

    for module in SUBCOMMANDS:
        importlib.import_module(module).add_parser(sub)
    _add_toy(sub)
    m = sub.add_parser("models", help="list the shipped checkpoints")
    m.set_defaults(func=_models)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as e:  # bad input: say what and how to fix, no traceback
        print(f"autoguidance: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoguidance: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
