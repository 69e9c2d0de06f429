"""diffusers behind the denoiser contract, and in-situ guidance inside a diffusers pipeline's own loop.

Needs the optional extra: `pip install autoguidance[diffusers]` (diffusers is imported only when used).

**DiffusersDenoiser** turns a `UNet2DModel` or `UNet2DConditionModel` and the noise schedule of its scheduler
(a discrete variance-preserving one with `alphas_cumprod`: DDPM, DDIM, PNDM, Euler, DPM-Solver, ...) into an EDM
denoiser `D(x, sigma, labels) -> x0_hat`, so every sampler and guidance method of this library runs on it.
The VP process `x_vp = sqrt(a_t) x0 + sqrt(1 - a_t) n` is the EDM process `x = x0 + sigma n` scaled
(Karras et al. 2022, Sec. 2 and App. C.1):

    sigma_t = sqrt((1 - a_t) / a_t),      x_vp = x / sqrt(1 + sigma^2)

A sigma between training steps maps to a fractional timestep, linear in log(sigma) between neighbouring steps
(`quantize=True` rounds to the nearest step instead). The network output becomes the x0 prediction by type:

    epsilon:        D = x - sigma eps
    v_prediction:   D = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) v       (v = sqrt(a) eps - sqrt(1-a) x0)
    sample:         D = output

Sample with sigmas inside the model's range: `sigmas_karras(n, D.sigma_min, D.sigma_max)`.

**Flow matching** (`FlowMatchEulerDiscreteScheduler`, SD3 / Flux / rectified flows): x_t = (1 - t) x0 + t n,
model timestep = t * num_train_timesteps, output by type (`prediction_type`):

    flow (velocity v = n - x0, the default):   x0 = x_t - t v
    epsilon:                                   x0 = (x_t - t eps) / (1 - t)      (t < 1)
    sample:                                    x0 = output

In EDM form x = x_t / (1 - t), sigma = t / (1 - t); `D.flow(x_t, t, labels)` gives the same x0 directly in t,
finite at t = 1 (pure noise), for `autoguidance.sampling.sample_flow_euler` (see its module docstring).
`flow_times(scheduler, num_steps, mu=None)` returns the scheduler's own flow times (shift, dynamic shift).

**Models**: `UNet2DModel`, `UNet2DConditionModel` (SDXL `added_cond_kwargs` too), `DiTTransformer2DModel`
(class labels; learned sigma: the variance channels are dropped from D), `SD3Transformer2DModel`, and other
diffusers models called `model(x, timestep=t, **conditioning)` (PixArt, Sana, video models with 5-D latents).
**Conditioning as data**: `labels` may be a mapping of the model's keyword arguments, batch first
(`{"encoder_hidden_states": ..., "pooled_projections": ...}`, `{"class_labels": ...}`, SDXL's `text_embeds` /
`time_ids` flat or inside `added_cond_kwargs`); guidance row-selects it, CFG takes `uncond_labels=`.

**Guidance inside a pipeline's own loop**: `GuidedModelCall` turns one call of a pipeline's model (positional or
keyword arguments) into a denoiser evaluation (`PipelineModelNet`: EDM (x, sigma) for VP schedulers, flow time t
for flow matching; the call's per-row keyword arguments are the labels), runs the method's passes as the
library's `Guided` plans them (passes of the same model in ONE batched call) and returns the guided prediction of
the model's own type. For epsilon (and v, and sample) prediction, the x0 prediction is an affine function of the
output with coefficients that depend only on (x_t, t), `x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)`, so with
weights summing to one

    x0(eps_bad + w (eps_good - eps_bad)) = x0_bad + w (x0_good - x0_bad)

and guiding the noise prediction at the same (x_t, t) is guiding D (flow: `x0 = x_t - t v`, the same argument).
Perturbations that move the input (`InputNoise`) are evaluated at (x_t', t'); their output is converted to x0 and
back to a prediction at (x_t, t). `autoguidance.adapters.guided_pipeline` (adapters/pipeline.py) installs it on
`pipe.unet` / `pipe.transformer` for a `with` block; `autoguidance.adapters.guider` offers it to modular pipelines.

**InSituGuidedUNet** (kept for compatibility; prefer `guided_pipeline`) goes in place of `pipe.unet`: the same
machinery with one degraded pass and no CFG take-over.

    pipe.unet = InSituGuidedUNet(pipe.unet, pipe.scheduler, w=3.0, seeds=range(4))
    images = pipe(batch_size=4, ...).images
    pipe.unet = pipe.unet.unet        # back to the plain unet
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import torch

from ..denoiser import as_sigma, check_labels, check_x, sigma_to_t, t_to_sigma, take_rows
from ..guidance import Guide, Guided, Pass
from ..perturb import Dropout, Perturbation, register_block_inputs, register_identity_attention, register_skip_path
from ..rng import as_seeds, mix_keys, noise_context
from ..schedules import ScheduleLike, as_schedule

__all__ = ["DiffusersDenoiser", "InSituGuidedUNet", "GuidedModelCall", "PipelineModelNet", "PipelineScale", "VPSchedule", "FlowSchedule", "flow_times", "register_rules"]

INSTALL_HINT = "pip install autoguidance[diffusers]"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FLOW_PREDICTION_TYPES = ("flow", "epsilon", "sample")
#: keyword arguments a model class needs in its conditioning (beyond x and the timestep)
REQUIRED_CONDITIONING = {
    "DiTTransformer2DModel": ("class_labels",),
    "SD3Transformer2DModel": ("encoder_hidden_states", "pooled_projections"),
    "FluxTransformer2DModel": ("encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids"),
    "PixArtTransformer2DModel": ("encoder_hidden_states",),
    "SanaTransformer2DModel": ("encoder_hidden_states",),
    "WanTransformer3DModel": ("encoder_hidden_states",),
}
_ADDED_COND = ("text_embeds", "time_ids", "image_embeds", "hint")


def _require_diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(f"the diffusers adapter needs the diffusers package: {INSTALL_HINT}") from e
    return diffusers


# -- the noise schedule ------------------------------------------------------------------------------------------

class VPSchedule:
    """The discrete VP schedule of a diffusers scheduler, as EDM noise levels: `sigmas[t] = sqrt((1 - a_t)/a_t)`,
    `[T]` float64, increasing in t. Maps sigma <-> (fractional) timestep."""

    def __init__(self, scheduler, quantize: bool = False):
        ac = getattr(scheduler, "alphas_cumprod", None)
        if ac is None:
            raise TypeError(f"{type(scheduler).__name__} has no alphas_cumprod: the adapter needs a discrete "
                            "variance-preserving scheduler (DDPM, DDIM, PNDM, Euler, DPM-Solver, ...), not a "
                            "flow-matching or continuous one")
        ac = torch.as_tensor(ac, dtype=torch.float64).flatten()
        sigmas = ((1 - ac) / ac).sqrt()
        if len(sigmas) < 2 or not bool(torch.isfinite(sigmas).all()) or bool((sigmas[1:] <= sigmas[:-1]).any()) \
                or float(sigmas[0]) <= 0:
            raise ValueError("the scheduler's alphas_cumprod must decrease strictly within (0, 1) so that sigma_t "
                             "= sqrt((1 - a_t)/a_t) increases with t")
        self.sigmas = sigmas
        self.log_sigmas = sigmas.log()
        self.quantize = quantize

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """`[N]` noise levels -> `[N]` float64 timesteps, linear in log sigma between steps, clamped to [0, T-1]."""
        ls = sigma.detach().to(torch.float64).log().cpu().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        hi = torch.searchsorted(self.log_sigmas, ls).clamp(1, len(self.sigmas) - 1)
        lo_v, hi_v = self.log_sigmas[hi - 1], self.log_sigmas[hi]
        t = (hi - 1) + (ls - lo_v) / (hi_v - lo_v)
        return (t.round() if self.quantize else t).to(sigma.device)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """`[N]` (fractional) timesteps -> `[N]` float64 sigmas, log-linear between steps."""
        t = t.detach().to(torch.float64).cpu().clamp(0, len(self.sigmas) - 1)
        lo = t.floor().long().clamp(max=len(self.sigmas) - 2)
        frac = t - lo
        return (self.log_sigmas[lo] * (1 - frac) + self.log_sigmas[lo + 1] * frac).exp()


class FlowSchedule:
    """A flow-matching scheduler's time axis: t in [0, 1], model timestep `t * num_train_timesteps`,
    EDM sigma = t / (1 - t). `sigma_min` / `sigma_max` bound the EDM samplers' range (t = 1/T to 1 - 1/T);
    sampling from t = 1 itself goes through `sample_flow_euler`."""

    def __init__(self, scheduler, model=None):
        config = getattr(scheduler, "config", None)
        self.num_train_timesteps = int(getattr(config, "num_train_timesteps", 1000) or 1000)
        # Flux-style models take t itself (they scale it by 1000 inside); SD3-style ones t * num_train_timesteps
        self.scale = 1.0 if type(model).__name__.startswith("Flux") else float(self.num_train_timesteps)
        if getattr(config, "invert_sigmas", False):
            raise ValueError("inverted flow schedules (invert_sigmas=True, Mochi) are not supported: use a "
                             "FlowMatchEulerDiscreteScheduler with invert_sigmas=False")

    @property
    def sigma_min(self) -> float:
        t = 1.0 / self.num_train_timesteps
        return t / (1 - t)

    @property
    def sigma_max(self) -> float:
        t = 1.0 - 1.0 / self.num_train_timesteps
        return t / (1 - t)

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.scale if self.scale != 1.0 else t


def flow_times(scheduler, num_steps: int, mu: Optional[float] = None, device="cpu") -> torch.Tensor:
    """The flow times `[num_steps + 1]` (ending in 0) a flow-matching scheduler visits: its own `set_timesteps`
    on a copy (shift, dynamic shift with `mu`, terminal stretch, ... included), for `sample_flow_euler`."""
    import copy

    if not type(scheduler).__name__.startswith("FlowMatch"):
        raise TypeError(f"flow_times needs a flow-matching scheduler (FlowMatchEulerDiscreteScheduler), got "
                        f"{type(scheduler).__name__}")
    sch = copy.deepcopy(scheduler)
    if mu is None:
        sch.set_timesteps(num_steps, device=device)
    else:
        sch.set_timesteps(num_steps, device=device, mu=mu)
    return sch.sigmas.to(torch.float32)


def _make_schedule(scheduler, quantize: bool, model=None):
    if getattr(scheduler, "alphas_cumprod", None) is not None:
        return VPSchedule(scheduler, quantize)
    if type(scheduler).__name__.startswith("FlowMatch"):
        return FlowSchedule(scheduler, model)
    raise TypeError(f"DiffusersDenoiser does not know {type(scheduler).__name__}: pass a discrete VP scheduler "
                    "with alphas_cumprod (DDPM, DDIM, Euler, DPM-Solver, ...) or FlowMatchEulerDiscreteScheduler")


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def output_to_x0(out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """A network output at EDM `(x, sigma)` (`x [N, ...]`, `sigma [N]`) -> the x0 prediction `D`."""
    s = _col(sigma, x)
    if prediction_type == "epsilon":
        return x - s * out
    if prediction_type == "v_prediction":
        return x / (1 + s**2) - s / (1 + s**2).sqrt() * out
    return out


def x0_to_output(x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Inverse of `output_to_x0`: the output of `prediction_type` that gives the x0 prediction `x0` at `(x, sigma)`."""
    s = _col(sigma, x)
    if prediction_type == "epsilon":
        return (x - x0) / s
    if prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x0 with sqrt(a) = 1/sqrt(1 + s^2)
        return ((x - x0) / s - s * x0) / (1 + s**2).sqrt()
    return x0


def _prediction_type(scheduler, prediction_type: Optional[str], flow: bool = False) -> str:
    if flow:
        pt = prediction_type or "flow"
        if pt not in FLOW_PREDICTION_TYPES:
            raise ValueError(f"a flow-matching model's prediction_type must be one of "
                             f"{', '.join(FLOW_PREDICTION_TYPES)}, got {pt!r}")
        return pt
    pt = prediction_type or getattr(getattr(scheduler, "config", None), "prediction_type", None) or "epsilon"
    if pt not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {pt!r}")
    return pt


# -- rules for perturbations on diffusers modules ---------------------------------------------------------------

def _attention_identity(attn, args, kwargs):
    """diffusers `Attention` with the attention map replaced by the identity: the processor's path with
    `softmax(q k^T)` -> I, i.e. to_out(to_v(h)) with the same norms, reshapes, residual and rescale."""
    hidden = args[0] if args else kwargs["hidden_states"]
    ehs = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
    if getattr(attn, "pre_only", False) and ehs is None:   # Flux single blocks: one joint sequence, no to_out
        return attn.to_v(hidden), 0
    if ehs is not None and ehs is not hidden and getattr(attn, "add_v_proj", None) is not None:
        # joint attention (SD3 / MMDiT): identity on the image-image part, as perturbed-attention guidance does on
        # MMDiT: each image token's output is its own value, to_out(to_v(h)); the text tokens' output (the second
        # element of the module's output) stays that of the exact attention.
        return attn.to_out[1](attn.to_out[0](attn.to_v(hidden))), 0
    if ehs is not None and ehs is not hidden:
        raise ValueError("identity attention needs self-attention, but this diffusers Attention was called with "
                         "encoder_hidden_states (cross-attention); choose the self-attention modules (attn1)")
    temb = args[3] if len(args) > 3 else kwargs.get("temb")
    residual = hidden
    if attn.spatial_norm is not None:
        hidden = attn.spatial_norm(hidden, temb)
    four_d = hidden.ndim == 4
    if four_d:
        n, c, h, w = hidden.shape
        hidden = hidden.view(n, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden = attn.group_norm(hidden.transpose(1, 2)).transpose(1, 2)
    out = attn.to_out[1](attn.to_out[0](attn.to_v(hidden)))
    if four_d:
        out = out.transpose(-1, -2).reshape(n, c, h, w)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor, 0


def _resnet_skip(block, input_tensor, temb=None, *args, **kwargs):
    """diffusers `ResnetBlock2D` without its residual branch: (resampled) input, shortcut conv, / output scale."""
    x = input_tensor
    if block.upsample is not None:
        x = block.upsample(x)
    elif block.downsample is not None:
        x = block.downsample(x)
    if block.conv_shortcut is not None:
        x = block.conv_shortcut(x)
    return x / block.output_scale_factor


def _joint_block_inputs(block, args, kwargs):
    """`JointTransformerBlock(hidden_states, encoder_hidden_states, temb)` returns `(encoder_hidden_states,
    hidden_states)` (encoder None when context_pre_only): its inputs in that order."""
    names = ("hidden_states", "encoder_hidden_states")
    h, e = [args[i] if len(args) > i else kwargs.get(names[i]) for i in range(2)]
    return (None if getattr(block, "context_pre_only", False) else e, h)


_REGISTERED = False


def register_rules() -> None:
    """Teach `IdentityAttention` diffusers' `Attention` and `BlockDrop` diffusers' `ResnetBlock2D` (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    _require_diffusers()
    _REGISTERED = True
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    register_identity_attention(Attention, _attention_identity,
                                is_self_attention=lambda m: not getattr(m, "is_cross_attention", False))
    register_skip_path(ResnetBlock2D, _resnet_skip)
    try:
        from diffusers.models.attention import JointTransformerBlock
    except ImportError:  # pragma: no cover - older diffusers
        JointTransformerBlock = None
    if JointTransformerBlock is not None:
        register_block_inputs(JointTransformerBlock, _joint_block_inputs)
    try:
        from diffusers.models.transformers.transformer_flux import (FluxAttention, FluxSingleTransformerBlock,
                                                                    FluxTransformerBlock)
    except ImportError:  # pragma: no cover - older diffusers
        return
    register_identity_attention(FluxAttention, _attention_identity)
    register_block_inputs(FluxTransformerBlock, _joint_block_inputs)
    register_block_inputs(FluxSingleTransformerBlock, _joint_block_inputs)


# -- the denoiser ------------------------------------------------------------------------------------------------

class DiffusersDenoiser(torch.nn.Module):
    """A diffusers `UNet2DModel` / `UNet2DConditionModel` as an EDM denoiser:
    `forward(x [N, C, H, W], sigma scalar or [N], labels None or [N, label_dim]) -> D [N, C, H, W]` (x's dtype).

    What `labels` rows mean (`labels_as`):
      'class'  one-hot rows -> class indices for the unet's class embedding (`num_class_embeds`); other class
               embedding types (identity, projection) get the rows as they are. A zero row means "no label":
               it becomes `null_class` (the index the model was trained with for dropped labels); with
               `null_class=None` a zero row is an error, as the model has no way to be unconditional.
      'text'   flattened `encoder_hidden_states`, `[N, S * cross_attention_dim]` (so CFG's passes batch); a zero
               row becomes `null_text` (e.g. the empty prompt's embedding) if given, else stays zero.
      'none'   the model is unconditional: labels must be None or zero rows.
      'auto'   'class' if the unet has a class embedding, else 'text' if it has cross-attention and no fixed
               `encoder_hidden_states` was given, else 'none'.
    A `UNet2DConditionModel` can instead get one fixed conditioning for every row: `encoder_hidden_states`
    `[S, dim]` or `[1, S, dim]`. Other unet inputs (`added_cond_kwargs`, ...) go in `unet_kwargs`, used as given
    for every call (so they must not have one row per sample: guidance batches rows).
    """

    def __init__(self,
        unet:                   torch.nn.Module,                  # a diffusers UNet2DModel / UNet2DConditionModel
        scheduler:              Any,                              # its scheduler: the alphas_cumprod to use
        *,
        prediction_type:        Optional[str] = None,             # epsilon, v_prediction, sample; None: scheduler's
        labels_as:              str = "auto",                     # 'auto', 'class', 'text' or 'none' (see above)
        null_class:             Optional[int] = None,             # class index for zero label rows (no label)
        encoder_hidden_states:  Optional[torch.Tensor] = None,    # fixed [S, dim] or [1, S, dim] for every row
        null_text:              Optional[torch.Tensor] = None,    # [S, dim] embedding for zero 'text' label rows
        quantize:               bool = False,                     # round t to the nearest training step
        unet_kwargs:            Optional[dict] = None,            # further keyword arguments of unet.forward
    ):
        super().__init__()
        register_rules()
        self.unet = unet
        self.schedule = _make_schedule(scheduler, quantize, unet)
        self.is_flow = isinstance(self.schedule, FlowSchedule)
        self.prediction_type = _prediction_type(scheduler, prediction_type, self.is_flow)
        self.unet_kwargs = dict(unet_kwargs or {})
        config = getattr(unet, "config", None)
        required = list(REQUIRED_CONDITIONING.get(type(unet).__name__, ()))
        if type(unet).__name__ == "UNet2DConditionModel":
            required.append("encoder_hidden_states")
            if getattr(config, "addition_embed_type", None) == "text_time":
                required += ["added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids"]
        self.required = tuple(k for k in required if k.partition(".")[0] not in self.unet_kwargs)
        self.cross_attention_dim = getattr(config, "cross_attention_dim", None) if config is not None else None
        has_class = getattr(unet, "class_embedding", None) is not None
        if encoder_hidden_states is not None:
            if self.cross_attention_dim is None:
                raise ValueError("encoder_hidden_states given, but this unet has no cross-attention")
            e = encoder_hidden_states
            e = e[None] if e.ndim == 2 else e
            if e.ndim != 3 or e.shape[0] != 1:
                raise ValueError(f"encoder_hidden_states must be [S, dim] or [1, S, dim] (one conditioning for every "
                                 f"row; per-row text goes in labels with labels_as='text'), got {list(e.shape)}")
            encoder_hidden_states = e
        if labels_as == "auto":
            labels_as = "class" if has_class else (
                "text" if self.cross_attention_dim is not None and encoder_hidden_states is None else "none")
        if labels_as not in ("class", "text", "none"):
            raise ValueError(f"labels_as must be 'auto', 'class', 'text' or 'none', got {labels_as!r}")
        if labels_as == "class" and not has_class:
            raise ValueError("labels_as='class' but the unet has no class embedding (num_class_embeds / "
                             "class_embed_type unset)")
        if labels_as == "text" and self.cross_attention_dim is None:
            raise ValueError("labels_as='text' but the unet has no cross-attention (cross_attention_dim unset)")
        self.labels_as = labels_as
        #: False for an unconditional model (CFG refuses it: its guide pass would equal its main pass)
        self.conditional = labels_as != "none" or bool(self.required)
        self.null_class = null_class
        self.register_buffer("encoder_hidden_states", encoder_hidden_states, persistent=False)
        self.register_buffer("null_text", null_text, persistent=False)

    @property
    def sigma_min(self) -> float:
        """The smallest noise level of the training schedule (t = 0)."""
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        """The largest noise level of the training schedule (t = T - 1); higher sigmas reuse t = T - 1."""
        return self.schedule.sigma_max

    def _class_labels(self, labels: Optional[torch.Tensor], n: int, device) -> Optional[torch.Tensor]:
        if self.labels_as != "class":
            return None
        if not isinstance(self.unet.class_embedding, torch.nn.Embedding):
            if labels is None:
                raise ValueError("this unet's class embedding needs labels rows (it is not an index embedding)")
            return labels
        if labels is None:
            labels = torch.zeros(n, 1, device=device)
        zero = (labels == 0).all(dim=1)
        onehot = ((labels == 0) | (labels == 1)).all(dim=1) & ((labels == 1).sum(dim=1) == 1)
        if not bool((zero | onehot).all()):
            raise ValueError("class labels must be one-hot rows (or zero rows for 'no label')")
        if bool(zero.any()) and self.null_class is None:
            raise ValueError("a zero label row (unconditional) needs the model's null class: pass null_class=<the "
                             "index the model was trained with for dropped labels>")
        idx = labels.argmax(dim=1)
        if self.null_class is not None:
            idx = torch.where(zero, torch.full_like(idx, int(self.null_class)), idx)
        return idx

    def _encoder_states(self, labels: Optional[torch.Tensor], n: int, dtype) -> Optional[torch.Tensor]:
        if self.encoder_hidden_states is not None:
            return self.encoder_hidden_states.expand(n, -1, -1).to(dtype)
        if self.labels_as != "text":
            return None
        dim = self.cross_attention_dim
        if labels is None:
            if self.null_text is None:
                raise ValueError("this unet needs text conditioning: pass labels [N, S * cross_attention_dim], "
                                 "null_text=, or a fixed encoder_hidden_states=")
            return self.null_text.expand(n, -1, -1).to(dtype)
        if labels.shape[1] % dim:
            raise ValueError(f"text labels must be flattened encoder_hidden_states [N, S * {dim}], got "
                             f"{list(labels.shape)}")
        ehs = labels.reshape(n, -1, dim).to(dtype)
        if self.null_text is not None:
            zero = (labels == 0).all(dim=1)
            ehs = torch.where(zero[:, None, None], self.null_text.reshape(1, -1, dim).to(dtype), ehs)
        return ehs

    @property
    def model(self) -> torch.nn.Module:
        """The wrapped diffusers model (U-Net or transformer; also `.unet`): where perturbations hook,
        `module=D.model`, as for the pipeline adapter's nets."""
        return self.unet

    def unet_inputs(self, x: torch.Tensor, sigma: torch.Tensor, labels: Optional[torch.Tensor]) -> tuple:
        """`(x_vp, t, kwargs)`: what the unet gets for EDM `(x, sigma, labels)`."""
        n = x.shape[0]
        dtype = getattr(self.unet, "dtype", x.dtype)
        kwargs = self._tensor_label_kwargs(labels, n, x.device, dtype)
        x_vp = x / _col((1 + sigma.to(torch.float64) ** 2).sqrt(), x)
        t = self.schedule.sigma_to_t(sigma).to(torch.float32)
        return x_vp.to(dtype), t, kwargs

    def _tensor_label_kwargs(self, labels: Optional[torch.Tensor], n: int, device, dtype) -> dict:
        """The model's keyword arguments for tensor labels (or None): the fixed `unet_kwargs`, class labels and
        encoder states as `labels_as` says; labels on an unconditional model must be None or zero rows."""
        if self.labels_as == "none" and labels is not None and bool((labels != 0).any()):
            raise ValueError("this model is unconditional: labels must be None or zero rows")
        kwargs = dict(self.unet_kwargs)
        class_labels = self._class_labels(labels, n, device)
        if class_labels is not None:
            kwargs["class_labels"] = class_labels
        ehs = self._encoder_states(labels, n, dtype)
        if ehs is not None:
            kwargs["encoder_hidden_states"] = ehs
        return kwargs

    def conditioning_kwargs(self, cond: Mapping, n: int) -> dict:
        """The model's keyword arguments from a conditioning mapping (SDXL's `text_embeds` / `time_ids` may be
        given flat: they go into `added_cond_kwargs`); checks that the keys the model needs are there."""
        kwargs = dict(self.unet_kwargs)
        added = dict(kwargs.get("added_cond_kwargs") or {})
        for k, v in cond.items():
            if k in _ADDED_COND:
                added[k] = v
            elif k == "added_cond_kwargs":
                added.update(v)
            else:
                kwargs[k] = v
        if added:
            kwargs["added_cond_kwargs"] = added
        if "encoder_hidden_states" not in kwargs and self.encoder_hidden_states is not None:
            kwargs["encoder_hidden_states"] = self.encoder_hidden_states.expand(n, -1, -1)
        self._check_required(kwargs)
        dtype = getattr(self.unet, "dtype", None)
        return _cast_floats(kwargs, dtype)

    def _check_required(self, kwargs: dict) -> None:
        for key in self.required:
            head, _, tail = key.partition(".")
            if kwargs.get(head) is None or (tail and tail not in kwargs[head]):
                raise ValueError(f"the conditioning misses {tail or head!r}, which {type(self.unet).__name__} needs: "
                                 f"pass labels={{{', '.join(repr(k.split('.')[-1]) for k in self.required)}: "
                                 "batch-first tensors}")

    def _run(self, x_in: torch.Tensor, timestep: torch.Tensor, kwargs: dict, like: torch.Tensor) -> torch.Tensor:
        """The model's output `[N, C, ...]` (learned-variance channels dropped)."""
        out = self.unet(x_in, timestep=timestep, return_dict=False, **kwargs)[0]
        c = like.shape[1] if like.ndim > 1 else None
        if out.shape != like.shape:
            if c is not None and out.shape[1] == 2 * c and out.shape[2:] == like.shape[2:]:
                out = out[:, :c]       # learned sigma (DiT, IF): guide the prediction, not the variance channels
            else:
                raise ValueError(f"{type(self.unet).__name__} returned {list(out.shape)} for an input of "
                                 f"{list(like.shape)}: expected the input's shape (or 2x its channels for learned "
                                 "variance); check in_channels / out_channels of the model")
        return out

    def forward(self, x: torch.Tensor, sigma, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_x(x)
        sigma = as_sigma(sigma, x)
        labels = check_labels(labels, x.shape[0])
        if self.is_flow:
            t = sigma_to_t(sigma.to(torch.float64))
            x_t = x.to(torch.float64) / _col(1 + sigma.to(torch.float64), x).to(torch.float64)
            return self._flow(x_t.to(torch.float32), t.to(torch.float32), labels).to(x.dtype)
        if isinstance(labels, Mapping):
            dtype = getattr(self.unet, "dtype", x.dtype)
            x_vp = (x / _col((1 + sigma.to(torch.float64) ** 2).sqrt(), x)).to(dtype)
            t = self.schedule.sigma_to_t(sigma).to(torch.float32)
            out = self._run(x_vp, t, self.conditioning_kwargs(labels, len(x)), x)
        else:
            x_vp, t, kwargs = self.unet_inputs(x, sigma, labels)
            self._check_required(kwargs)
            out = self._run(x_vp, t, kwargs, x)
        return output_to_x0(out.to(torch.float32), x.to(torch.float32), sigma.to(torch.float32),
                            self.prediction_type).to(x.dtype)

    def flow(self, x_t: torch.Tensor, t, labels=None) -> torch.Tensor:
        """The x0 prediction of a flow-matching model at flow time `t` (scalar or `[N]` in (0, 1]) from
        x_t = (1 - t) x0 + t n; finite at t = 1 (pure noise)."""
        if not self.is_flow:
            raise TypeError("flow(x_t, t) needs a flow-matching scheduler; this denoiser has a VP schedule: "
                            "call it in EDM form D(x, sigma, labels)")
        check_x(x_t, name="x_t")
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        t = t.expand(len(x_t)) if t.ndim == 0 else t
        if t.shape != (len(x_t),) or not bool(((t > 0) & (t <= 1)).all()):
            raise ValueError(f"flow time t must be a scalar or [{len(x_t)}] tensor in (0, 1], got {t.tolist()}")
        labels = check_labels(labels, len(x_t))
        return self._flow(x_t, t, labels).to(x_t.dtype)

    def _flow(self, x_t: torch.Tensor, t: torch.Tensor, labels) -> torch.Tensor:
        n = len(x_t)
        dtype = getattr(self.unet, "dtype", x_t.dtype)
        if isinstance(labels, Mapping):
            kwargs = self.conditioning_kwargs(labels, n)
        else:
            kwargs = self._tensor_label_kwargs(labels, n, x_t.device, dtype)
            self._check_required(kwargs)
        out = self._run(x_t.to(dtype), self.schedule.timestep(t), kwargs, x_t).to(torch.float32)
        xt, tc = x_t.to(torch.float32), _col(t, x_t).to(torch.float32)
        if self.prediction_type == "flow":
            return xt - tc * out
        if self.prediction_type == "epsilon":
            if bool((t >= 1).any()):
                raise ValueError("an epsilon-predicting flow model has no x0 prediction at t = 1 (x0 = (x_t - eps) / "
                                 "0): start sampling below t = 1, or use a velocity / sample model")
            return (xt - tc * out) / (1 - tc)
        return out


def _cast_floats(obj, dtype):
    if dtype is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, Mapping):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    return obj


# -- guidance inside a pipeline's own loop ------------------------------------------------------------------------

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
        self.record: Optional[list] = None          # learned-variance channels of every output, in call order

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
        if st.timestep_positional:     # as pipelines call: model(sample, t, ...), or by keyword
            out = self.model(x_in.to(st.dtype), timestep, **kwargs, return_dict=st.return_dict)
        else:
            kwargs[st.timestep_name] = timestep
            out = self.model(x_in.to(st.dtype), **kwargs, return_dict=st.return_dict)
        st.calls.append((self.name, len(x_in)))
        if st.out_type is None and st.return_dict and self.name == "main":
            st.out_type = type(out)
        pred = out[0]
        c = x_in.shape[1]
        if pred.shape[1] == 2 * c and pred.shape[2:] == x_in.shape[2:]:   # learned variance (DiT): guide the mean
            if self.record is not None:
                self.record.append(pred[:, c:])
            pred = pred[:, :c]
        elif pred.shape != x_in.shape:
            raise ValueError(f"{type(self.model).__name__} returned {list(pred.shape)} for an input of "
                             f"{list(x_in.shape)}: expected the input's shape (or 2x its channels)")
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


def flow_output_to_x0(out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """A flow model's output at `(x_t, t)` -> x0 (velocity v = n - x0: x0 = x_t - t v)."""
    tc = _col(t, x_t)
    if prediction_type == "flow":
        return x_t - tc * out
    if prediction_type == "epsilon":
        return (x_t - tc * out) / (1 - tc)
    return out


def flow_x0_to_output(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Inverse of `flow_output_to_x0` (t > 0)."""
    tc = _col(t, x_t)
    if prediction_type == "flow":
        return (x_t - x0) / tc
    if prediction_type == "epsilon":
        return (x_t - (1 - tc) * x0) / tc
    return x0


class _CallState:
    """What one model call of the pipeline fixes: argument names, constant arguments, timestep and levels."""

    def __init__(self, sample_name, timestep_name, const, timestep, levels, dtype, return_dict):
        self.sample_name, self.timestep_name = sample_name, timestep_name
        self.const, self.timestep, self.levels = const, timestep, levels
        self.dtype, self.return_dict = dtype, return_dict
        self.out_type = None
        self.calls: list = []


def _split_rows(obj: Mapping, n: int) -> tuple[dict, dict]:
    """Keyword arguments -> (per-row ones: tensors with `n` rows, as a labels mapping; the others, as they are).
    Lists / tuples of per-row tensors (ControlNet residuals) become mappings `{"#0": ..., "#1": ...}`."""
    rows, const = {}, {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == n:
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
    unchanged. Perturbation randomness: `keys(n, timestep)` per image."""

    def __init__(self, model: torch.nn.Module, scheduler, *, prediction_type: Optional[str] = None,
                 guide_models: Sequence[torch.nn.Module] = (), forward=None):
        register_rules()
        self.model = model
        self.schedule = _make_schedule(scheduler, False, model)
        self.is_flow = isinstance(self.schedule, FlowSchedule)
        self.prediction_type = _prediction_type(scheduler, prediction_type, self.is_flow)
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

    def forward(self, args, kwargs, guides, *, seeds=None, cfg=None, max_batch=None):
        """Guided output for one model call. `guides`: `[(Pass, Schedule or None)]`; `seeds`: `[N]` image seeds
        (None = row index); `cfg`: None, or `(cond_first, scale)` when the pipeline batched its own CFG."""
        sample, timestep, return_dict, rest = self.bind(args, kwargs)
        n = sample.shape[0]
        halves = None
        if cfg is not None:
            cond_first, scale = cfg
            m = n // 2
            halves = (slice(0, m), slice(m, n)) if cond_first else (slice(m, n), slice(0, m))
        N = n // 2 if halves else n
        sl = halves[0] if halves else slice(0, n)
        levels_all = self.levels(timestep, n, sample.device)
        rows_kw, const = _split_rows(rest, n)
        cond = take_rows(rows_kw, torch.arange(n, device=sample.device)[sl]) if rows_kw else None
        uncond = take_rows(rows_kw, torch.arange(n, device=sample.device)[halves[1]]) if halves and rows_kw \
            else None
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
                w = w.resolve(cfg[1]) if cfg is not None else w.resolve(2.0)
            if p.drop_labels:
                if cfg is None:
                    raise ValueError("CFG inside a pipeline uses the pipeline's own negative prompt: call the "
                                     "pipeline with guidance_scale > 1 (it then batches [uncond, cond])")
                sig_w = levels if not self.is_flow else t_to_sigma(levels)
                rows = torch.nonzero(w(sig_w.to(x.dtype)).to(x.dtype).to(x.device) != 1).flatten()
                p = dataclasses.replace(p, uncond_labels=take_rows(uncond, rows) if uncond is not None else None)
            built.append(Guide(p, w))
        sig_all = levels if not self.is_flow else t_to_sigma(levels)      # as Guided evaluates the weights
        if halves is None and not any(bool((g.w(sig_all) != 1).any()) for g in built):
            self.last_rows = (n, 0)
            return None                         # nothing to guide: the caller runs the model as it is
        for net in [self.net, *self.guide_nets]:
            net.state = state
        self.net.record = []
        try:
            G = Guided(Pass(self.net), built, max_batch)
            salt = step_salt(ts if ts is not None else torch.zeros(()))
            keys_seeds = as_seeds(seeds) if seeds is not None else torch.arange(N, dtype=torch.int64)
            with noise_context(keys_seeds, salt):
                if self.is_flow:
                    x0 = G.flow(x, level_cmp, cond)
                else:
                    x0 = G(x * _col((1 + levels**2).sqrt(), x), level_cmp, cond)
            record = self.net.record
        finally:
            for net in [self.net, *self.guide_nets]:
                net.state = None
            self.net.record = None
        self.calls.extend(state.calls)
        self.last_rows = (N, sum(r for _, r in state.calls) - N)
        if self.is_flow:
            out = flow_x0_to_output(x0, x, levels, self.prediction_type)
        else:
            x_edm = x * _col((1 + levels**2).sqrt(), x)
            out = x0_to_output(x0, x_edm, levels, self.prediction_type)
        out = out.to(sample.dtype)
        if record:
            out = torch.cat([out, torch.cat(record)[:N].to(out.dtype)], dim=1)
        if halves:
            out = torch.cat([out, out])
        if not return_dict:
            return (out,)
        if state.out_type is not None:
            return state.out_type(sample=out)
        return _Output(sample=out)


@dataclasses.dataclass(frozen=True)
class PipelineScale:
    """The weight of the pipeline's own CFG: its `guidance_scale` for sigma in (sigma_lo, sigma_hi], 1 outside;
    resolved at each call. `required`: a call without the pipeline's CFG batch is an error (method 'cfg')."""

    sigma_lo: float = 0.0
    sigma_hi: float = float("inf")
    required: bool = False

    def resolve(self, scale: float):
        from ..schedules import Interval

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


class InSituGuidedUNet(torch.nn.Module):
    """Compatibility drop-in for `pipe.unet` (in-situ guidance only): `GuidedModelCall` with one degraded pass,
    no CFG take-over (the pipeline's own CFG then combines in-situ-guided predictions), seeds tiled over the
    pipeline's batch. Prefer `autoguidance.adapters.guided_pipeline`, which keeps `pipe.unet` in place."""

    def __init__(self,
        unet:             torch.nn.Module,                   # the pipeline's unet
        scheduler:        Any,                               # the pipeline's scheduler (for sigma(t))
        w:                ScheduleLike = 3.0,                # guidance weight (in-situ paper's w' = 2.0), or w(sigma)
        perturbation:     Optional[Perturbation] = None,     # the degradation; None = Dropout(0.1) at nn.Dropout sites
        *,
        seeds:            Optional[Sequence[int]] = None,    # one seed per image; None = row index
        prediction_type:  Optional[str] = None,              # None = the scheduler's
    ):
        super().__init__()
        self.unet = unet
        self.perturbation = perturbation if perturbation is not None else Dropout(0.1)
        if not isinstance(self.perturbation, Perturbation):
            raise TypeError(f"perturbation must be an autoguidance.perturb.Perturbation, got "
                            f"{type(self.perturbation).__name__}")
        self.w = as_schedule(w)
        self.seeds = as_seeds(seeds) if seeds is not None else None
        call = GuidedModelCall(unet, scheduler, prediction_type=prediction_type)
        object.__setattr__(self, "_call", call)
        self.schedule = call.schedule
        self.prediction_type = call.prediction_type
        self._guides = [(Pass(call.net, perturbation=self.perturbation, module=unet), self.w)]

    @property
    def last_rows(self):
        return self._call.last_rows

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            unet = self.__dict__.get("_modules", {}).get("unet")
            if unet is None:
                raise
            return getattr(unet, name)

    def _seeds(self, n: int) -> torch.Tensor:
        seeds = self.seeds if self.seeds is not None else torch.arange(n, dtype=torch.int64)
        if n % len(seeds):
            raise ValueError(f"the unet got a batch of {n} rows for {len(seeds)} seeds: pass one seed per image "
                             "(the batch must be a multiple of the number of seeds)")
        return seeds.repeat(n // len(seeds))

    def _keys(self, n: int, t: torch.Tensor) -> torch.Tensor:
        """The perturbation's per-row keys for a batch of `n` rows at timestep `t`."""
        return mix_keys(self._seeds(n), step_salt(t))

    def forward(self, *args, **kwargs):
        sample = args[0] if args else kwargs.get(self._call.sample_name)
        seeds = self._seeds(sample.shape[0])
        out = self._call.forward(args, kwargs, self._guides, seeds=seeds)
        if out is None:
            return self.unet(*args, **kwargs)
        return out
