"""`autoguidance models`: the shipped checkpoints and the command that made each."""
from __future__ import annotations

from ..checkpoint import shipped

__all__ = ["add_parser"]


def _models(args) -> int:
    for name, rec in shipped().items():
        print(f"{name:24s} {rec.get('description', '')}\n{'':24s} made by: {rec.get('command', '?')}")
    return 0


def add_parser(sub) -> None:
    m = sub.add_parser("models", help="list the shipped checkpoints")
    m.set_defaults(func=_models)
