"""LTX-Video (`LTXVideoTransformer3DModel`): `LTXAttention` (identity attention and SEG on the blocks'
self-attention `attn1`: the class does not say which of its instances cross-attend, the block's attribute name
does), `LTXVideoTransformerBlock` (one tensor out, called by keyword), and the token grid the model is told
(`num_frames`, `height`, `width` of its packed latent)."""
from __future__ import annotations

from ....perturb import (register_block_inputs, register_identity_attention, register_query_projection,
                         register_token_grid)
from .attention import arg, query_projection
from .dit import hidden_states_input
from .wan import self_attention_identity


def _is_attn1(attn, path: str) -> bool:
    """`LTXVideoTransformerBlock.attn1` is its self-attention, `attn2` its cross-attention (same class, and the same
    projection sizes in the released models)."""
    return path.rsplit(".", 1)[-1] == "attn1"


def _ltx_grid(model, args, kwargs):
    """`LTXVideoTransformer3DModel(hidden_states [N, F * H * W, C], ..., num_frames=F, height=H, width=W)`: the
    frames, rows and columns of its packed latent, row-major."""
    f, h, w = (arg(args, kwargs, i, name) for i, name in ((4, "num_frames"), (5, "height"), (6, "width")))
    if f is None or h is None or w is None:
        raise ValueError("LTXVideoTransformer3DModel was called without num_frames / height / width: the grid of its "
                         "image tokens is unknown")
    return int(f), int(h), int(w)


def register() -> None:
    from diffusers.models.transformers.transformer_ltx import (LTXAttention, LTXVideoTransformer3DModel,
                                                               LTXVideoTransformerBlock)

    register_identity_attention(LTXAttention, self_attention_identity, is_self_attention=_is_attn1)
    register_query_projection(LTXAttention, query_projection, is_self_attention=_is_attn1)
    register_block_inputs(LTXVideoTransformerBlock, hidden_states_input)
    register_token_grid(LTXVideoTransformer3DModel, _ltx_grid)
