"""`weight-decay` (Kaiser, Adaloglou et al. 2024, arXiv 2411.10257: a guide that differs from the main only by a
stronger weight regularisation): a copy of the main fine-tuned with the main's own loss under AdamW's decoupled
weight decay (`--weight-decay`, default 1.0), on the data when given, else on the main's samples.

On the library's EDM2-style nets the convolution and linear weights are force-normalised in every training forward
pass (EDM2 Eq. 66), which undoes a uniform shrink: the decay acts on the gains (`out_gain`, the blocks' `emb_gain`,
the uncertainty head) and on the relative size of the AdamW steps; measured, not assumed, in docs/guides.md."""
from __future__ import annotations

from .base import Prepared, Recipe

DEFAULT_WEIGHT_DECAY = 1.0


class WeightDecay(Recipe):
    name = "weight-decay"
    summary = "a copy of the main fine-tuned with a large weight decay (SWG paper)"

    def prepare(self, main, opts) -> Prepared:
        wd = DEFAULT_WEIGHT_DECAY if opts.weight_decay is None else float(opts.weight_decay)
        if not wd > 0:
            raise ValueError(f"recipe weight-decay needs --weight-decay > 0, got {wd}")
        return Prepared(main.copy(), main.own_loss, uses_data=True, needs_labels=True, main_calls_per_sample=0,
                        fresh=False, config=main.config(), weight_decay=wd, notes={"weight_decay": wd})
