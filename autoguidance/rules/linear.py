"""The linear rule: today's combination, the default of every method."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Rule

__all__ = ["Linear"]


@dataclass(frozen=True)
class Linear(Rule):
    """`g = c + sum_i (w_i - 1)(c - u_i)` (Ho & Salimans 2022 for CFG's pair; Karras et al. 2024, App. B.2 for several
    guides). Affine, so the same in every space; `Guided` runs it on its own bit-identical path."""

    name = "linear"
    paper = "Ho & Salimans 2022, arXiv 2207.12598; several guides: Karras et al. 2024, arXiv 2406.02507, App. B.2"
    formula = "g = c + sum_i (w_i - 1)(c - u_i)"

    def delta(self, c, u, w, state=None):
        return (w - 1) * (c - u), None
