"""`autoguidance digits ...`: the papers' tables on scikit-learn's 8x8 digits (the image tables' command line:
cli/image_tables.py)."""
from __future__ import annotations

from ..experiments.image_sets import DIGITS
from .image_tables import add_image_set_parser

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    add_image_set_parser(sub, DIGITS, "the papers' tables on real 8x8 digits (EDM2-style U-Nets)")
