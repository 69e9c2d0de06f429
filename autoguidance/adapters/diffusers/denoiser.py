"""`DiffusersDenoiser`: a diffusers model and its scheduler behind the denoiser contract `D(x, sigma, labels)`.

**Models**: `UNet2DModel`, `UNet2DConditionModel` (SDXL `added_cond_kwargs` too), `DiTTransformer2DModel`
(class labels; learned sigma: the variance channels are dropped from D), `SD3Transformer2DModel`, and other
diffusers models called `model(x, timestep=t, **conditioning)` (PixArt, Sana, video models with 5-D latents).
**Conditioning as data**: `labels` may be a mapping of the model's keyword arguments, batch first
(`{"encoder_hidden_states": ..., "pooled_projections": ...}`, `{"class_labels": ...}`, SDXL's `text_embeds` /
`time_ids` flat or inside `added_cond_kwargs`); guidance row-selects it, CFG takes `uncond_labels=`.
Sample with sigmas inside the model's range: `sigmas_karras(n, D.sigma_min, D.sigma_max)`; flow models also give
`D.flow(x_t, t, labels)`, finite at t = 1 (pure noise), for `autoguidance.sampling.sample_flow_euler`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

from ...denoiser import as_sigma, check_labels, check_x, sigma_to_t
from .families import register_rules
from .schedules import FlowSchedule, _col, _make_schedule, _prediction_type, output_to_x0

__all__ = ["DiffusersDenoiser", "REQUIRED_CONDITIONING"]

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
