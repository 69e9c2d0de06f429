"""Wan 2.1 / 2.2 (`WanTransformer3DModel`): `WanAttention` (identity attention and SEG on its self-attention
`attn1`; `attn2` is the cross-attention), `WanTransformerBlock` (one tensor out: passed through by `SkipLayers` and
`BlockDrop`), and the token grid of the video latent `[N, C, T, H, W]` over the patch size `(p_t, p_h, p_w)`."""
from __future__ import annotations

from ....perturb import (register_block_inputs, register_identity_attention, register_query_projection,
                         register_token_grid)
from .attention import arg, query_projection, value_identity
from .dit import hidden_states_input


def self_attention_identity(attn, args, kwargs):
    """A self-attention module whose output is `to_out(attention(to_q(h), to_k(h), to_v(h)))` (norms and rotary
    embeddings on q and k only), with the attention map replaced by the identity: `to_out(to_v(h))`."""
    if arg(args, kwargs, 1, "encoder_hidden_states") is not None:
        raise ValueError(f"identity attention needs self-attention, but this {type(attn).__name__} was called with "
                         "encoder_hidden_states (cross-attention); choose the self-attention modules (attn1)")
    return value_identity(attn, arg(args, kwargs, 0, "hidden_states")), 0


def video_grid(model, args, kwargs):
    """A video transformer called on a latent `[N, C, T, H, W]` cut into `config.patch_size` = (p_t, p_h, p_w)
    patches: its image tokens lie on the (T / p_t, H / p_h, W / p_w) grid, row-major."""
    hidden = arg(args, kwargs, 0, "hidden_states")
    if hidden is None or hidden.ndim != 5:
        raise ValueError(f"{type(model).__name__} was called with hidden_states of shape "
                         f"{list(getattr(hidden, 'shape', []))}, not a video latent [N, C, T, H, W]: its token grid "
                         "is unknown")
    pt, ph, pw = (int(v) for v in model.config.patch_size)
    return hidden.shape[2] // pt, hidden.shape[3] // ph, hidden.shape[4] // pw


def _self(attn) -> bool:
    return not attn.is_cross_attention


def register() -> None:
    from diffusers.models.transformers.transformer_wan import (WanAttention, WanTransformer3DModel,
                                                               WanTransformerBlock)

    register_identity_attention(WanAttention, self_attention_identity, is_self_attention=_self)
    register_query_projection(WanAttention, query_projection, is_self_attention=_self)
    register_block_inputs(WanTransformerBlock, hidden_states_input)
    register_token_grid(WanTransformer3DModel, video_grid)
