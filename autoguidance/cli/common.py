"""Small things every command shares."""
from __future__ import annotations

import shlex
import sys

__all__ = ["command_line_of_argv"]


def command_line_of_argv() -> str:
    """This process's command line as `autoguidance ...` (recorded in what a command writes)."""
    return "autoguidance " + " ".join(shlex.quote(a) for a in sys.argv[1:])
