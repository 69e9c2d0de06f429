"""`distill`: a reduced copy of the main's architecture (`reduce.py`: fewer channels and/or blocks) trained to match
the main's predictions at noise levels of the main's training distribution, on the user's data when given, else on
the main's own samples. Initialised fresh (`--init fresh`) or from the main's weights, sliced (`--init main`)."""
from __future__ import annotations

from ..reduce import init_from_main, reduce_config
from .base import Prepared, Recipe


class Distill(Recipe):
    name = "distill"
    summary = "a reduced copy of the main's architecture trained to match the main's predictions"

    def check(self, opts) -> None:
        if opts.init not in ("fresh", "main"):
            raise ValueError(f"--init must be 'fresh' or 'main' (the main's weights, sliced), got {opts.init!r}")

    def prepare(self, main, opts) -> Prepared:
        config, units = reduce_config(main.family(), main.config(), opts.width, opts.depth)
        model = main.build(config, opts.seed)
        notes = {"width": opts.width, "depth": opts.depth, "init": opts.init}
        if opts.init == "main":
            report = init_from_main(model, main.net, units)
            notes["init_report"] = {"copied": report["copied"], "sliced": report["sliced"],
                                    "fresh": len(report["fresh"]), "fresh_tensors": report["fresh"][:20]}
        return Prepared(model, main.distill_loss, uses_data=True, needs_labels=False, main_calls_per_sample=1,
                        fresh=opts.init == "fresh", config=config, notes=notes)
