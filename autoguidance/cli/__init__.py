"""The `autoguidance` command.

    autoguidance demo [--out DIR]              the 2D toy: every method on the shipped checkpoints, figure + table
    autoguidance toy train --out DIR ...       train a toy network (exact score matching)
    autoguidance toy compat                    exact compatibility of each guide: cos(D_good - D_bad, D_true - D_good)
    autoguidance models                        list the shipped checkpoints and the commands that made them
    autoguidance sample | metrics | sweep      many samples, their metrics, grids of settings (torchrun-ready)
    autoguidance train | digits | mnist | fashion   EDM2-style U-Nets on real images, and the papers' tables on them
    autoguidance sites | presets | import-edm2 where perturbations can go; the papers' EDM2 configurations
    autoguidance rules                         the combination rules (APG, rescale, CFG-Zero*, ...) and their flags

Each subcommand lives in its own module of this package, which provides `add_parser(subparsers)`; the parser it adds sets
`func` (called with the parsed args, returns the exit code). Add a subcommand by naming its module in
`SUBCOMMANDS`. Nothing outside `autoguidance.cli` imports it.

A user error (a bad flag or value, a missing, unreadable or corrupt file, a folder where a file belongs, a busy
output folder) ends with one line on stderr, `autoguidance: error: ...`, and exit code 2; no traceback.
`AUTOGUIDANCE_DEBUG=1` (or `--debug` before the command) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import struct
import sys
import zipfile

__all__ = ["main"]


SUBCOMMANDS = ["demo", "toy", "models", "train", "digits", "mnist", "fashion", "import_edm2", "presets", "sites",
               "rules", "sample", "metrics", "sweep", "free_guides", "pipe", "make_guide",
               "guides"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one `--help` away)."""

    def error(self, message):
        _say(f"{message} (see `{self.prog} --help`)")
        self.exit(2)


def _say(message) -> None:
    text = " ".join(str(message).split()) or "unknown error"
    print(f"autoguidance: error: {text}", file=sys.stderr)


#: exceptions that are the user's input, not a bug: reported in one line
USER_ERRORS = (ValueError, FileNotFoundError, TypeError, IsADirectoryError, NotADirectoryError, PermissionError,
               FileExistsError, OSError, zipfile.BadZipFile, struct.error, EOFError, MemoryError, UnicodeError)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autoguidance", description="Guide diffusion models with a bad version "
                                     "of themselves: autoguidance, in-situ autoguidance, CFG, guidance intervals.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks (or AUTOGUIDANCE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    import importlib

    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("AUTOGUIDANCE_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader of our output went away (`| head`): stop quietly, as on SIGPIPE
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except USER_ERRORS as e:  # bad input: say what and how to fix, no traceback
        if debug:
            raise
        _say(_describe(e))
        return 2
    except KeyboardInterrupt:
        print("autoguidance: interrupted", file=sys.stderr)
        return 130


def _describe(e: BaseException) -> str:
    """One line for a user error: the message, with the path an OSError names, and the kind of error when the
    message alone does not say it."""
    if isinstance(e, MemoryError):
        return f"out of memory ({e or 'too large a request'}): use fewer seeds, a smaller --batch or --max-batch"
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    if isinstance(e, (struct.error, EOFError, zipfile.BadZipFile)):
        return f"a file is truncated or corrupt ({type(e).__name__}: {e})"
    return str(e) or type(e).__name__
