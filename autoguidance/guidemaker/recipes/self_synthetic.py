"""`self-synthetic` (SIMS, Alemohammad et al. 2024, arXiv 2408.16333): a copy of the main fine-tuned with the main's
own loss on the main's own samples; guiding by it pushes the main away from what its own synthetic data teaches."""
from __future__ import annotations

from .base import Prepared, Recipe


class SelfSynthetic(Recipe):
    name = "self-synthetic"
    summary = "a copy of the main fine-tuned on its own samples with its own loss (SIMS)"

    def check(self, opts) -> None:
        if opts.data is not None:
            raise ValueError("recipe self-synthetic trains on the main's own samples: drop --data (weight-decay and "
                             "distill take data)")

    def prepare(self, main, opts) -> Prepared:
        return Prepared(main.copy(), main.own_loss, uses_data=False, needs_labels=True, main_calls_per_sample=0,
                        fresh=False, config=main.config())
