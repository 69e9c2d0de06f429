"""Is this guide made for this main? One check for every place a guide meets a main (`ag.autoguidance`,
`ag.cfg_autoguidance`, `--gnet` of `autoguidance sample` through them; `guided_pipeline` may call it too):

    guide_mismatch(main, guide) -> None or a one-line reason

A guide must denoise the same data under the same conditioning as its main: the same sample shape (channels,
resolution), the same class count, the same text and pooled widths. Architecture (channels, blocks, heads) may differ:
that is the point of a guide. An unconditional guide (no class input) of a conditional main is allowed (it is CFG with
a separate unconditional net). Registered with the core's `autoguidance.denoiser.check_guide` on import, so the core
asks without importing this floor. Callables that are neither a library net nor a diffusers model pass unchecked.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

__all__ = ["TASK_KEYS", "signature", "guide_mismatch"]

#: per family / diffusers class: the config keys that fix the task (data shape, classes, text widths)
TASK_KEYS: dict[str, tuple[str, ...]] = {
    "edm2": ("img_channels", "img_resolution", "label_dim"),
    "UNet2DConditionModel": ("in_channels", "out_channels", "cross_attention_dim", "num_class_embeds",
                             "class_embed_type", "addition_embed_type", "projection_class_embeddings_input_dim",
                             "encoder_hid_dim", "addition_time_embed_dim"),
    "UNet2DModel": ("in_channels", "out_channels", "num_class_embeds", "class_embed_type"),
    "SD3Transformer2DModel": ("in_channels", "out_channels", "joint_attention_dim", "pooled_projection_dim"),
    "FluxTransformer2DModel": ("in_channels", "out_channels", "joint_attention_dim", "pooled_projection_dim",
                               "guidance_embeds"),
    "DiTTransformer2DModel": ("in_channels", "out_channels", "num_embeds_ada_norm"),
    "PixArtTransformer2DModel": ("in_channels", "out_channels", "caption_channels", "use_additional_conditions"),
    "WanTransformer3DModel": ("in_channels", "out_channels", "text_dim", "image_dim"),
}
#: keys that hold a class count: a guide without one (None / 0) is an unconditional guide, allowed
_CLASS_KEYS = ("label_dim", "num_class_embeds", "num_embeds_ada_norm")


def _model(x: Any):
    """The network behind a denoiser: a library net, a diffusers model, or the model of a DiffusersDenoiser."""
    return x.model if type(x).__name__ == "DiffusersDenoiser" else x


def signature(model: Any) -> Optional[tuple[str, dict]]:
    """`(family or class name, {task key: value})` of a library net or diffusers model; None for other callables."""
    m = _model(model)
    family = getattr(m, "family", None)
    config = getattr(m, "config", None)
    if family == "edm2" and isinstance(config, Mapping):
        return "edm2", {k: config.get(k) for k in TASK_KEYS["edm2"]}
    name = type(m).__name__
    if name in TASK_KEYS and config is not None and hasattr(m, "save_pretrained"):
        get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
        return name, {k: (list(v) if isinstance(v, tuple) else v) for k in TASK_KEYS[name] for v in [get(k, None)]}
    return None


def guide_mismatch(main: Any, guide: Any) -> Optional[str]:
    """None when `guide` may guide `main` (or either is not a model this check knows), else the reason, one line."""
    a, b = signature(main), signature(guide)
    if a is None or b is None:
        return None
    (fa, sa), (fb, sb) = a, b
    if fa != fb:
        return (f"the guide is a {fb} network and the main a {fa}: a guide must be the same kind of model as its main "
                "(make one with `autoguidance make-guide --main MAIN`)")
    diff = {k: (sa[k], sb[k]) for k in sa if sa[k] != sb[k]
            and not (k in _CLASS_KEYS and not sb[k])}           # an unconditional guide is allowed
    if diff:
        what = ", ".join(f"{k} {m} (main) vs {g} (guide)" for k, (m, g) in diff.items())
        return (f"this guide was made for another main: {what}; use a guide made for this main "
                "(autoguidance make-guide --main MAIN)")
    return None


def _register() -> None:
    from ..denoiser import register_guide_check

    register_guide_check(guide_mismatch)


_register()
