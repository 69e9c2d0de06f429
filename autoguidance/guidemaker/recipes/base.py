"""What a recipe tells make-guide (`make.py`): the net to train, its loss, what it trains on, what it costs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

__all__ = ["Recipe", "Prepared"]


@dataclass
class Prepared:
    """A recipe ready to train (`make.py` plans the budget, draws the inputs, runs `loop.train`, writes the guide)."""

    model: torch.nn.Module                      # the guide to train, initialised
    loss: Callable                              # loss(model, x0, cond, level, noise, const) -> [n]
    uses_data: bool                             # trains on --data when given (else on the main's samples)
    needs_labels: bool                          # the loss is the data's own: labels must be the data's
    main_calls_per_sample: int                  # the main's forward passes per training sample (targets)
    fresh: bool                                 # a new net (the main's schedule from the start) or a copy
    config: dict                                # the guide's constructor config
    weight_decay: float = 0.0
    notes: dict = field(default_factory=dict)   # recorded: the init report, the reduction


class Recipe:
    name: str = ""
    summary: str = ""
    trains: bool = True

    def check(self, opts) -> None:
        """Refuse options this recipe does not take (one line)."""

    def prepare(self, main, opts) -> Prepared:
        raise NotImplementedError
