"""Flux: `FluxAttention` (identity attention, as diffusers' `Attention`; single blocks: one joint sequence; SEG on
its `to_q`, whose output in the single blocks is `[text, image]`), the double / single stream blocks (their inputs
in output order, as SD3's joint blocks, for `SkipLayers` and `BlockDrop`; their image stream, element 1, for
`TokenShuffle`), and the token grid of `FluxTransformer2DModel`, read from its `img_ids`."""
from __future__ import annotations

import torch

from ....perturb import (register_block_inputs, register_identity_attention, register_image_output,
                         register_query_projection, register_token_grid)
from .attention import _attention_identity, arg, query_projection
from .sd3 import _joint_block_inputs


def _query_prefix(attn, args, kwargs):
    """Text tokens before the image tokens in `to_q`'s output: none in a double block (`to_q` sees the image
    stream); in a single block (`encoder_hidden_states` None) `to_q` sees `[text, image]`: None, the image tokens are
    the last ones."""
    if arg(args, kwargs, 1, "encoder_hidden_states") is not None or not getattr(attn, "pre_only", False):
        return 0
    return None


def _flux_grid(model, args, kwargs):
    """`FluxTransformer2DModel`'s packed latent has one token per 2 x 2 latent patch, at the positions `img_ids`
    `[L, 3]` gives (0, row, column): the grid is (rows, columns) when the ids are exactly that grid, row-major."""
    ids = arg(args, kwargs, 4, "img_ids")
    if ids is None:
        raise ValueError("FluxTransformer2DModel was called without img_ids: the grid of its image tokens is unknown")
    ids = ids[0] if ids.ndim == 3 else ids
    h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    rows, cols = torch.meshgrid(torch.arange(h, device=ids.device), torch.arange(w, device=ids.device), indexing="ij")
    expect = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(ids.dtype)
    if ids.shape != expect.shape or not torch.equal(ids, expect):
        raise ValueError(f"FluxTransformer2DModel's img_ids ({ids.shape[0]} tokens) are not one row-major {h} x {w} "
                         "grid (reference-image tokens, as in Flux Kontext?): the image tokens lie on no single grid "
                         "for a perturbation on image tokens (SEG); choose another perturbation")
    return h, w


def register() -> None:
    try:
        from diffusers.models.transformers.transformer_flux import (FluxAttention, FluxSingleTransformerBlock,
                                                                    FluxTransformer2DModel, FluxTransformerBlock)
    except ImportError:  # pragma: no cover - older diffusers
        return
    register_identity_attention(FluxAttention, _attention_identity)
    register_query_projection(FluxAttention, query_projection, _query_prefix)
    register_token_grid(FluxTransformer2DModel, _flux_grid)
    for block in (FluxTransformerBlock, FluxSingleTransformerBlock):
        register_block_inputs(block, _joint_block_inputs)
        register_image_output(block, 1)
