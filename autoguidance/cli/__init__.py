"""The `autoguidance` command.

    autoguidance demo [--out DIR]              the 2D toy: every method on the shipped checkpoints, figure + table
    autoguidance toy train --out DIR ...       train a toy network (exact score matching)
    autoguidance toy compat                    exact compatibility of each guide: cos(D_good - D_bad, D_true - D_good)
    autoguidance models                        list the shipped checkpoints and the commands that made them
    autoguidance sample | metrics | sweep      many samples, their metrics, grids of settings (torchrun-ready)
    autoguidance train | digits                EDM2-style U-Nets on real digits, and the papers' tables on them
    autoguidance sites | presets | import-edm2 where perturbations can go; the papers' EDM2 configurations

Each subcommand lives in its own module of this package, which provides `add_parser(subparsers)`; the parser it adds sets
`func` (called with the parsed args, returns the exit code). Add a subcommand by naming its module in
`SUBCOMMANDS`. Nothing outside `autoguidance.cli` imports it.
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


SUBCOMMANDS = ["demo", "toy", "models", "train", "digits", "mnist", "import_edm2", "presets", "sites", "sample", "metrics",
               "sweep"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoguidance", description="Guide diffusion models with a bad version "
                                     "of themselves: autoguidance, in-situ autoguidance, CFG, guidance intervals.")
    sub = parser.add_subparsers(dest="command", required=True)

    import importlib

    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
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

