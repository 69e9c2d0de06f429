"""Guidance inside a pipeline's own loop: one call of the pipeline's model becomes a denoiser evaluation.

`GuidedModelCall` turns one call of a pipeline's model (positional or keyword arguments) into a denoiser
evaluation (`PipelineModelNet`: EDM (x, sigma) for VP schedulers, flow time t for flow matching; the call's
per-row keyword arguments are the labels), runs the method's passes as the library's `Guided` plans them (passes
of the same model in ONE batched call) and returns the guided prediction of the model's own type. For epsilon
(and v, and sample) prediction, the x0 prediction is an affine function of the output with coefficients that
depend only on (x_t, t), `x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)`, so with weights summing to one

    x0(eps_bad + w (eps_good - eps_bad)) = x0_bad + w (x0_good - x0_bad)

and guiding the noise prediction at the same (x_t, t) is guiding D (flow: `x0 = x_t - t v`, the same argument).
Perturbations that move the input (`InputNoise`) are evaluated at (x_t', t'); their output is converted to x0 and
back to a prediction at (x_t, t). `autoguidance.adapters.guided_pipeline` (adapters/pipeline.py) installs it on
`pipe.unet` / `pipe.transformer` for a `with` block; `autoguidance.adapters.guider` offers it to modular pipelines.

A combination rule other than the linear one (`autoguidance.rules`) is not affine, so its space matters: a rule
whose space is None (the default) acts on the model's own output (`OutputSpace`: epsilon, v-prediction, sample or
flow velocity, where diffusers applies its guiders); 'x0', 'eps', 'v' act where they say. The pipeline's
`guidance_rescale` is the rescale rule after the method's rule (`rules.with_rescale`), on the model output.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Optional, Sequence

import torch

from ...denoiser import sigma_to_t, t_to_sigma, take_rows
from ...guidance import Guide, Guided, Pass
from ...rng import SamplingRun, as_seeds, noise_context
from ...rules import Rule, as_rule, with_rescale
from ...rules.base import Space, space_name
from ...schedules import StepClock, StepList, StepWindow, as_schedule
from .families import register_rules
from .schedules import (FlowSchedule, _col, _make_schedule, _prediction_type, flow_output_to_x0, flow_x0_to_output,
                        output_to_x0, x0_to_output)

__all__ = ["GuidedModelCall", "PipelineModelNet", "PipelineScale", "CallCFG", "OutputSpace", "step_salt",
           "EXTRA_CHANNELS", "INTERFACE_KEYS", "check_guide_model"]


class PipelineModelNet:
    """A pipeline's model (`pipe.unet` / `pipe.transformer`, or a guide model of the same kind) as a denoiser for
    the model call being guided: `net(x, sigma, labels)` (VP, EDM coordinates) and `net.flow(x_t, t, labels)`
    (flow matching), both returning the x0 prediction in float64. `labels` is a mapping of the call's per-row
    keyword arguments; the call's other arguments (`state.const`) go to every call as they are. Rows at the
    call's own noise level get the pipeline's own timestep values (no sigma -> t round trip); rows moved by a
    perturbation (InputNoise, NoisierLevel) get the schedule's timestep for their level.
    Not a `torch.nn.Module`: perturbations hook into `net.model` (`module=D.model`)."""

    def __init__(self, model: torch.nn.Module, schedule, prediction_type: str, name: str = "main"):
        self.model = model
        self.schedule = schedule
        self.is_flow = isinstance(schedule, FlowSchedule)
        self.prediction_type = prediction_type
        self.name = name
        self.conditional = True
        self.state: Optional[_CallState] = None     # set by GuidedModelCall for the duration of one model call
        self.record: Optional[list] = None          # every raw output of the main model, in call order

    def _timestep(self, level: torch.Tensor):
        st = self.state
        eq = level.to(torch.float64)[:, None] == st.levels[None, :]
        if bool(eq.any(dim=1).all()):
            idx = eq.to(torch.int8).argmax(dim=1)
            if st.timestep.ndim == 0:
                return st.timestep
            return st.timestep[idx.to(st.timestep.device)]
        conv = (self.schedule.timestep(level.to(torch.float64)) if self.is_flow
                else self.schedule.sigma_to_t(level.to(torch.float64)))
        idx = eq.to(torch.int8).argmax(dim=1)
        orig = (st.timestep.expand(len(st.levels)) if st.timestep.ndim == 0 else st.timestep)[idx.to(
            st.timestep.device)].to(torch.float64)
        return torch.where(eq.any(dim=1).to(conv.device), orig.to(conv.device), conv).to(torch.float32)

    def _run(self, x_in: torch.Tensor, timestep, labels) -> torch.Tensor:
        st = self.state
        kwargs = _rebuild(_merge(st.const, labels or {}))
        extra = kwargs.pop(EXTRA_CHANNELS, None)
        model_in = x_in.to(st.dtype) if extra is None else torch.cat([x_in.to(st.dtype), extra.to(st.dtype)], dim=1)
        if st.timestep_positional:     # as pipelines call: model(sample, t, ...), or by keyword
            out = self.model(model_in, timestep, **kwargs, return_dict=st.return_dict)
        else:
            kwargs[st.timestep_name] = timestep
            out = self.model(model_in, **kwargs, return_dict=st.return_dict)
        st.calls.append((self.name, len(x_in)))
        if st.out_type is None and st.return_dict and self.record is not None:     # the main model's output class
            st.out_type = type(out)
        pred = out[0]
        if self.record is not None:
            self.record.append(pred)
        c = x_in.shape[1]
        if pred.shape[1] == 2 * c and pred.shape[2:] == x_in.shape[2:]:   # learned variance (DiT): guide the mean
            pred = pred[:, :c]
        elif pred.shape != x_in.shape:
            raise ValueError(f"{type(self.model).__name__} returned {list(pred.shape)} for an input of "
                             f"{list(model_in.shape)}: expected the sample's shape {list(x_in.shape)} (or 2x its "
                             "channels)")
        return pred.to(torch.float64)

    def __call__(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        if self.is_flow:
            s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(len(x))
            return self.flow(x.to(torch.float64) / _col(1 + s, x).to(torch.float64), sigma_to_t(s), labels)
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(len(x))
        x64 = x.to(torch.float64)
        x_vp = x64 / _col((1 + s**2).sqrt(), x64)
        out = self._run(x_vp, self._timestep(s), labels)
        return output_to_x0(out, x64, s, self.prediction_type)

    def flow(self, x_t: torch.Tensor, t, labels=None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=x_t.device).expand(len(x_t))
        out = self._run(x_t, self._timestep(t), labels)
        return flow_output_to_x0(out, x_t.to(torch.float64), t, self.prediction_type)


class _CallState:
    """What one model call of the pipeline fixes: argument names, constant arguments, timestep and levels."""

    def __init__(self, sample_name, timestep_name, const, timestep, levels, dtype, return_dict):
        self.sample_name, self.timestep_name = sample_name, timestep_name
        self.const, self.timestep, self.levels = const, timestep, levels
        self.dtype, self.return_dict = dtype, return_dict
        self.out_type = None
        self.calls: list = []


#: keyword arguments of diffusers models that are never per-row, whatever their first dimension (Flux's position
#: ids `[S, 3]`, rotary embeddings `[S, D]`): they go to every call as they are
NOT_PER_ROW = ("txt_ids", "img_ids", "image_rotary_emb", "rotary_emb")
#: the labels key that carries a sample's extra input channels (inpainting U-Nets: mask, masked-image latents)
EXTRA_CHANNELS = "__extra_channels__"


def _split_rows(obj: Mapping, n: int) -> tuple[dict, dict]:
    """Keyword arguments -> (per-row ones: tensors with `n` rows, as a labels mapping; the others, as they are).
    Lists / tuples of per-row tensors (ControlNet residuals) become mappings `{"#0": ..., "#1": ...}`."""
    rows, const = {}, {}
    for k, v in obj.items():
        if k in NOT_PER_ROW:
            const[k] = v
        elif isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == n:
            rows[k] = v
        elif isinstance(v, Mapping):
            r, c = _split_rows(v, n)
            if r:
                rows[k] = r
            if c or not r:
                const[k] = c
        elif isinstance(v, (list, tuple)) and v and all(isinstance(e, torch.Tensor) and e.ndim >= 1
                                                        and e.shape[0] == n for e in v):
            rows[k] = {f"#{i}": e for i, e in enumerate(v)}
        else:
            const[k] = v
    return rows, const


def _rebuild(obj):
    """Inverse of `_split_rows` on a merged mapping: `{"#0": a, "#1": b}` -> [a, b]; nested parts merged."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(k, str) and k.startswith("#") for k in obj):
            return [_rebuild(obj[f"#{i}"]) for i in range(len(obj))]
        return {k: _rebuild(v) for k, v in obj.items()}
    return obj


def _merge(const: Mapping, rows: Mapping) -> dict:
    """The constant and the per-row keyword arguments of a call as one mapping (nested mappings merged)."""
    out = dict(const)
    for k, v in rows.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


class OutputSpace(Space):
    """The model's own output type at a pipeline's model call, as a space rules act in (`rules.base.Space`): the x0
    prediction D of an EDM call `(x, sigma)` (VP schedulers) or a flow call `(x_t, t)` is mapped to what the model
    would output for it (`x0_to_output`, `flow_x0_to_output`): epsilon, diffusers' v-prediction
    `sqrt(a) eps - sqrt(1 - a) x0`, the sample itself, or the flow velocity `eps - x0`."""

    name = "output"

    def __init__(self, prediction_type: str, flow: bool):
        self.prediction_type, self.flow = prediction_type, bool(flow)

    def to(self, D, x, sigma, t):
        if t is not None:
            return flow_x0_to_output(D, x, t, self.prediction_type)
        return x0_to_output(D, x, sigma, self.prediction_type)

    def back(self, y, x, sigma, t):
        if t is not None:
            return flow_output_to_x0(y, x, t, self.prediction_type)
        return output_to_x0(y, x, sigma, self.prediction_type)

    def __eq__(self, other):
        return isinstance(other, OutputSpace) and (other.prediction_type, other.flow) == (self.prediction_type,
                                                                                          self.flow)

    def __hash__(self):
        return hash((OutputSpace, self.prediction_type, self.flow))

    def __repr__(self):
        return f"output({'flow ' if self.flow and self.prediction_type != 'flow' else ''}{self.prediction_type})"


class GuidedModelCall:
    """Guidance of one model (`pipe.unet` / `pipe.transformer`) inside a pipeline's own loop: `forward(*args,
    **kwargs)` takes the model's own arguments (positional or keyword), evaluates every pass of the method in as
    few batched model calls as the library's `Guided` plans (one, for passes of the same model), combines them in
    x0 space and returns the guided prediction in the model's own output type (epsilon / v / sample / flow
    velocity; learned-variance channels from the main pass).

    `guides` are `(Pass, w)` pairs over `self.net` (a `PipelineModelNet`); `w=None` is the pipeline's own
    guidance scale, for its CFG. When `cfg` says the pipeline batched `[uncond, cond]` (or `[cond, uncond]`),
    its conditional half is the batch and its unconditional half the input of every label-dropping pass; every
    row then returns the guided prediction, so the pipeline's own combination `u + s (c - u)` gives it back
    unchanged. For a pipeline that calls its model once per CFG branch (`CallCFG` layout 'branch'), the call is the
    conditional one and the unconditional rows come from `cfg.uncond`; the caller returns the same guided output
    for the branch's second call. Extra input channels (inpainting U-Nets) are per-row conditioning. Perturbation
    randomness: `keys(n, timestep)` per image.

    `rule` combines every pass (the pipeline's CFG and the method's guides), in the model's output space when its
    space is None (`OutputSpace`); the pipeline's `guidance_rescale` phi is the rescale rule after it
    (`rules.with_rescale`). A stateful rule's state and the step of zero-init and step schedules live in the `run`
    and `step` the caller passes per pipeline call (`forward`)."""

    def __init__(self, model: torch.nn.Module, scheduler, *, prediction_type: Optional[str] = None,
                 guide_models: Sequence[torch.nn.Module] = (), forward=None, rule: Optional[Rule] = None):
        register_rules()
        self.model = model
        self.schedule = _make_schedule(scheduler, False, model)
        self.is_flow = isinstance(self.schedule, FlowSchedule)
        self.prediction_type = _prediction_type(scheduler, prediction_type, self.is_flow)
        self.rule = as_rule(rule)
        self.output_space = OutputSpace(self.prediction_type, self.is_flow)
        self._guided: Optional[Guided] = None      # kept across calls: a stateful rule's state is keyed by it
        self.net = PipelineModelNet(model, self.schedule, self.prediction_type)
        self.guide_nets = [PipelineModelNet(g, self.schedule, self.prediction_type, name=f"guide{i}")
                           for i, g in enumerate(guide_models)]
        fwd = forward if forward is not None else type(model).forward.__get__(model)
        sig = inspect.signature(fwd)
        params = [q for q in sig.parameters.values() if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
        self.signature = sig
        self.sample_name = params[0].name
        names = [q.name for q in params]
        self.timestep_name = next((k for k in ("timestep", "timesteps", "t") if k in sig.parameters),
                                  names[1] if len(names) > 1 else "timestep")
        self.timestep_positional = len(names) > 1 and names[1] == self.timestep_name
        rd = sig.parameters.get("return_dict")
        self.return_dict_default = rd.default if rd is not None and rd.default is not inspect.Parameter.empty \
            else True
        self.calls: list = []          # (net name, rows) of every model call made, for inspection
        self.last_rows = (0, 0)        # (main rows, guide rows) of the last call

    def bind(self, args, kwargs) -> tuple:
        """`(sample, timestep, return_dict, other keyword arguments)` of a call of the model."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{type(self.model).__name__}: {e}") from e
        a = dict(bound.arguments)
        for name, q in self.signature.parameters.items():
            if q.kind == q.VAR_KEYWORD and name in a:
                a.update(a.pop(name))
            elif q.kind == q.VAR_POSITIONAL and name in a:
                if a.pop(name):
                    raise TypeError(f"{type(self.model).__name__}: unexpected extra positional arguments")
        sample = a.pop(self.sample_name)
        timestep = a.pop(self.timestep_name, None)
        return_dict = a.pop("return_dict", self.return_dict_default)
        return sample, timestep, return_dict, a

    def levels(self, timestep, n: int, device) -> torch.Tensor:
        """`[n]` float64 noise levels of the call: EDM sigma (VP) or flow time t."""
        t = torch.as_tensor(timestep, device=device).to(torch.float64)
        t = t.expand(n) if t.ndim == 0 else t.reshape(-1).expand(n) if t.numel() == 1 else t
        if self.is_flow:
            return (t / self.schedule.scale if self.schedule.scale != 1.0 else t).clamp(1e-12, 1.0)
        return self.schedule.t_to_sigma(t).to(device)

    def sample_channels(self, sample: torch.Tensor) -> int:
        """How many of the call's input channels are the sample: the model's `out_channels` when it takes more
        input channels than it predicts (inpainting U-Nets: 4 sample + 1 mask + 4 masked-image latents), else all
        (learned-variance models predict more channels than they take)."""
        config = getattr(self.model, "config", None)
        cin, cout = getattr(config, "in_channels", None), getattr(config, "out_channels", None)
        c = sample.shape[1] if sample.ndim > 1 else 0
        if isinstance(cin, int) and isinstance(cout, int) and 0 < cout < cin and c == cin and sample.ndim >= 4:
            return cout
        return c

    def call_rule(self, phi: float = 0.0) -> Rule:
        """The rule one call combines with: `rule`, then the pipeline's rescale of `phi` (0: none), in the model's
        output space where the rule's space is None. The pipeline's rescale acts on the model output, so a rule in
        another space (or a rescale rule of its own) is refused beside it."""
        rule = self.rule
        if phi > 0 and rule.space is not None:
            raise ValueError(f"the pipeline's guidance_rescale={phi:g} rescales the model output, and rule "
                             f"{rule.describe()} acts in {space_name(rule.space)}: drop the rule's space (the model "
                             "output is its default here) or the pipeline's guidance_rescale")
        return with_rescale(rule, phi).in_space(self.output_space)

    def _combiner(self, built, max_batch, rule: Rule) -> Guided:
        """The `Guided` of this call: the one of the previous call with this call's guides (so a stateful rule's
        state, keyed by it, carries over within the caller's run), or a new one when the rule or max_batch differ."""
        G = self._guided
        if G is None or G.rule != rule or G.max_batch != max_batch:
            G = self._guided = Guided(Pass(self.net), built, max_batch, rule=rule)
        else:
            G.guides = list(built)
        return G

    def forward(self, args, kwargs, guides, *, seeds=None, cfg=None, max_batch=None, cfg_hint=None,
                run: Optional[SamplingRun] = None, step=None):
        """Guided output for one model call. `guides`: `[(Pass, Schedule or None)]`; `seeds`: `[N]` image seeds
        (None = row index); `cfg`: None (the call holds no CFG of the pipeline), a `CallCFG`, or `(cond_first,
        scale)` for a batched one; `cfg_hint`: how to turn the pipeline's CFG on, for the error of a CFG pass
        without it; `run`: the pipeline call's `SamplingRun` (a stateful rule's state lives there), `step`: the
        call's `pipeline_cfg.LoopStep` (zero-init and step schedules read it). Returns the model's output type, or
        None where no guide is active and the pipeline's CFG is not taken over (the caller then runs the model as
        it is)."""
        cfg = CallCFG.of(cfg)
        rule = self.call_rule(cfg.rescale if cfg is not None else 0.0)
        if rule.stateful and run is None:
            raise ValueError(f"rule {rule.describe()} keeps a state per image across the steps of a pipeline call: "
                             "call the model from the pipeline's own __call__ inside guided_pipeline")
        if step is None and (rule.zero_init_steps or any(isinstance(w, (StepList, StepWindow)) for _, w in guides)):
            what = f"rule {rule.describe()}'s zero_init_steps" if rule.zero_init_steps else "a step schedule of w"
            raise ValueError(f"{what} needs the step of the pipeline's loop, which this model call does not show (no "
                             "loop index i over its timesteps): use a sigma schedule (Interval, Ramp) or "
                             "zero_init_steps=0")
        sample, timestep, return_dict, rest = self.bind(args, kwargs)
        n = sample.shape[0]
        idx = torch.arange(n, device=sample.device)
        halves = None
        if cfg is not None and cfg.layout == "batched":
            if n % 2:
                raise ValueError(f"a batched CFG call needs an even number of rows, got {n}")
            m = n // 2
            halves = (slice(0, m), slice(m, n)) if cfg.cond_first else (slice(m, n), slice(0, m))
        N = n // 2 if halves else n
        sl = halves[0] if halves else slice(0, n)
        c = self.sample_channels(sample)
        if c != sample.shape[1]:        # inpainting: the extra channels are per-row conditioning, never guided
            rest = {**rest, EXTRA_CHANNELS: sample[:, c:]}
            sample = sample[:, :c]
        levels_all = self.levels(timestep, n, sample.device)
        rows_kw, const = _split_rows(rest, n)
        cond = take_rows(rows_kw, idx[sl]) if rows_kw else None
        uncond = None
        if halves and rows_kw:
            uncond = take_rows(rows_kw, idx[halves[1]])
        elif cfg is not None and cfg.layout == "branch":
            uncond = self._branch_uncond(cfg.uncond, const, n)
        levels = levels_all[sl]
        ts = torch.as_tensor(timestep, device=sample.device) if timestep is not None else None
        ts_call = ts if ts is None or ts.ndim == 0 or ts.numel() != n else ts[sl]
        state = _CallState(self.sample_name, self.timestep_name, const, ts_call, levels, sample.dtype, return_dict)
        state.timestep_positional = self.timestep_positional
        x = sample[sl].to(torch.float64)
        level_cmp = levels.to(x.dtype)
        built = []
        for p, w in guides:
            if w is None or isinstance(w, PipelineScale):
                w = w if w is not None else PipelineScale()
                if cfg is None and not w.required:
                    continue
                if cfg is not None and cfg.scale is None:
                    raise ValueError("the pipeline shows no guidance scale for its CFG: give the CFG weight "
                                     "yourself (method 'cfg' with w=)")
                w = w.resolve(cfg.scale) if cfg is not None else w.resolve(2.0)
            if p.drop_labels:
                if cfg is None:
                    raise ValueError("CFG inside a pipeline uses the pipeline's own negative prompt, and this call "
                                     f"holds none: {cfg_hint or 'call the pipeline with guidance_scale > 1'}")
                sig_w = levels if not self.is_flow else t_to_sigma(levels)
                rows = torch.nonzero(w(sig_w.to(x.dtype)).to(x.dtype).to(x.device) != 1).flatten()
                p = dataclasses.replace(p, uncond_labels=take_rows(uncond, rows) if uncond is not None else None)
            built.append(Guide(p, w))
        sig_all = levels if not self.is_flow else t_to_sigma(levels)      # as Guided evaluates the weights
        salt = step_salt(ts if ts is not None else torch.zeros(()))
        if run is not None and step is not None:        # the step of this call, for zero-init and step schedules
            StepClock({salt: step.step}, step.steps).declare(run)
        zero_init = step is not None and step.step < rule.zero_init_steps
        if cfg is None and not zero_init and not any(bool((g.w(sig_all) != 1).any()) for g in built):
            self.last_rows = (n, 0)
            return None                         # nothing to guide: the caller runs the model as it is
        for net in [self.net, *self.guide_nets]:
            net.state = state
        self.net.record = []
        try:
            G = self._combiner(built, max_batch, rule)
            keys_seeds = as_seeds(seeds) if seeds is not None else torch.arange(N, dtype=torch.int64)
            with noise_context(keys_seeds, salt, run):
                if self.is_flow:
                    x0 = G.flow(x, level_cmp, cond)
                else:
                    x0 = G(x * _col((1 + levels**2).sqrt(), x), level_cmp, cond)
            # the main pass's raw output (its first N rows); none at a zero-init step, which computes no pass
            main = torch.cat(self.net.record)[:N] if self.net.record else None
        finally:
            for net in [self.net, *self.guide_nets]:
                net.state = None
            self.net.record = None
        self.calls.extend(state.calls)
        self.last_rows = (N, sum(r for _, r in state.calls) - N) if main is not None else (0, 0)
        if main is None and _predicts_variance(self.model, c):
            raise ValueError(f"rule {rule.describe()}'s zero-init computes no pass, and {type(self.model).__name__} "
                             "predicts its variance in the same call: use zero_init_steps=0")
        if self.is_flow:
            out = flow_x0_to_output(x0, x, levels, self.prediction_type)
        else:
            x_edm = x * _col((1 + levels**2).sqrt(), x)
            out = x0_to_output(x0, x_edm, levels, self.prediction_type)
        out = out.to(sample.dtype)
        if main is not None and main.shape[1] == 2 * c:  # learned variance: the main pass's variance channels
            out = torch.cat([out, main[:, c:].to(out.dtype)], dim=1)
        if halves:
            out = torch.cat([out, out])
        if not return_dict:
            return (out,)
        if state.out_type is not None:
            return state.out_type(sample=out)
        return _Output(sample=out)

    def _branch_uncond(self, uncond_kwargs: Mapping, const: Mapping, n: int) -> Optional[dict]:
        """The unconditional rows of a pipeline that calls its model once per CFG branch: the other branch's
        arguments (those that differ from this call's), per-row ones as labels. A constant argument that differs
        cannot share one batched call: refused."""
        rows, other = _split_rows(dict(uncond_kwargs), n)
        for k, v in other.items():
            mine = const.get(k)
            same = (torch.equal(v, mine) if isinstance(v, torch.Tensor) and isinstance(mine, torch.Tensor)
                    and v.shape == mine.shape else v is mine)
            if not same:
                raise ValueError(f"the pipeline's two CFG branches differ in {k!r}, which is not per-row, so they "
                                 "cannot run as one batched call: pass negative-prompt embeddings of the prompt's "
                                 "shape")
        return rows or None


#: config entries that fix what a diffusers model takes and returns: a guide model must agree on each
INTERFACE_KEYS = ("in_channels", "out_channels", "cross_attention_dim", "joint_attention_dim", "caption_channels",
                  "text_dim", "text_embed_dim", "pooled_projection_dim", "encoder_hid_dim", "addition_embed_type",
                  "projection_class_embeddings_input_dim", "addition_time_embed_dim", "class_embed_type",
                  "num_class_embeds", "num_embeds_ada_norm", "patch_size", "patch_size_t", "guidance_embeds")


def check_guide_model(guide: torch.nn.Module, model: torch.nn.Module, name: str = "model") -> None:
    """Refuse a guide model that cannot take the main model's call: another class, or another value of one of
    `INTERFACE_KEYS` (channels, text width, patch size, ...); the message names both."""
    if type(guide) is not type(model):
        raise ValueError(f"the guide is a {type(guide).__name__}, the pipeline's {name} a {type(model).__name__}: a "
                         "guide must be a model of the same class (a smaller or shorter-trained one)")
    gc, mc = getattr(guide, "config", None), getattr(model, "config", None)
    for key in INTERFACE_KEYS:
        a, b = getattr(gc, key, None), getattr(mc, key, None)
        if isinstance(a, list):
            a = tuple(a)
        if isinstance(b, list):
            b = tuple(b)
        if a != b:
            raise ValueError(f"the guide {type(guide).__name__} has {key} {a!r} where the pipeline's {name} has "
                             f"{b!r}: a guide must take the same inputs (same channels, text width, patch size)")


def _predicts_variance(model: torch.nn.Module, channels: int) -> bool:
    """Whether `model` outputs learned-variance channels beside its prediction (DiT: out_channels = 2 x in)."""
    cout = getattr(getattr(model, "config", None), "out_channels", None)
    return isinstance(cout, int) and not isinstance(cout, bool) and cout == 2 * channels


@dataclasses.dataclass(frozen=True)
class CallCFG:
    """What a pipeline's model call holds of the pipeline's own CFG.

    layout   'batched': the call's rows are `[uncond, cond]` halves (`[cond, uncond]` with `cond_first`);
             'branch': the pipeline calls its model once per CFG branch and this is the conditional call;
             `uncond` holds the unconditional call's arguments that differ (its negative-prompt embeddings)
    scale    the pipeline's CFG scale for this call (`guidance_scale`, Flux's `true_cfg_scale`, Wan 2.2's
             scale of the expert called); None where the pipeline shows none (`cfg_layout=` given)
    rescale  the pipeline's `guidance_rescale` phi (0: none): the rescale rule after the method's rule
    """

    layout: str
    scale: Optional[float]
    cond_first: bool = False
    rescale: float = 0.0
    uncond: Optional[Mapping] = None

    def __post_init__(self):
        if self.layout not in ("batched", "branch"):
            raise ValueError(f"CallCFG layout must be 'batched' or 'branch', got {self.layout!r}")

    @classmethod
    def of(cls, cfg) -> Optional["CallCFG"]:
        """None, a CallCFG, or `(cond_first, scale)` (a batched call) -> None or a CallCFG."""
        if cfg is None or isinstance(cfg, cls):
            return cfg
        cond_first, scale = cfg
        return cls("batched", float(scale), bool(cond_first))


@dataclasses.dataclass(frozen=True)
class PipelineScale:
    """The weight of the pipeline's own CFG: its `guidance_scale` for sigma in (sigma_lo, sigma_hi], 1 outside;
    resolved at each call. `required`: a call without the pipeline's CFG batch is an error (method 'cfg')."""

    sigma_lo: float = 0.0
    sigma_hi: float = float("inf")
    required: bool = False

    def resolve(self, scale: float):
        from ...schedules import Interval

        if self.sigma_lo == 0.0 and self.sigma_hi == float("inf"):
            return as_schedule(float(scale))
        return Interval(float(scale), self.sigma_lo, self.sigma_hi)


class _Output(dict):
    """`.sample` and `[0]` for a guided output whose model class was never called with return_dict=True."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError as e:
            raise AttributeError(k) from e

    def __getitem__(self, k):
        return dict.__getitem__(self, "sample") if k == 0 else dict.__getitem__(self, k)


def step_salt(timestep) -> int:
    """The integer that keys a step's perturbation randomness: the model timestep of the call's first row x 1024,
    rounded (the same for the context manager, the guider and the drop-in)."""
    t = torch.as_tensor(timestep).reshape(-1)
    return int(round(float(t[0]) * 1024)) if t.numel() else 0
