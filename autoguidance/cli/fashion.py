"""`autoguidance fashion ...`: the papers' tables on Fashion-MNIST at 28x28, judged in two feature spaces and in
pixel space, with the image tables' protocol (cli/image_tables.py)."""
from __future__ import annotations

from ..experiments.image_sets import FASHION28
from .image_tables import add_image_set_parser

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    add_image_set_parser(sub, FASHION28, "the papers' tables on Fashion-MNIST at 28x28 (70,000 real images; two "
                         "feature spaces and pixel space)")
