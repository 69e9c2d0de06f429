"""The recipes: how a guide is made from a main (one module each; `RECIPES` names them).

| recipe           | the guide                                                          | trains on                        | loss                          |
|------------------|--------------------------------------------------------------------|----------------------------------|-------------------------------|
| `snapshot`       | an earlier checkpoint of the main's own run, its own EMA (papers)  | nothing (validated and copied)   | -                             |
| `distill`        | a reduced copy of the main's architecture, fresh or sliced from it | data, else the main's samples    | prediction matching           |
| `self-synthetic` | a copy of the main (SIMS, Alemohammad et al. 2024)                 | the main's own samples           | the main's own                |
| `weight-decay`   | a copy of the main under strong weight decay (Kaiser et al. 2024)  | data, else the main's samples    | the main's own, AdamW decay   |
"""
from __future__ import annotations

from .base import Prepared, Recipe
from .distill import Distill
from .self_synthetic import SelfSynthetic
from .snapshot import Snapshot
from .weight_decay import WeightDecay

__all__ = ["RECIPES", "Recipe", "Prepared", "get_recipe"]

RECIPES: dict[str, Recipe] = {r.name: r for r in (Snapshot(), Distill(), SelfSynthetic(), WeightDecay())}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: expected one of {', '.join(RECIPES)}")
    return RECIPES[name]
