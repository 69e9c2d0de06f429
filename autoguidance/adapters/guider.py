"""In-situ / perturbation guidance as a diffusers guider (`diffusers.guiders.BaseGuidance`), for modular pipelines.

    from autoguidance.adapters.guider import AutoguidanceGuider

    guider = AutoguidanceGuider(w=3.0, perturbation="dropout", p=0.1, guidance_scale=5.0, seeds=[0, 1],
                                sigma_lo=0.28, sigma_hi=5.42)
    pipe.update_components(guider=guider)          # a modular pipeline (e.g. SDXL's); or guider.save_pretrained(DIR)

Per step the modular loop asks the guider for its batches and calls the model once per batch, with
`prepare_models` / `cleanup_models` around each call. The batches are: the conditional pass; the unconditional
pass (the negative prompt) when `guidance_scale > 1`; the degraded pass, conditioned like the main one (the
prompt, not the negative prompt), when `w(sigma) != 1`. For the degraded pass `prepare_models` installs the
perturbation on the model (the library's `autoguidance.perturb` hooks: every row degraded, per-image keys from
`seeds` and the timestep, the same keys as `guided_pipeline`), `cleanup_models` removes it. The combination, at
the same (x_t, t) for every pass (so in the model's own output type, which is affine in x0):

    pred = cond + (guidance_scale - 1) (cond - uncond) + (w - 1) (cond - bad)

or, with `rule=` (the same rule objects as everywhere, `autoguidance.rules`), that rule over the same predictions,
in the model's output type (the guider never sees the latents, so a rule with an explicit space is refused: use
`guided_pipeline` for x0 / eps / v). A stateful rule (APG's momentum) keeps its state per batch row from the
pipeline call's step 0 on; CFG-Zero*'s zero-init steps output zeros from the conditional pass alone (the modular
loop calls the model for every batch its guider asks for and gives it no latents, so the zero output takes its
shape from one pass; diffusers' guider computes every pass there).

`w` applies for sigma in (sigma_lo, sigma_hi] only, sigma the EDM noise level of the step, from the timestep and
the noise schedule in the config (`schedule="vp"` with the betas of the pipeline's scheduler, or `"flow"`:
t = timestep / num_train_timesteps, sigma = t / (1 - t)); `AutoguidanceGuider.for_scheduler(scheduler, ...)` copies
them. Perturbations that move the input (InputNoise, NoisierLevel) are not offered: they need the degraded pass
at another (x_t, t) than the modular loop gives it; use `guided_pipeline` for those.
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any, Optional

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from ..rng import as_seeds, mix_keys
from ..rules import Linear, as_rule, combine, rule_record
from ..schedules import Interval, as_schedule, check_weight
from .diffusers.model_call import step_salt
from .pipeline import KEYLESS_PERTURBATIONS, make_pipeline_perturbation
from .diffusers.schedules import VPSchedule, is_flow_scheduler

__all__ = ["AutoguidanceGuider"]

_INPUT_MOVING = ("inputnoise", "noisierlevel")


class AutoguidanceGuider(BaseGuidance):
    """In-situ / perturbation guidance (+ optional CFG) for diffusers' modular pipelines; see the module docstring.
    Configurable and serialisable as diffusers guiders are (`save_pretrained`, `from_pretrained`, `new(**kw)`)."""

    _input_predictions = ["pred_cond", "pred_uncond", "pred_bad"]

    @register_to_config
    def __init__(self,
                 w: float = 3.0,                          # weight of the degraded pass (1 = off; paper's w' + 1)
                 perturbation: str = "dropout",           # a name of autoguidance.methods.PERTURBATIONS
                 p: float = 0.1,                          # its strength (dropout p, attention scale, ...)
                 where: Optional[Any] = None,             # its sites (glob / paths); None: its default
                 layers: Optional[list] = None,           # perturbation 'skiplayers': block indices
                 guidance_scale: float = 1.0,             # CFG with the negative prompt (1 = no CFG pass)
                 sigma_lo: float = 0.0,                   # w only for sigma in (sigma_lo, sigma_hi]
                 sigma_hi: Optional[float] = None,        # None: no upper bound
                 seeds: Optional[list] = None,            # one per image; None: the row index
                 schedule: str = "vp",                    # 'vp' (betas below) or 'flow'
                 num_train_timesteps: int = 1000,
                 beta_start: float = 0.00085,
                 beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear",
                 start: float = 0.0,
                 stop: float = 1.0,
                 enabled: bool = True,
                 rule: Optional[Any] = None):             # a rule, its name or its record; None: linear
        super().__init__(start, stop, enabled)
        self.rule = as_rule(rule)
        if self.rule.space is not None:
            raise ValueError(f"AutoguidanceGuider combines the model outputs the modular loop hands it and never sees "
                             f"the latents, so rule {self.rule.describe()} cannot act in space "
                             f"{self.rule.space!r}: leave its space unset (the model output) or use guided_pipeline")
        # the config holds the rule as data (JSON), so save_pretrained / from_pretrained / new() round-trip it
        self.register_to_config(rule=None if type(self.rule) is Linear else rule_record(self.rule))
        self._rule_states: dict = {}
        if schedule not in ("vp", "flow"):
            raise ValueError(f"schedule must be 'vp' or 'flow', got {schedule!r}")
        if perturbation in _INPUT_MOVING:
            raise ValueError(f"perturbation {perturbation} moves the input, which a modular loop's guider cannot "
                             "do: use autoguidance.adapters.guided_pipeline")
        w = check_weight(w, "AutoguidanceGuider w")
        lo, hi = (_sigma(sigma_lo, "sigma_lo"), math.inf if sigma_hi is None else _sigma(sigma_hi, "sigma_hi"))
        self.w_schedule = Interval(w, lo, hi) if (lo, hi) != (0.0, math.inf) else as_schedule(w)
        self.guidance_scale = check_weight(guidance_scale, "AutoguidanceGuider guidance_scale")
        self.perturbation = make_pipeline_perturbation(
            perturbation, p, where if where is None or isinstance(where, str) else ",".join(where), layers)
        self._seeds = as_seeds(seeds, "AutoguidanceGuider seeds") if seeds is not None else None
        self._vp = None
        if schedule == "vp":
            from diffusers import DDPMScheduler

            self._vp = VPSchedule(DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                                                beta_end=beta_end, beta_schedule=beta_schedule))
        self._batches: list[str] = []
        self._rows = 0
        self._stack: Optional[ExitStack] = None

    @classmethod
    def for_scheduler(cls, scheduler, **kwargs) -> "AutoguidanceGuider":
        """A guider whose noise schedule is `scheduler`'s (VP betas, or flow matching: a FlowMatch scheduler, or
        one whose config says flow, as Sana's DPM-Solver and Wan's UniPC do)."""
        c = scheduler.config
        if is_flow_scheduler(scheduler):
            return cls(schedule="flow", num_train_timesteps=int(c.num_train_timesteps), **kwargs)
        return cls(schedule="vp", num_train_timesteps=int(c.num_train_timesteps), beta_start=float(c.beta_start),
                   beta_end=float(c.beta_end), beta_schedule=str(c.beta_schedule), **kwargs)

    # -- the step ------------------------------------------------------------------------------------------------
    def sigma(self) -> torch.Tensor:
        """`[1]` float64 EDM noise level of the current step."""
        t = torch.as_tensor(self._timestep if self._timestep is not None else 0).reshape(-1)[:1].to(torch.float64)
        if self._vp is not None:
            return self._vp.t_to_sigma(t)
        tf = (t / self.config.num_train_timesteps).clamp(1e-12, 1 - 1e-12)
        return tf / (1 - tf)

    def _in_range(self) -> bool:
        if not self._enabled:
            return False
        if self._num_inference_steps is not None:
            return int(self._start * self._num_inference_steps) <= self._step < int(
                self._stop * self._num_inference_steps)
        return True

    def set_state(self, step: int, num_inference_steps: int, timestep) -> None:
        super().set_state(step, num_inference_steps, timestep)
        if step == 0:                   # a new pipeline call: a stateful rule starts afresh
            self._rule_states = {}

    def _zero_init(self) -> bool:
        return self._enabled and self._step is not None and self._step < self.rule.zero_init_steps

    def _cfg_on(self) -> bool:
        return self._in_range() and not math.isclose(self.guidance_scale, 1.0)

    def _bad_on(self) -> bool:
        return self._in_range() and bool((self.w_schedule(self.sigma().to(torch.float32)) != 1).all())

    def _plan(self) -> list[str]:
        if self._zero_init():
            return ["pred_cond"]
        return ["pred_cond"] + (["pred_uncond"] if self._cfg_on() else []) + (["pred_bad"] if self._bad_on() else [])

    @property
    def num_conditions(self) -> int:
        return len(self._plan())

    @property
    def is_conditional(self) -> bool:
        return self._current() != "pred_uncond"

    def _current(self) -> str:
        plan = self._plan()
        i = max(self._count_prepared - 1, 0)
        return plan[i] if i < len(plan) else plan[-1]

    def keys(self, n: int) -> torch.Tensor:
        """Per-row keys of the degraded pass: `mix(seed, step salt)`, as `guided_pipeline` draws them. A modular
        pipeline does not give its guider the generators, so without `seeds` a random perturbation's masks would
        follow the batch position: refused for batches of more than one image."""
        if self._seeds is None and n > 1 and self.config.perturbation not in KEYLESS_PERTURBATIONS:
            raise ValueError(f"AutoguidanceGuider(perturbation={self.config.perturbation!r}) draws per-image random "
                             f"numbers and got a batch of {n} images without seeds, so an image would depend on its "
                             "batch position: pass seeds= one per image (guider.new(seeds=[...]))")
        seeds = self._seeds if self._seeds is not None else torch.arange(n, dtype=torch.int64)
        if len(seeds) != n:
            raise ValueError(f"AutoguidanceGuider has {len(seeds)} seeds for a batch of {n} images: pass one seed "
                             "per image (guider.new(seeds=[...]))")
        return mix_keys(seeds, step_salt(self._timestep if self._timestep is not None else 0))

    def prepare_inputs(self, data: dict) -> list:
        self._rows = _rows_of(data)
        index = {"pred_cond": 0, "pred_uncond": 1, "pred_bad": 0}
        return [self._prepare_batch(data, index[name], name) for name in self._plan()]

    def prepare_inputs_from_block_state(self, data, input_fields: dict) -> list:
        index = {"pred_cond": 0, "pred_uncond": 1, "pred_bad": 0}
        batches = [self._prepare_batch_from_block_state(input_fields, data, index[name], name)
                   for name in self._plan()]
        self._rows = _rows_of({k: getattr(batches[0], k, None) for k in input_fields})
        return batches

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        if self._current() != "pred_bad":
            return
        n = self._rows
        if n < 1:
            raise ValueError("AutoguidanceGuider could not tell the batch size from the guider inputs")
        sigma = self.sigma().to(torch.float32).expand(n)
        self._stack = ExitStack()
        self._stack.enter_context(self.perturbation.active(denoiser, torch.ones(n, dtype=torch.bool),
                                                           self.keys(n), sigma))

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def forward(self, pred_cond: torch.Tensor, pred_uncond: Optional[torch.Tensor] = None,
                pred_bad: Optional[torch.Tensor] = None) -> GuiderOutput:
        if self._zero_init():
            return GuiderOutput(pred=torch.zeros_like(pred_cond), pred_cond=pred_cond, pred_uncond=pred_uncond)
        names, us, ws = [], [], []
        if pred_uncond is not None:
            names.append("pred_uncond"), us.append(pred_uncond), ws.append(self.guidance_scale)
        if pred_bad is not None:
            names.append("pred_bad"), us.append(pred_bad)
            ws.append(float(self.w_schedule(self.sigma().to(torch.float32))[0]))
        if not us:
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
        states = [self._rule_states.get(k) for k in names]
        if self.rule.stateful and any(st is not None and st.shape != pred_cond.shape for st in states):
            raise ValueError(f"rule {self.rule.describe()} keeps a state per batch row, and the batch changed "
                             f"without a new pipeline call (step 0): {list(pred_cond.shape)}")
        pred, states = combine(self.rule, pred_cond, us, ws, states)
        if self.rule.stateful:
            self._rule_states.update(zip(names, states))
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)


def _sigma(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
        raise ValueError(f"AutoguidanceGuider {what} must be a noise level >= 0 (a number), got {v!r}")
    return float(v)


def _rows_of(data) -> int:
    for v in (data.values() if isinstance(data, dict) else []):
        v = v[0] if isinstance(v, tuple) else v
        if isinstance(v, torch.Tensor) and v.ndim >= 1:
            return int(v.shape[0])
    return 0
