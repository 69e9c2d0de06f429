"""Any guidance method of the library inside a diffusers pipeline's own loop, for the span of a `with` block.

    from autoguidance.adapters import guided_pipeline
    from autoguidance.perturb import SkipLayers

    with guided_pipeline(pipe, "insitu", w=3.0, p=0.1, seeds=[0, 1]):           # in-situ dropout guidance
        images = pipe(["a cat", "a dog"], guidance_scale=5.0).images           # + CFG: 3 passes, ONE model call
    with guided_pipeline(pipe, "autoguidance", w=2.0, guide=small_unet):        # two-model autoguidance
        ...
    with guided_pipeline(pipe, "perturbation", w=ag.Ramp(3, 1, 5.0, 0.1), perturbation=SkipLayers(layers=[2])):
        ...
    with guided_pipeline(pipe, "cfg", interval=(0.28, 5.42)):                   # CFG only for sigma in (lo, hi]
        ...
    with guided_pipeline(pipe, lambda D: ag.insitu(D, 3.0, 0.1, module=D.model)):   # any Guided over D
        ...

How it works. On entry the model the pipeline calls (`pipe.unet`, else `pipe.transformer`; `component=` names
another) gets an instance-level `forward` that guides each call; nothing else changes: `pipe.unet` stays the same
object, so `pipe.save_pretrained` and `from_pretrained` round-trip inside and after the block. On exit (also after
an exception) the instance `forward` is removed (or the one that was there, e.g. accelerate's offload hook, is put
back), so the model is exactly as found.

Each model call (positional or keyword arguments, `return_dict` either way) becomes a denoiser evaluation: the
sample and the timestep give EDM `(x, sigma)` (VP schedulers: DDPM, DDIM, Euler, DPM-Solver, ...) or flow time t
(`FlowMatchEulerDiscreteScheduler`); the per-row keyword arguments (text embeddings, pooled projections, SDXL's
`added_cond_kwargs`, class labels, ControlNet residuals) are the labels. The method's passes run as the library's
`Guided` plans them (every pass of the same model in ONE batched call), are combined in x0 space and the result
is returned in the model's own output type: at fixed (x_t, t) the x0 prediction is affine in the model output
(epsilon, v, sample, flow velocity) with weights summing to one, so the x0 combination IS the output combination.
Learned-variance channels (DiT) come from the main pass.

**The pipeline's own CFG.** When the pipeline batches `[uncond, cond]` (its `guidance_scale > 1`; DiT batches
`[cond, uncond]`), the library takes over: the conditional half is the batch, the unconditional half the input of
the CFG pass, whose weight is the pipeline's `guidance_scale` (as the user meant it), under `cfg_interval` if
given. Every row is returned guided, so the pipeline's `u + s (c - u)` gives the guided prediction back exactly.
So `guidance_scale > 1` plus method `insitu` is CFG + in-situ as 3 passes in one call (not 4 in two).
Pipelines that run their CFG passes as separate calls (Flux's true CFG) are guided per call, without take-over.

**Randomness** of perturbations is per image: from `seeds=` (one per image), else from the pipeline's `generator`
(a list: each generator's initial seed; one generator: its seed and the image index), else the image index; and
per step (the timestep). An image is the same alone or in a batch.
"""
from __future__ import annotations

import contextvars
import functools
import sys
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ..guidance import Guided, Pass
from ..perturb import Dropout, Perturbation
from ..rng import as_seeds, mix_keys
from ..schedules import Interval, Schedule, ScheduleLike, as_schedule, check_weight
from .diffusers.model_call import GuidedModelCall, PipelineScale

__all__ = ["guided_pipeline", "GuidedPipeline", "PIPELINE_METHODS", "pipeline_model"]

#: method name -> what the guide pass is (the pipeline's own CFG is added whenever it batches [uncond, cond])
PIPELINE_METHODS = {
    "none": "no guide beyond the pipeline's own CFG (taken over by the library)",
    "cfg": "CFG from the pipeline's negative prompt; w (default: the pipeline's guidance_scale) and interval apply",
    "insitu": "the same model with dropout p switched on at `where` (default: its nn.Dropout modules)",
    "perturbation": "the same model under `perturbation` (any autoguidance.perturb.Perturbation)",
    "autoguidance": "a guide model of the same kind (`guide=`, smaller / shorter-trained)",
}
#: pipelines that batch [cond, uncond] (the others batch [uncond, cond])
COND_FIRST = ("DiTPipeline",)
MODEL_COMPONENTS = ("unet", "transformer")

_INSIDE: contextvars.ContextVar[frozenset] = contextvars.ContextVar("autoguidance_pipeline_inside",
                                                                    default=frozenset())


def pipeline_model(pipe, component: Optional[str] = None) -> tuple[str, torch.nn.Module]:
    """`(name, module)` of the model the pipeline's loop calls: `component`, else `unet`, else `transformer`."""
    names = [component] if component else list(MODEL_COMPONENTS)
    for name in names:
        m = getattr(pipe, name, None)
        if isinstance(m, torch.nn.Module):
            return name, m
    raise ValueError(f"{type(pipe).__name__} has no {' or '.join(repr(n) for n in names)} model to guide: pass "
                     "component=<the name of the model its loop calls>")


def _pipeline_frame_locals(pipe) -> dict:
    """The local variables of the pipeline's running `__call__` (its `guidance_scale`, `generator`), or {}."""
    f = sys._getframe(2)
    for _ in range(40):
        if f is None:
            break
        if f.f_locals.get("self") is pipe:
            return f.f_locals
        f = f.f_back
    return {}


def _guidance_scale(pipe, local: dict) -> Optional[float]:
    for name in ("_guidance_scale",):
        v = getattr(pipe, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    v = local.get("guidance_scale")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _does_cfg(pipe, local: dict, scale: Optional[float]) -> bool:
    try:
        v = getattr(pipe, "do_classifier_free_guidance")
        if isinstance(v, bool):
            return v
    except Exception:  # noqa: BLE001 - a property that needs state the pipeline has not set
        pass
    return scale is not None and scale > 1


def seeds_from_generator(generator, n: int) -> Optional[torch.Tensor]:
    """Image seeds from a pipeline's `generator`: a list of n generators -> their initial seeds; one generator ->
    its seed mixed with the image index; None -> None."""
    if isinstance(generator, (list, tuple)) and len(generator) == n:
        return torch.tensor([int(g.initial_seed()) for g in generator], dtype=torch.int64)
    if isinstance(generator, torch.Generator):
        return mix_keys(torch.arange(n, dtype=torch.int64), int(generator.initial_seed()) & ((1 << 62) - 1))
    return None


class GuidedPipeline:
    """The context manager `guided_pipeline` returns (see the module docstring). Attributes while active:
    `denoiser` (the pipeline's model as a denoiser, `D.model` the module), `calls` (`(net, rows)` of every model
    call made), `last_rows`, `seeds` (settable between pipeline calls)."""

    def __init__(self, pipe, method: Union[str, Callable[[Any], Guided]] = "none", *,
                 w:            Optional[ScheduleLike] = None,              # guide weight, a number or w(sigma)
                 p:            ScheduleLike = 0.1,                         # insitu: dropout probability (or p(sigma))
                 where=None,                                               # insitu: dropout sites (default nn.Dropout)
                 perturbation: Optional[Perturbation] = None,              # method 'perturbation'
                 guide:        Optional[torch.nn.Module] = None,           # method 'autoguidance': the guide model
                 interval:     Optional[tuple] = None,                     # (sigma_lo, sigma_hi]: w inside, 1 outside
                 cfg_interval: Optional[tuple] = None,                     # the same for the pipeline's CFG
                 seeds:        Optional[Sequence[int]] = None,             # one per image; None: from the generator
                 component:    Optional[str] = None,                       # default: unet, else transformer
                 prediction_type: Optional[str] = None,                    # default: the scheduler's
                 max_batch:    Optional[int] = None):                      # rows per model call
        self.pipe = pipe
        self.component, self.model = pipeline_model(pipe, component)
        self.method = method
        self.seeds = as_seeds(seeds) if seeds is not None else None
        self.max_batch = max_batch
        self._guide_model = guide
        self._saved_forward = None
        self._active = False
        self._token = object()
        orig = self.model.__dict__.get("forward")
        self.call = GuidedModelCall(self.model, pipe.scheduler, prediction_type=prediction_type,
                                    guide_models=[guide] if guide is not None else [], forward=orig)
        self.denoiser = self.call.net
        self.guides = self._build(method, w=w, p=p, where=where, perturbation=perturbation, guide=guide,
                                  interval=interval, cfg_interval=cfg_interval)

    # -- the method --------------------------------------------------------------------------------------------
    def _build(self, method, *, w, p, where, perturbation, guide, interval, cfg_interval) -> list:
        D, model = self.call.net, self.model
        cfg_w = PipelineScale(*_interval(cfg_interval)) if cfg_interval is not None else None
        if callable(method) and not isinstance(method, str):
            g = method(D)
            if not isinstance(g, Guided):
                raise TypeError("a method factory must return a guided denoiser (ag.insitu(D, ...), ag.cfg(D, ...), "
                                f"...) built on the D it is given, got {type(g).__name__}")
            if g.main.net is not D or g.main.perturbation is not None:
                raise ValueError("the guided denoiser's main pass must be the plain D the factory is given")
            guides = [(gd.pass_, gd.w) for gd in g.guides]
            if not any(gd.pass_.drop_labels for gd in g.guides):
                guides.insert(0, (Pass(D, drop_labels=True), cfg_w))
            return self._map_guides(guides)
        if method not in PIPELINE_METHODS:
            raise ValueError(f"unknown method {method!r}: expected one of {', '.join(PIPELINE_METHODS)}, or a "
                             "function D -> Guided")
        if method == "cfg":
            if w is not None and cfg_interval is not None:
                raise ValueError("method cfg: give its interval as interval=, not cfg_interval=")
            wc = _weight(w, interval) if w is not None else PipelineScale(
                *_interval(interval or cfg_interval or (0.0, float("inf"))), required=True)
            return [(Pass(D, drop_labels=True), wc)]
        guides = [(Pass(D, drop_labels=True), cfg_w)]
        if method == "none":
            if w is not None or interval is not None:
                raise ValueError("method none has no guide, so w / interval would do nothing: pick a method")
            return guides
        if w is None:
            raise ValueError(f"method {method} needs a guidance weight w= (a number, 1 = no guidance, or a "
                             "Schedule such as ag.Ramp)")
        wg = _weight(w, interval)
        if method == "insitu":
            guides.append((Pass(D, perturbation=Dropout(p, where), module=model), wg))
        elif method == "perturbation":
            if not isinstance(perturbation, Perturbation):
                raise TypeError("method perturbation needs perturbation= an autoguidance.perturb.Perturbation "
                                f"(Dropout, SkipLayers, IdentityAttention, ...), got {type(perturbation).__name__}")
            guides.append((Pass(D, perturbation=perturbation, module=model), wg))
        elif method == "autoguidance":
            if not isinstance(guide, torch.nn.Module):
                raise TypeError("method autoguidance needs guide= a model of the same kind as the pipeline's "
                                f"{self.component} (loaded by you), got {type(guide).__name__}")
            guides.append((Pass(self.call.guide_nets[0]), wg))
        return guides

    def _map_guides(self, guides):
        out = []
        for pass_, w in guides:
            if pass_.net is not self.call.net and not any(pass_.net is g for g in self.call.guide_nets):
                raise ValueError("a method factory's passes must use the D it is given (for a guide model, use "
                                 "method='autoguidance' with guide=)")
            out.append((pass_, w))
        return out

    # -- entering and leaving ------------------------------------------------------------------------------------
    def __enter__(self) -> "GuidedPipeline":
        if self._active:
            raise RuntimeError("this guided_pipeline block is already active")
        model = self.model
        if self._guide_model is not None:
            self._guide_model.to(device=model.device, dtype=model.dtype)
        self._saved_forward = model.__dict__.get("forward")
        inner = self._saved_forward if self._saved_forward is not None else type(model).forward.__get__(model)
        token = self._token

        @functools.wraps(inner)
        def forward(*args, **kwargs):
            if token in _INSIDE.get():
                return inner(*args, **kwargs)
            reset = _INSIDE.set(_INSIDE.get() | {token})
            try:
                out = self._guided(args, kwargs)
                return inner(*args, **kwargs) if out is None else out
            finally:
                _INSIDE.reset(reset)

        model.forward = forward
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the model's `forward` back as it was (idempotent)."""
        if not self._active:
            return
        if self._saved_forward is not None:
            self.model.forward = self._saved_forward
        else:
            self.model.__dict__.pop("forward", None)
        self._active = False

    # -- one model call ------------------------------------------------------------------------------------------
    @property
    def calls(self) -> list:
        return self.call.calls

    @property
    def last_rows(self):
        return self.call.last_rows

    def _guided(self, args, kwargs):
        local = _pipeline_frame_locals(self.pipe)
        sample = self.call.bind(args, kwargs)[0]
        n = sample.shape[0]
        scale = _guidance_scale(self.pipe, local)
        cfg = None
        if (_does_cfg(self.pipe, local, scale) and scale is not None and n % 2 == 0
                and torch.equal(sample[: n // 2], sample[n // 2:])):
            cfg = (type(self.pipe).__name__ in COND_FIRST, scale)
        images = n // 2 if cfg else n
        seeds = self.seeds
        if seeds is not None:
            if len(seeds) != images:
                raise ValueError(f"guided_pipeline got {len(seeds)} seeds for a pipeline call of {images} images: "
                                 "pass one seed per image (batch size x num_images_per_prompt), or set gp.seeds")
        else:
            seeds = seeds_from_generator(local.get("generator"), images)
        return self.call.forward(args, kwargs, self.guides, seeds=seeds, cfg=cfg, max_batch=self.max_batch)


def _interval(iv) -> tuple[float, float]:
    lo, hi = (float(v) for v in iv)
    Interval(2.0, lo, hi)     # validates the range
    return lo, hi


def _weight(w: ScheduleLike, interval) -> Schedule:
    if interval is not None:
        if isinstance(w, Schedule):
            raise ValueError("give either a Schedule for w or interval=(sigma_lo, sigma_hi) with a number, not both")
        return Interval(check_weight(w), *interval)
    return as_schedule(w)


def guided_pipeline(pipe, method: Union[str, Callable] = "none", **options) -> GuidedPipeline:
    """`with guided_pipeline(pipe, method, w=..., seeds=...) as gp: pipe(...)`: see the module docstring and
    `GuidedPipeline` for the options."""
    return GuidedPipeline(pipe, method, **options)
