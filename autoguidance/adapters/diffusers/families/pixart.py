"""PixArt-alpha / -sigma (`PixArtTransformer2DModel`): `BasicTransformerBlock`s (`dit.py`) with diffusers'
`Attention` (`attention.py`); the token grid of the latent over the patch size."""
from __future__ import annotations

from ....perturb import register_token_grid
from .sd3 import patched_grid


def register() -> None:
    from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel

    register_token_grid(PixArtTransformer2DModel, patched_grid)
