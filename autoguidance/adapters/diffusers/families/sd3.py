"""SD3 / MMDiT: `JointTransformerBlock` returns `(encoder_hidden_states, hidden_states)`; its inputs in that
order for `SkipLayers` and `BlockDrop` (a skipped block passes both streams through), its image stream (element 1)
for `TokenShuffle`, and the token grid of `SD3Transformer2DModel` (the latent over the patch size). `patched_grid`
is shared by the transformers that patchify a `[N, C, H, W]` latent (DiT, PixArt, Sana)."""
from __future__ import annotations

from ....perturb import register_block_inputs, register_image_output, register_token_grid
from .attention import arg


def _joint_block_inputs(block, args, kwargs):
    """`JointTransformerBlock(hidden_states, encoder_hidden_states, temb)` returns `(encoder_hidden_states,
    hidden_states)` (encoder None when context_pre_only): its inputs in that order."""
    h, e = arg(args, kwargs, 0, "hidden_states"), arg(args, kwargs, 1, "encoder_hidden_states")
    return (None if getattr(block, "context_pre_only", False) else e, h)


def patched_grid(model, args, kwargs):
    """A transformer called on a latent `[N, C, H, W]` (`hidden_states`) that it cuts into p x p patches
    (`config.patch_size`): its image tokens lie on the (H / p) x (W / p) grid, row-major."""
    hidden = arg(args, kwargs, 0, "hidden_states")
    if hidden is None or hidden.ndim != 4:
        raise ValueError(f"{type(model).__name__} was called with hidden_states of shape "
                         f"{list(getattr(hidden, 'shape', []))}, not a latent [N, C, H, W]: its token grid is unknown")
    p = int(model.config.patch_size)
    return hidden.shape[2] // p, hidden.shape[3] // p


def register() -> None:
    try:
        from diffusers.models.attention import JointTransformerBlock
        from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
    except ImportError:  # pragma: no cover - older diffusers
        return
    register_block_inputs(JointTransformerBlock, _joint_block_inputs)
    register_image_output(JointTransformerBlock, 1)
    register_token_grid(SD3Transformer2DModel, patched_grid)
