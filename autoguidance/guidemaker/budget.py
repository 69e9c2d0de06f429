"""What a guide costs, counted in FLOPs: one way for every recipe, every model and every size table.

- **Forward FLOPs per sample** `F`: measured, not estimated, with `torch.utils.flop_counter.FlopCounterMode` on one
  forward pass of batch 1 (matrix products, convolutions and attention; element-wise ops are not counted, as in
  every FLOP table of the field). The network is built on the meta device from its config, so no weight memory is
  allocated and the count works for SDXL, Flux or Wan 14B on this CPU.
- **Training FLOPs** of a net on one sample: `3 F` (the backward pass costs twice the forward pass).
- **The main's training FLOPs**: `3 F_main x images seen`, images seen = iteration x batch from the main
  checkpoint's training record (`autoguidance train` writes it), or given (`main_flops=`, `--main-flops`) for models
  without one (published models).
- **A recipe's cost**: its training steps x batch x (3 F_guide + the main's forward passes it makes per sample for
  targets: 1 for distillation, 0 for the recipes that train on a loss of the data), plus the sampling cost of data-free
  inputs: samples x the sampler's model calls x F_main. Text encoders (run once per prompt) are not counted.

A budget is a fraction of the main's training FLOPs (`Budget(fraction=0.03)`), or a number of steps
(`Budget(steps=N)`), and `plan()` turns it into steps and a sample pool, recorded in the guide's record with what
was spent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = ["TRAIN_FACTOR", "count_flops", "Budget", "Plan", "plan", "sampler_calls"]

#: training FLOPs per sample = TRAIN_FACTOR x forward FLOPs (forward + backward, the backward costing two forwards)
TRAIN_FACTOR = 3


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of calling `fn()` (no arguments: build the inputs inside or close over them), counted by
    `FlopCounterMode`, gradients off."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


def sampler_calls(sampler: str, steps: int) -> int:
    """Model calls per sample of a sampler run: Heun 2N - 1 (no correction on the last step), Euler / DPM-Solver /
    flow Euler N."""
    return 2 * steps - 1 if sampler == "heun" else steps


@dataclass(frozen=True)
class Budget:
    """How much a recipe may spend: a fraction of the main's training FLOPs, or a step count (exactly one)."""

    fraction: Optional[float] = None           # of the main's training FLOPs, e.g. 0.03
    steps:    Optional[int] = None             # training steps, whatever they cost

    def __post_init__(self):
        if (self.fraction is None) == (self.steps is None):
            raise ValueError("give the budget either as a fraction of the main's training FLOPs (--budget 0.03) or "
                             "as a step count (--steps N), not both and not neither")
        if self.fraction is not None and not (isinstance(self.fraction, (int, float)) and 0 < self.fraction
                                              and math.isfinite(self.fraction)):
            raise ValueError(f"--budget must be a positive fraction of the main's training FLOPs (e.g. 0.03), got "
                             f"{self.fraction!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or int(self.steps) != self.steps
                                       or self.steps < 1):
            raise ValueError(f"--steps must be a positive number of training steps, got {self.steps!r}")

    def to_dict(self) -> dict:
        return {"fraction": self.fraction, "steps": self.steps}


@dataclass(frozen=True)
class Plan:
    """A budget made concrete: how many steps and data-free samples, and what each costs (FLOPs)."""

    steps:            int                      # training steps of `batch` samples
    batch:            int                      # samples per step (all ranks together)
    samples:          int                      # data-free samples drawn from the main (0: inputs are data)
    flops_per_sample: int                      # training FLOPs per sample of a step (guide fwd+bwd + main targets)
    flops_per_input:  int                      # FLOPs of drawing one data-free sample (its sampler run)
    main_flops:       Optional[float]          # the main's training FLOPs (None: unknown, step budget)

    @property
    def flops(self) -> float:
        """Planned total: training plus data-free inputs."""
        return self.train_flops + self.input_flops

    @property
    def train_flops(self) -> float:
        return float(self.steps) * self.batch * self.flops_per_sample

    @property
    def input_flops(self) -> float:
        return float(self.samples) * self.flops_per_input

    def to_dict(self) -> dict:
        out = {"steps": self.steps, "batch": self.batch, "samples": self.samples,
               "flops_per_sample": self.flops_per_sample, "flops_per_input": self.flops_per_input,
               "train_flops": self.train_flops, "input_flops": self.input_flops, "flops": self.flops,
               "main_flops": self.main_flops}
        out["fraction_of_main"] = self.flops / self.main_flops if self.main_flops else None
        return out


def plan(budget: Budget, *, batch: int, flops_per_sample: int, flops_per_input: int, main_flops: Optional[float],
         data_free: bool, samples: Optional[int] = None, input_share: float = 0.25) -> Plan:
    """Steps and data-free samples for `budget`.

    A fraction budget `f` allows `f x main_flops`; data-free inputs take `input_share` of it unless `samples` is
    given, the rest buys steps of `batch` samples. A step budget runs exactly that many steps; its data-free pool is
    `samples`, or 16 batches. Raises ValueError (one line) when the budget cannot buy one step or one batch of
    inputs, or a fraction budget is given without the main's training FLOPs."""
    if batch < 1:
        raise ValueError(f"--batch must be a positive number of samples per step, got {batch}")
    if samples is not None and (isinstance(samples, bool) or int(samples) != samples or samples < 1):
        raise ValueError(f"--samples must be a positive number of data-free samples, got {samples!r}")
    if budget.steps is not None:
        n = (int(samples) if samples is not None else 16 * batch) if data_free else 0
        return Plan(int(budget.steps), batch, n, flops_per_sample, flops_per_input, main_flops)
    if not main_flops:
        raise ValueError("a --budget fraction needs the main's training FLOPs: its checkpoint records none (a model "
                         "not trained by `autoguidance train`); pass --main-flops F (e.g. 3 x forward FLOPs x images "
                         "seen), or give --steps N")
    total = budget.fraction * main_flops
    n = 0
    if data_free:
        n = int(samples) if samples is not None else int(input_share * total // flops_per_input)
        if n < batch:
            raise ValueError(f"a budget of {budget.fraction:g} of the main's training FLOPs buys {n} data-free samples "
                             f"(each costs {flops_per_input:.3g} FLOPs to draw), fewer than one batch of {batch}: "
                             "raise "
                             "--budget, lower --sample-steps or --batch, give --data, or set --samples")
    steps = int((total - n * flops_per_input) // (batch * flops_per_sample))
    if steps < 1:
        raise ValueError(f"a budget of {budget.fraction:g} of the main's training FLOPs ({total:.3g}) buys no training "
                         f"step of {batch} samples ({batch * flops_per_sample:.3g} FLOPs each"
                         + (f", after {n} data-free samples" if n else "") + "): raise --budget or lower --batch")
    return Plan(steps, batch, n, flops_per_sample, flops_per_input, main_flops)
