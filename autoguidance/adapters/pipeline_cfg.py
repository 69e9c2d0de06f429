"""What a diffusers pipeline's running `__call__` says about its own CFG at one call of its model.

Never read from the values of the model's inputs (two prompts with the same seed have equal latents; that is not
a CFG batch). The pipeline says it itself, through the local variables of its running `__call__` and its state:

- whether it does CFG now: Flux's `do_true_cfg` (`true_cfg_scale > 1` and a negative prompt), else the pipeline's
  `do_classifier_free_guidance` property, else the `do_classifier_free_guidance` local (PixArt, CogVideoX), else
  `guidance_scale > 1` for pipelines known to decide so (DiT);
- its scale: `true_cfg_scale` (Flux), the scale of the expert being called (`current_guidance_scale`, Wan 2.2),
  the pipeline's `_guidance_scale`, or the `guidance_scale` local; its `guidance_rescale` phi;
- how many images the call is for: the rows of its `latents`; a call of twice as many rows is the batched
  `[uncond, cond]` pair (DiT: `[cond, uncond]`);
- for pipelines that call their model once per CFG branch (Flux's true CFG, Wan): which branch a call is, from the
  identity of its tensors with the pipeline's `X` and `negative_X` locals (`prompt_embeds` /
  `negative_prompt_embeds`, `pooled_prompt_embeds`, `text_ids`), and the other branch's arguments;
- which step of its denoising loop the call is (`loop_step`): the loop's index `i` into its `timesteps` (checked
  against its `t`), else the one position of `t` in the scheduler's timesteps, in steps of the scheduler's `order`
  (Heun-type schedulers call the model twice per step).

Where this cannot be known, the call is refused with one line naming `cfg_layout=` (or what else to pass).
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Optional

import torch

from .diffusers.model_call import CallCFG

__all__ = ["CFG_LAYOUTS", "COND_FIRST", "CallReading", "read_call", "pipeline_frame", "pipeline_frame_locals",
           "seeds_from_generator", "cfg_hint", "same_tensor", "LoopStep", "loop_step"]

#: `cfg_layout=` values: how a call of the model holds the pipeline's CFG, when the pipeline cannot tell
CFG_LAYOUTS = {
    "uncond-cond": "every call has [uncond, cond] halves (the usual batched CFG)",
    "cond-uncond": "every call has [cond, uncond] halves",
    "none": "no call holds the pipeline's CFG (one row per image)",
}
#: pipelines that batch [cond, uncond] (the others batch [uncond, cond])
COND_FIRST = ("DiTPipeline",)
#: pipelines whose CFG is on exactly when their `guidance_scale` local is above 1, with no flag to read
SCALE_DECIDES = ("DiTPipeline",)


def pipeline_frame(pipe, depth: int = 2):
    """The frame of the pipeline's running `__call__` (the nearest frame whose `self` is `pipe`), or None when the
    model is called outside it."""
    f = sys._getframe(depth)
    for _ in range(60):
        if f is None:
            break
        if f.f_locals.get("self") is pipe:
            return f
        f = f.f_back
    return None


def pipeline_frame_locals(pipe, depth: int = 3) -> dict:
    """The local variables of the pipeline's running `__call__` (`pipeline_frame`), or {} outside it."""
    f = pipeline_frame(pipe, depth)
    return f.f_locals if f is not None else {}


@dataclasses.dataclass(frozen=True)
class LoopStep:
    """Where a model call sits in the pipeline's denoising loop: `step` of `steps` (the loop's steps: an img2img
    loop's are those it runs), and `call` of `calls` (the loop's model-calling iterations: `steps x order` for a
    scheduler of order 2, less one where its last step is first-order)."""

    step: int
    steps: int
    call: int
    calls: int


def _value(t) -> Optional[float]:
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() == 1 else None
    return float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else None


def loop_step(pipe, local: dict) -> Optional[LoopStep]:
    """The step of the pipeline's loop at this model call, from the locals of its running `__call__`: the loop's
    index `i` into its `timesteps` when `timesteps[i]` is its `t` (SD, SDXL, SD3, Flux, Wan, ...), else the one
    position of `t` in the scheduler's timesteps (DiT loops over them without an index); a scheduler of order k
    (Heun, KDPM2) makes k model calls per step. None where the call shows no loop, or `t` is not found once."""
    t = _value(local.get("t"))
    if t is None:
        return None
    order = getattr(getattr(pipe, "scheduler", None), "order", 1)
    order = order if isinstance(order, int) and not isinstance(order, bool) and order >= 1 else 1
    i, ts = local.get("i"), local.get("timesteps")
    call = calls = None
    if isinstance(i, int) and not isinstance(i, bool) and isinstance(ts, (torch.Tensor, list, tuple)) \
            and (not isinstance(ts, torch.Tensor) or ts.ndim == 1) and 0 <= i < len(ts) and _value(ts[i]) == t:
        call, calls = i, len(ts)
    else:
        ts = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
        if isinstance(ts, torch.Tensor) and ts.ndim == 1:
            hits = torch.nonzero(ts.detach().to(torch.float64).cpu() == t).flatten().tolist()
            if len(hits) == 1:
                call, calls = hits[0], len(ts)
    if call is None:
        return None
    return LoopStep(call // order, -(-calls // order), call, calls)


def seeds_from_generator(generator, n: int) -> Optional[torch.Tensor]:
    """Image seeds from a pipeline's `generator`: a list of n generators -> their initial seeds; one generator ->
    its seed mixed with the image index; None -> None."""
    from ..rng import mix_keys

    if isinstance(generator, (list, tuple)) and len(generator) == n:
        return torch.tensor([int(g.initial_seed()) for g in generator], dtype=torch.int64)
    if isinstance(generator, torch.Generator):
        return mix_keys(torch.arange(n, dtype=torch.int64), int(generator.initial_seed()) & ((1 << 62) - 1))
    return None


def cfg_hint(pipe) -> str:
    """How a user turns this pipeline's CFG on."""
    try:
        params = inspect.signature(type(pipe).__call__).parameters
    except (TypeError, ValueError):
        params = {}
    if "true_cfg_scale" in params:
        return f"call {type(pipe).__name__} with negative_prompt= and true_cfg_scale > 1"
    return f"call {type(pipe).__name__} with guidance_scale > 1"


def same_tensor(a, b) -> bool:
    """Whether `a` and `b` are one tensor: the same object, or the same memory seen the same way (accelerate's hooks
    re-wrap a call's tensors with `.to(device)`, which on a CPU 'cpu:0' makes a new object on the same storage)."""
    if a is b:
        return True
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.numel() > 0
            and a.data_ptr() == b.data_ptr() and a.device.type == b.device.type and a.shape == b.shape
            and a.dtype == b.dtype and a.stride() == b.stride())


def _number(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _does_cfg(pipe, local: dict) -> Optional[bool]:
    """Whether the pipeline does CFG in this call, as it says itself; None where it does not say."""
    if isinstance(local.get("do_true_cfg"), bool):
        return local["do_true_cfg"]
    try:
        v = getattr(pipe, "do_classifier_free_guidance")
        if isinstance(v, bool):
            return v
    except Exception:  # noqa: BLE001 - a property that needs state the pipeline has not set
        pass
    if isinstance(local.get("do_classifier_free_guidance"), bool):
        return local["do_classifier_free_guidance"]
    if type(pipe).__name__ in SCALE_DECIDES and _number(local.get("guidance_scale")) is not None:
        return _number(local["guidance_scale"]) > 1
    return None


def _scale(pipe, local: dict) -> Optional[float]:
    """The scale the pipeline's own CFG combination uses in this call."""
    if "do_true_cfg" in local:
        return _number(local.get("true_cfg_scale"))
    for v in (local.get("current_guidance_scale"), getattr(pipe, "_guidance_scale", None), local.get("guidance_scale")):
        if _number(v) is not None:
            return _number(v)
    return None


def _rescale(pipe, local: dict) -> float:
    for v in (getattr(pipe, "_guidance_rescale", None), local.get("guidance_rescale")):
        if _number(v) is not None:
            return _number(v)
    return 0.0


def _branch(local: dict, kwargs: dict, pipe) -> tuple[str, dict]:
    """`('cond', the unconditional call's differing arguments)` or `('uncond', {})` for a pipeline that calls its
    model once per CFG branch, from which of the pipeline's `X` / `negative_X` locals the call's tensors are."""
    roles, other = set(), {}
    for k, v in kwargs.items():
        if not isinstance(v, torch.Tensor):
            continue
        names = [name for name, lv in local.items() if same_tensor(lv, v)]
        pos = [nm for nm in names if isinstance(local.get("negative_" + nm), torch.Tensor)]
        neg = [nm for nm in names if nm.startswith("negative_") and isinstance(local.get(nm[9:]), torch.Tensor)]
        if pos and not neg:
            roles.add("cond")
            other[k] = local["negative_" + pos[0]]
        elif neg and not pos:
            roles.add("uncond")
        elif pos and neg:
            roles.add("both")
    if roles == {"cond"}:
        return "cond", other
    if roles == {"uncond"}:
        return "uncond", {}
    raise ValueError(f"{type(pipe).__name__} calls its model once per CFG branch, and this call's conditioning is "
                     "not told apart as its prompt's or its negative prompt's (prompt_embeds / negative_prompt_embeds)"
                     ": pass distinct prompt and negative-prompt embeddings, or cfg_layout='none' with "
                     "guidance off in the pipeline")


class CallReading:
    """One call read: `cfg` (a CallCFG or None), `images` (rows per pass), `role` ('cond' or 'uncond' for a
    per-branch pipeline's calls, else None)."""

    __slots__ = ("cfg", "images", "role")

    def __init__(self, cfg: Optional[CallCFG], images: int, role: Optional[str] = None):
        self.cfg, self.images, self.role = cfg, images, role


def read_call(pipe, local: dict, rows: int, kwargs: dict, layout: Optional[str] = None) -> CallReading:
    """How the model call of `rows` rows with keyword arguments `kwargs` holds the pipeline's CFG (see the module
    docstring). `local`: the pipeline's `__call__` locals ({} outside it: a direct call, no CFG). `layout`: the
    user's `cfg_layout`, which replaces the reading of the layout."""
    name = type(pipe).__name__
    if layout is not None:
        if layout not in CFG_LAYOUTS:
            raise ValueError(f"cfg_layout must be one of {', '.join(CFG_LAYOUTS)}, got {layout!r}")
        if layout == "none":
            return CallReading(None, rows)
        scale = _scale(pipe, local)        # None: only a guide with its own w (method 'cfg' with w=) can run
        if rows % 2:
            raise ValueError(f"cfg_layout={layout!r} needs calls of an even number of rows, got {rows}")
        return CallReading(CallCFG("batched", scale, layout == "cond-uncond", _rescale(pipe, local)), rows // 2)
    if not local:
        return CallReading(None, rows)      # called outside the pipeline's __call__: there is no pipeline CFG
    if local.get("skip_guidance_layers"):
        raise ValueError(f"{name}'s own skip-layer guidance (skip_guidance_layers=) cannot run inside "
                         "guided_pipeline: use method='perturbation' with autoguidance.perturb.SkipLayers(layers=...)")
    if local.get("use_dynamic_cfg"):
        raise ValueError(f"{name}'s dynamic CFG (use_dynamic_cfg=True) changes its scale after the model call, so "
                         "it cannot be taken over: pass use_dynamic_cfg=False (or w(sigma) as a schedule)")
    on = _does_cfg(pipe, local)
    latents = local.get("latents")
    images = int(latents.shape[0]) if isinstance(latents, torch.Tensor) and latents.ndim >= 1 else None
    if on is None or images is None:
        raise ValueError(f"cannot tell whether {name} holds its CFG in this model call ({rows} rows): pass "
                         f"cfg_layout= one of {', '.join(repr(k) for k in CFG_LAYOUTS)}")
    if not on:
        if rows != images:
            raise ValueError(f"{name} does no CFG, yet calls its model with {rows} rows for {images} images: pass "
                             f"cfg_layout= one of {', '.join(repr(k) for k in CFG_LAYOUTS)}")
        return CallReading(None, images)
    scale = _scale(pipe, local)
    if scale is None:
        raise ValueError(f"{name} does CFG but shows no guidance scale: pass cfg_layout='none' and use method "
                         "'cfg' with w=")
    if rows == 2 * images:
        return CallReading(CallCFG("batched", scale, name in COND_FIRST, _rescale(pipe, local)), images)
    if rows == images:
        role, other = _branch(local, kwargs, pipe)
        if local.get("negative_image_embeds") is not None:
            raise ValueError(f"{name} with an IP-adapter image and true CFG changes the adapter's input between "
                             "its two model calls, which cannot be taken over: drop one of the two")
        cfg = CallCFG("branch", scale, rescale=_rescale(pipe, local), uncond=other) if role == "cond" else None
        return CallReading(cfg, images, role)
    raise ValueError(f"{name} calls its model with {rows} rows for {images} images under CFG: pass cfg_layout= one "
                     f"of {', '.join(repr(k) for k in CFG_LAYOUTS)}")
