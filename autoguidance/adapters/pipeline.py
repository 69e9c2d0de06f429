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
    with guided_pipeline(pipe, "insitu", w=3.0, rule=ag.APG(eta=0.0, momentum=-0.5)):   # a combination rule
        ...

How it works. On entry every model the pipeline's loop calls (its experts: `pipe.unet`, else `pipe.transformer`
and `pipe.transformer_2` (Wan 2.2); `component=` names others) gets a `forward` that guides each call; nothing else
changes: `pipe.unet` stays the same object, so `pipe.save_pretrained` and `from_pretrained` round-trip inside and
after the block. Under accelerate's offload hooks (`pipe.enable_model_cpu_offload()`) the guided forward sits where
the hook keeps the model's own forward (`_old_forward`), so the hook still moves the model to its device first and
the pipeline's re-installation of its hooks after each call carries the guided forward over: every call of the
block is guided. On exit (also after an exception) the guided forward is removed wherever it sits and what was
there put back, so the model is exactly as found.

Each model call (positional or keyword arguments, `return_dict` either way) becomes a denoiser evaluation: the
sample and the timestep give EDM `(x, sigma)` (VP schedulers: DDPM, DDIM, Euler, DPM-Solver, ...) or flow time t
(flow-matching schedulers, and DPM-Solver / UniPC with flow sigmas); the per-row keyword arguments (text
embeddings, pooled projections, SDXL's `added_cond_kwargs`, class labels, ControlNet residuals, an inpainting
U-Net's mask and masked-image channels) are the labels. The method's passes run as the library's `Guided` plans
them (every pass of the same model in ONE batched call), are combined in x0 space and the result is returned in
the model's own output type: at fixed (x_t, t) the x0 prediction is affine in the model output (epsilon, v,
sample, flow velocity) with weights summing to one, so the x0 combination IS the output combination.
Learned-variance channels (DiT) come from the main pass.

**The pipeline's own CFG** is read from the pipeline's running call, never from the values of the model's inputs
(`adapters/pipeline_cfg.py`): its `do_classifier_free_guidance` (Flux: `do_true_cfg`), its scale, its latents.
When it batches `[uncond, cond]` (DiT: `[cond, uncond]`), the library takes over: the conditional half is the
batch, the unconditional half the input of the CFG pass, whose weight is the pipeline's scale (as the user meant
it), under `cfg_interval` if given. Every row is returned guided, so the pipeline's `u + s (c - u)` gives the
guided prediction back exactly. So `guidance_scale > 1` plus method `insitu` is CFG + in-situ as 3 passes in one
call (not 4 in two). Pipelines that call their model once per CFG branch (Flux's true CFG, Wan) are taken over
the same way: on the conditional call every pass runs in one batched call (the unconditional rows from the
pipeline's negative-prompt embeddings), and both branch calls return the guided prediction, the second without a
model call. The pipeline's `guidance_rescale` (SD, SDXL, LTX) is applied to the guided prediction after the
combination (`guidance_rescale`), under every method. Where the layout cannot be read, the call is refused with
one line naming `cfg_layout=`.

**Randomness** of perturbations is per image: from `seeds=` (one per image), else from the pipeline's `generator`
(a list: each generator's initial seed; one generator: its seed and the image index), else the image index; and
per step (the timestep). An image is the same alone or in a batch.

**Rules.** `rule=` (`autoguidance.rules`: rescale, APG, CFG-Zero*, TCFG, FDG, MAMBO-G) combines every pass of a
call, the pipeline's CFG taken over and the method's guide alike. A rule whose space is None (its default) acts on
the model's own output (`model_call.OutputSpace`: epsilon, v-prediction, sample or flow velocity), as diffusers'
guiders do; `space='x0' | 'eps' | 'v'` where it says. Stateful rules (APG's momentum) keep their state per image
row and per pipeline call (a new `SamplingRun` for each call of the pipeline: its running `__call__`) and per
expert (diffusers' modular Wan 2.2 gives each expert its own guider too); zero-init (CFG-Zero*) and step schedules
(`StepList`, `StepWindow`) read the step from the pipeline's loop (`pipeline_cfg.loop_step`). The pipeline's own
`guidance_rescale` is the rescale rule after the method's rule (`rules.with_rescale`): `rule=Rescale(phi)` beside it
is refused, a rule with an explicit space too.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ..guidance import Guided, Pass
from ..perturb import Dropout, Perturbation, check_not_compiled
from ..rng import SamplingRun, as_seeds
from ..rules import Linear, Rule, as_rule
from ..schedules import Interval, Schedule, ScheduleLike, as_schedule, check_weight
from .diffusers.model_call import GuidedModelCall, PipelineScale, check_guide_model
from .pipeline_cfg import (CFG_LAYOUTS, cfg_hint, loop_step, pipeline_frame, read_call, same_tensor,
                           seeds_from_generator)

__all__ = ["guided_pipeline", "GuidedPipeline", "PIPELINE_METHODS", "pipeline_model", "pipeline_experts",
           "make_pipeline_perturbation", "KEYLESS_PERTURBATIONS"]

#: method name -> what the guide pass is (the pipeline's own CFG is added whenever it batches [uncond, cond])
PIPELINE_METHODS = {
    "none": "no guide beyond the pipeline's own CFG (taken over by the library)",
    "cfg": "CFG from the pipeline's negative prompt; w (default: the pipeline's guidance_scale) and interval apply",
    "insitu": "the same model with dropout p switched on at `where` (default: its nn.Dropout modules)",
    "perturbation": "the same model under `perturbation` (any autoguidance.perturb.Perturbation)",
    "autoguidance": "a guide model of the same kind (`guide=`, smaller / shorter-trained)",
}
MODEL_COMPONENTS = ("unet", "transformer")

_INSIDE: contextvars.ContextVar[frozenset] = contextvars.ContextVar("autoguidance_pipeline_inside",
                                                                    default=frozenset())


def pipeline_experts(pipe, component: Union[None, str, Sequence[str]] = None) -> list[tuple[str, torch.nn.Module]]:
    """`[(name, module)]` of the models the pipeline's loop calls: `component` (a name or names), else `unet`,
    else every `transformer` component (`transformer`, `transformer_2`, ...: the experts of Wan 2.2)."""
    if component is not None:
        names = [component] if isinstance(component, str) else list(component)
        out = []
        for name in names:
            m = getattr(pipe, name, None)
            if not isinstance(m, torch.nn.Module):
                raise ValueError(f"{type(pipe).__name__} has no model {name!r} to guide: pass component=<the name of "
                                 "the model its loop calls> (e.g. 'unet', 'transformer')")
            if not _takes_timestep(m):
                raise ValueError(f"component {name!r} of {type(pipe).__name__} is a {type(m).__name__}, whose forward "
                                 "takes no timestep: pass component= the denoising model its loop calls (e.g. 'unet', "
                                 "'transformer')")
            out.append((name, m))
        return out
    if isinstance(getattr(pipe, "unet", None), torch.nn.Module):
        return [("unet", pipe.unet)]
    comps = getattr(pipe, "components", None) or {}
    names = [k for k in comps if k == "transformer" or (k.startswith("transformer_") and k[12:].isdigit())]
    out = [(k, getattr(pipe, k)) for k in names if isinstance(getattr(pipe, k, None), torch.nn.Module)]
    if not out and isinstance(getattr(pipe, "transformer", None), torch.nn.Module):
        out = [("transformer", pipe.transformer)]
    if not out:
        raise ValueError(f"{type(pipe).__name__} has no 'unet' or 'transformer' model to guide: pass "
                         "component=<the name of the model its loop calls>")
    return out


#: perturbations (by name) that draw no random numbers, so their images need no per-image seeds
KEYLESS_PERTURBATIONS = ("identityattention", "seg", "skiplayers")


def make_pipeline_perturbation(name: str, p, where: Optional[str] = None, layers=None,
                               blocks: Optional[str] = None) -> Perturbation:
    """A perturbation by name for a pipeline's model: the names of `autoguidance.methods.PERTURBATIONS` at strength
    `p` on sites `where`, and 'skiplayers' (skip-layer guidance: `layers`, block indices, in the block list
    `blocks`)."""
    if name == "skiplayers":
        from ..perturb import SkipLayers

        if not layers:
            raise ValueError("perturbation skiplayers needs the blocks to skip: layers=[indices] (CLI: --layers 7,8,9)")
        return SkipLayers(layers=list(layers), blocks=blocks)
    if layers or blocks is not None:
        raise ValueError(f"layers / blocks belong to perturbation skiplayers, not {name}: drop them or use "
                         "skiplayers")
    from ..methods import make_perturbation

    return make_perturbation(name, p, where)


def _takes_timestep(model: torch.nn.Module) -> bool:
    try:
        params = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        return True
    return any(k in params for k in ("timestep", "timesteps", "t"))


def pipeline_model(pipe, component: Optional[str] = None) -> tuple[str, torch.nn.Module]:
    """`(name, module)` of the (first) model the pipeline's loop calls: `component`, else `unet`, else
    `transformer`."""
    return pipeline_experts(pipe, component)[0]


class _Expert:
    """One model the pipeline calls, while guided: its `GuidedModelCall`, its passes, and where its guided forward
    sits (`slot`: 'forward', or accelerate's '_old_forward') with what was there (`saved`, None: nothing)."""

    def __init__(self, name: str, model: torch.nn.Module, call: GuidedModelCall):
        self.name, self.model, self.call = name, model, call
        self.guides: list = []
        self.slot: Optional[str] = None
        self.saved = None
        self.inner = None
        self.fn = None
        self.handle = None            # the forward pre-hook that reads each call before offload hooks move it
        self.read = None              # that reading, for the forward it precedes


class GuidedPipeline:
    """The context manager `guided_pipeline` returns (see the module docstring). Attributes while active:
    `denoiser` (the pipeline's (first) model as a denoiser, `D.model` the module), `experts` (the names of the
    models guided), `calls` (`(net, rows)` of every model call made, all experts), `last_rows`, `seeds` (settable
    between pipeline calls), `rule` (the combination rule)."""

    def __init__(self, pipe, method: Union[str, Callable[[Any], Guided]] = "none", *,
                 w:            Optional[ScheduleLike] = None,              # guide weight, a number or w(sigma)
                 p:            ScheduleLike = 0.1,                         # insitu: dropout probability (or p(sigma))
                 where=None,                                               # insitu: dropout sites (default nn.Dropout)
                 perturbation: Optional[Perturbation] = None,              # method 'perturbation'
                 guide=None,                                               # 'autoguidance': a model, or {expert: model}
                 interval:     Optional[tuple] = None,                     # (sigma_lo, sigma_hi]: w inside, 1 outside
                 cfg_interval: Optional[tuple] = None,                     # the same for the pipeline's CFG
                 seeds:        Optional[Sequence[int]] = None,             # one per image; None: from the generator
                 component:    Union[None, str, Sequence[str]] = None,     # default: unet, else every transformer
                 prediction_type: Optional[str] = None,                    # default: the scheduler's
                 cfg_layout:   Optional[str] = None,                       # default: read from the pipeline's call
                 max_batch:    Optional[int] = None,                       # rows per model call
                 rule:         Union[None, str, Rule] = None):             # how the passes combine (default linear)
        self.pipe = pipe
        experts = pipeline_experts(pipe, component)
        if cfg_layout is not None and cfg_layout not in CFG_LAYOUTS:
            raise ValueError(f"cfg_layout must be one of {', '.join(CFG_LAYOUTS)}, got {cfg_layout!r}")
        self.cfg_layout = cfg_layout
        self.method = method
        self.seeds = seeds
        self.max_batch = max_batch
        self.rule = as_rule(rule)
        self._rule_given = rule is not None
        guides_of = self._guide_models(experts, method, guide)
        self._experts: list[_Expert] = []
        self._calls: list = []
        for name, model in experts:
            g = guides_of.get(name)
            check_not_compiled(model, "guided_pipeline", f"pipe.{name}")
            inner = _own_forward(model)
            call = GuidedModelCall(model, pipe.scheduler, prediction_type=prediction_type,
                                   guide_models=[g] if g is not None else [], forward=inner, rule=self.rule)
            call.calls = self._calls                 # one record of calls for every expert, in call order
            if experts and name != experts[0][0]:    # calls of the other experts: 'main/transformer_2', ...
                for net in (call.net, *call.guide_nets):
                    net.name = f"{net.name}/{name}"
            ex = _Expert(name, model, call)
            ex.guides = self._build(ex, method, w=w, p=p, where=where, perturbation=perturbation,
                                    guide=g, interval=interval, cfg_interval=cfg_interval)
            call.rule = self.rule                    # a factory's Guided may have brought its own (`_build`)
            self._experts.append(ex)
        self.component, self.model = experts[0]
        self.call = self._experts[0].call
        self.denoiser = self.call.net
        self._guide_models_of = guides_of
        self._active = False
        self._token = object()
        self._pending = None          # a per-branch pipeline's guided output, for its unconditional call
        self._last = self._experts[0]
        self._frame = None            # the pipeline call (its running __call__'s frame) of the current run
        self._run: Optional[SamplingRun] = None    # that call's run: stateful rules' state, the step clock

    @property
    def experts(self) -> list[str]:
        return [ex.name for ex in self._experts]

    @property
    def seeds(self) -> Optional[torch.Tensor]:
        """One seed per image of the next pipeline call (None: from the pipeline's generator)."""
        return self._seeds

    @seeds.setter
    def seeds(self, seeds) -> None:
        self._seeds = as_seeds(seeds) if seeds is not None else None

    # -- the method --------------------------------------------------------------------------------------------
    def _guide_models(self, experts, method, guide) -> dict:
        """expert name -> its guide model (method 'autoguidance'): one model for one expert, or a mapping."""
        if method != "autoguidance" and not (callable(method) and not isinstance(method, str)):
            return {}
        if guide is None:
            return {}
        names = [n for n, _ in experts]
        models = dict(experts)
        if isinstance(guide, torch.nn.Module):
            if len(names) > 1:
                raise ValueError(f"{type(self.pipe).__name__} has {len(names)} experts ({', '.join(names)}): pass "
                                 "guide={" + ", ".join(f"{n!r}: <its guide model>" for n in names) + "}, one guide "
                                 "model per expert")
            check_guide_model(guide, models[names[0]], names[0])
            return {names[0]: guide}
        if isinstance(guide, dict):
            missing = [n for n in names if not isinstance(guide.get(n), torch.nn.Module)]
            extra = [k for k in guide if k not in names]
            if missing or extra:
                raise ValueError(f"guide= must map every expert of {type(self.pipe).__name__} ({', '.join(names)}) "
                                 f"to its guide model; missing {missing or 'none'}, unknown {extra or 'none'}")
            for n in names:
                check_guide_model(guide[n], models[n], n)
            return dict(guide)
        raise TypeError("method autoguidance needs guide= a model of the same kind as the pipeline's "
                        f"{names[0]} (loaded by you), or {{expert: model}}; got {type(guide).__name__}")

    def _build(self, ex: _Expert, method, *, w, p, where, perturbation, guide, interval, cfg_interval) -> list:
        D, model = ex.call.net, ex.model
        cfg_w = PipelineScale(*_interval(cfg_interval, "cfg_interval")) if cfg_interval is not None else None
        if callable(method) and not isinstance(method, str):
            g = method(D)
            if not isinstance(g, Guided):
                raise TypeError("a method factory must return a guided denoiser (ag.insitu(D, ...), ag.cfg(D, ...), "
                                f"...) built on the D it is given, got {type(g).__name__}")
            if g.main.net is not D or g.main.perturbation is not None:
                raise ValueError("the guided denoiser's main pass must be the plain D the factory is given")
            if type(g.rule) is not Linear:           # the factory's own rule, unless rule= says otherwise
                if self._rule_given and g.rule != self.rule:
                    raise ValueError(f"the method factory's guided denoiser combines with {g.rule.describe()} and "
                                     f"rule= says {self.rule.describe()}: give the rule in one place")
                self.rule = g.rule
            guides = [(gd.pass_, gd.w) for gd in g.guides]
            if not any(gd.pass_.drop_labels for gd in g.guides):
                guides.insert(0, (Pass(D, drop_labels=True), cfg_w))
            return self._map_guides(ex, guides)
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
                                f"{ex.name} (loaded by you), got {type(guide).__name__}")
            guides.append((Pass(ex.call.guide_nets[0]), wg))
        return guides

    def _map_guides(self, ex: _Expert, guides):
        out = []
        for pass_, w in guides:
            if pass_.net is not ex.call.net and not any(pass_.net is g for g in ex.call.guide_nets):
                raise ValueError("a method factory's passes must use the D it is given (for a guide model, use "
                                 "method='autoguidance' with guide=)")
            out.append((pass_, w))
        return out

    # -- entering and leaving ------------------------------------------------------------------------------------
    def __enter__(self) -> "GuidedPipeline":
        if self._active:
            raise RuntimeError("this guided_pipeline block is already active")
        for ex in self._experts:
            g = self._guide_models_of.get(ex.name)
            if g is not None:
                g.to(device=ex.model.device, dtype=ex.model.dtype)
        self._pending = None
        self._end_run()
        try:
            for ex in self._experts:
                self._install(ex)
        except BaseException:
            self._remove_all()
            raise
        self._active = True
        return self

    def _install(self, ex: _Expert) -> None:
        model, d = ex.model, ex.model.__dict__
        # accelerate's hooks (offload) call `module._old_forward` from the forward they install, and re-install
        # from `module.forward` after each pipeline call: the guided forward goes where the model's own forward is
        ex.slot = "_old_forward" if "_hf_hook" in d and "_old_forward" in d else "forward"
        ex.saved = d.get(ex.slot)
        ex.inner = ex.saved if ex.saved is not None else type(model).forward.__get__(model)
        token, inner = self._token, ex.inner

        @functools.wraps(inner)
        def forward(*args, **kwargs):
            if token in _INSIDE.get():
                return inner(*args, **kwargs)
            reset = _INSIDE.set(_INSIDE.get() | {token})
            try:
                out = self._guided(ex, args, kwargs)
                return inner(*args, **kwargs) if out is None else out
            finally:
                _INSIDE.reset(reset)

        def read_first(module, args, kwargs):
            if token not in _INSIDE.get():
                ex.read = self._read(ex, args, kwargs)

        ex.fn = forward
        d[ex.slot] = forward
        ex.handle = model.register_forward_pre_hook(read_first, with_kwargs=True)

    def __exit__(self, *exc) -> None:
        self.restore()

    def _remove_all(self) -> None:
        for ex in self._experts:
            if ex.handle is not None:
                ex.handle.remove()
                ex.handle = None
            ex.read = None
            if ex.fn is None:
                continue
            d = ex.model.__dict__
            for slot in ("forward", "_old_forward"):
                if d.get(slot) is not ex.fn:
                    continue
                if slot != ex.slot:               # moved there by accelerate: it holds the model's own forward
                    d[slot] = ex.inner
                elif ex.saved is not None:
                    d[slot] = ex.saved
                else:
                    del d[slot]
            ex.fn = None
        self._pending = None
        self._end_run()

    def restore(self) -> None:
        """Put every expert's forward back as it was (idempotent)."""
        if not self._active:
            return
        self._remove_all()
        self._active = False

    # -- one model call ------------------------------------------------------------------------------------------
    @property
    def calls(self) -> list:
        return self._calls

    @property
    def last_rows(self):
        return self._last.call.last_rows

    def _read(self, ex: _Expert, args, kwargs) -> tuple:
        """`(reading, sample, timestep, pipeline locals, pipeline frame)` of a model call as the pipeline made it."""
        frame = pipeline_frame(self.pipe)
        local = frame.f_locals if frame is not None else {}
        sample, timestep, _, rest = ex.call.bind(args, kwargs)
        return read_call(self.pipe, local, sample.shape[0], rest, self.cfg_layout), sample, timestep, local, frame

    def _run_of(self, frame) -> Optional[SamplingRun]:
        """The run of the pipeline call `frame` is (a new one when the call is new); None outside a pipeline call."""
        if frame is None:
            return None
        if frame is not self._frame:
            self._frame, self._run = frame, SamplingRun()
        return self._run

    def _end_run(self) -> None:
        self._frame = self._run = None        # the frame holds the call's locals: let them go

    def _guided(self, ex: _Expert, args, kwargs):
        # the reading of the call as the pipeline made it (before offload hooks move its tensors), from the
        # forward pre-hook; read here when the forward is reached without it
        read, ex.read = ex.read, None
        reading, sample, timestep, local, frame = read if read is not None else self._read(ex, args, kwargs)
        self._last = ex
        if reading.role == "uncond":
            return self._take_pending(ex, sample, timestep)
        if self.method == "none" and type(self.rule) is not Linear and reading.cfg is None:
            raise ValueError(f"method none combines only the pipeline's own CFG, and this call holds none, so rule "
                             f"{self.rule.describe()} would do nothing: {cfg_hint(self.pipe)}, or pick a method")
        g = self._guide_models_of.get(ex.name)
        if g is not None:
            dev = next(g.parameters()).device
            here = ex.call.bind(args, kwargs)[0].device
            if dev != here:                       # offload hooks moved the model to its execution device
                g.to(here)
        images = reading.images
        seeds = self.seeds
        if seeds is not None:
            if len(seeds) != images:
                raise ValueError(f"guided_pipeline got {len(seeds)} seeds for a pipeline call of {images} images: "
                                 "pass one seed per image (batch size x num_images_per_prompt), or set gp.seeds")
        else:
            seeds = seeds_from_generator(local.get("generator"), images)
        step = loop_step(self.pipe, local) if local else None
        out = ex.call.forward(args, kwargs, ex.guides, seeds=seeds, cfg=reading.cfg, max_batch=self.max_batch,
                              cfg_hint=cfg_hint(self.pipe), run=self._run_of(frame), step=step)
        if step is not None and step.call == step.calls - 1:
            self._end_run()                   # the loop's last model call: the next call of the pipeline is new
        self._pending = (ex.name, sample, _step_key(timestep), out) if reading.role == "cond" else None
        return out

    def _take_pending(self, ex: _Expert, sample, timestep):
        """The unconditional call of a per-branch pipeline: the guided output of its conditional call (the same
        sample and timestep), so the pipeline's `u + s (c - u)` with u = c gives it back; no model call."""
        pending, self._pending = self._pending, None
        if pending is None or pending[0] != ex.name or not same_tensor(pending[1], sample) \
                or pending[2] != _step_key(timestep):
            raise ValueError(f"{type(self.pipe).__name__} called its model for the negative prompt without the "
                             "matching call for the prompt first, which guided_pipeline cannot take over: pass "
                             "cfg_layout='none' and turn the pipeline's own CFG off")
        ex.call.last_rows = (sample.shape[0], 0)
        return pending[3]


def _own_forward(model: torch.nn.Module):
    """The model's own forward as the pipeline's calls reach it: accelerate's saved `_old_forward` under its
    hooks, else an instance `forward`, else the class's."""
    d = model.__dict__
    if "_hf_hook" in d and "_old_forward" in d:
        return d["_old_forward"]
    return d.get("forward")


def _step_key(timestep):
    t = torch.as_tensor(timestep) if timestep is not None else torch.zeros(())
    return tuple(t.detach().reshape(-1)[:1].cpu().tolist())


def _interval(iv, what: str = "interval") -> tuple[float, float]:
    """`(sigma_lo, sigma_hi)` as two floats, refused in one line when it is not a pair of numbers in order."""
    try:
        lo, hi = iv
        if isinstance(lo, bool) or isinstance(hi, bool):
            raise TypeError
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be (sigma_lo, sigma_hi), two numbers with w applied for sigma in (lo, hi], "
                         f"got {iv!r}") from None
    Interval(2.0, lo, hi)     # validates the range
    return lo, hi


def _weight(w: ScheduleLike, interval) -> Schedule:
    if interval is not None:
        if isinstance(w, Schedule):
            raise ValueError("give either a Schedule for w or interval=(sigma_lo, sigma_hi) with a number, not both")
        return Interval(check_weight(w), *_interval(interval))
    return as_schedule(w)


def guided_pipeline(pipe, method: Union[str, Callable] = "none", **options) -> GuidedPipeline:
    """`with guided_pipeline(pipe, method, w=..., seeds=...) as gp: pipe(...)`: see the module docstring and
    `GuidedPipeline` for the options."""
    return GuidedPipeline(pipe, method, **options)
