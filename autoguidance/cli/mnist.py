"""`autoguidance mnist ...`: the papers' tables on MNIST at 14x14, with the image tables' protocol (cli/image_tables.py)."""
from __future__ import annotations

from ..experiments.image_sets import MNIST14
from .image_tables import add_image_set_parser

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    add_image_set_parser(sub, MNIST14, "the papers' tables on MNIST at 14x14 (EDM2-style U-Nets): a harder set")
