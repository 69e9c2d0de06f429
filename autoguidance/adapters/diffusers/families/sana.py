"""Sana (`SanaTransformer2DModel`): `SanaTransformerBlock` returns one tensor (passed through by `SkipLayers` and
`BlockDrop`); its self-attention is diffusers' `Attention` with linear attention (`attention.py`: SEG blurs `to_q`'s
output, before the ReLU kernel); the token grid of the latent over the patch size."""
from __future__ import annotations

from ....perturb import register_block_inputs, register_token_grid
from .dit import hidden_states_input
from .sd3 import patched_grid


def register() -> None:
    from diffusers.models.transformers.sana_transformer import SanaTransformer2DModel, SanaTransformerBlock

    register_block_inputs(SanaTransformerBlock, hidden_states_input)
    register_token_grid(SanaTransformer2DModel, patched_grid)
