"""Make a guide for any main: recipes, budgets in FLOPs, config reducers, a resumable data-parallel training loop.

    import autoguidance as ag
    ag.make_guide("mnist-s-T-ema050", "distill", "runs/guide", budget=0.03)      # = autoguidance make-guide ...

| module        | job |
|---------------|-----|
| `make`        | `make_guide`: lock, record, resume, plan the budget, draw the inputs, train, write the guide |
| `recipes/`    | one module per recipe: snapshot, distill, self-synthetic, weight-decay |
| `budget`      | FLOPs counting (FlopCounterMode), budgets and plans |
| `reduce`      | config reducers (EDM2, diffusers U-Nets and transformers) and the init from the main's weights |
| `mains`, `mains_diffusers` | the main behind one interface: losses, noise levels, samples, writing a guide |
| `data`        | the inputs: a data folder / library image set, or the main's own samples |
| `loop`        | the training loop: data-parallel over torchrun ranks, exact resume |
| `compat`      | is a guide made for this main? (registered with the core's `check_guide`) |
| `sizes`       | the reduced architectures of published models: parameters and FLOPs per call |
"""
from . import compat  # noqa: F401  (registers the guide check with the core)
from .budget import Budget, count_flops
from .make import GuideOptions, ema_folder, make_guide, read_record
from .recipes import RECIPES
from .reduce import init_from_main, reduce_config

__all__ = ["make_guide", "GuideOptions", "read_record", "ema_folder", "RECIPES", "Budget", "count_flops", "reduce_config",
           "init_from_main"]
