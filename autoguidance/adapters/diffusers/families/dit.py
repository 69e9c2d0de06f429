"""DiT (`DiTTransformer2DModel`) and the `BasicTransformerBlock` it shares with PixArt and the U-Nets'
`Transformer2DModel`: the block returns one tensor, which `SkipLayers` and `BlockDrop` pass through; the token grid
of the latent over the patch size. Its attention is diffusers' `Attention` (`attention.py`)."""
from __future__ import annotations

from ....perturb import register_block_inputs, register_token_grid
from .attention import arg
from .sd3 import patched_grid


def hidden_states_input(block, args, kwargs):
    """A transformer block called `block(hidden_states, ...)` that returns the new hidden states: its input."""
    return arg(args, kwargs, 0, "hidden_states")


def register() -> None:
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel

    register_block_inputs(BasicTransformerBlock, hidden_states_input)
    register_token_grid(DiTTransformer2DModel, patched_grid)
