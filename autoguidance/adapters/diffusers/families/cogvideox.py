"""CogVideoX (`CogVideoXTransformer3DModel`): its self-attention is diffusers' `Attention` with a processor that
attends over `[text, video]` as one sequence and returns `(video, text)` (identity attention on the video tokens,
SEG on the video queries: `attention.py`); `CogVideoXBlock` returns `(hidden_states, encoder_hidden_states)` (its
inputs in that order for `SkipLayers` and `BlockDrop`, its video stream, element 0, for `TokenShuffle`); its patch
embedding convolves every frame as its own batch row (CogVideoX 1.0), which default sites leave out; the token grid
of the latent `[N, F, C, H, W]` over the patch sizes."""
from __future__ import annotations

from ....perturb import register_block_inputs, register_folded_batch, register_image_output, register_token_grid
from .attention import arg, register_joint_processor


def _block_inputs(block, args, kwargs):
    """`CogVideoXBlock(hidden_states, encoder_hidden_states, temb, ...)` returns `(hidden_states,
    encoder_hidden_states)`: its inputs in that order."""
    return arg(args, kwargs, 0, "hidden_states"), arg(args, kwargs, 1, "encoder_hidden_states")


def _folded(patch_embed) -> list:
    """CogVideoX 1.0's patch embedding (`patch_size_t` None) runs its `proj` convolution on `[N * F, C, H, W]`."""
    return ["proj"] if patch_embed.patch_size_t is None else []


def _cogvideox_grid(model, args, kwargs):
    """The latent `[N, F, C, H, W]` in p x p patches (and p_t frames per token with `patch_size_t`): frames, rows,
    columns, row-major (the video tokens follow the text tokens in every attention call)."""
    hidden = arg(args, kwargs, 0, "hidden_states")
    if hidden is None or hidden.ndim != 5:
        raise ValueError(f"CogVideoXTransformer3DModel was called with hidden_states of shape "
                         f"{list(getattr(hidden, 'shape', []))}, not a latent [N, F, C, H, W]: its token grid is "
                         "unknown")
    p, pt = int(model.config.patch_size), model.config.patch_size_t
    f = hidden.shape[1] if pt is None else hidden.shape[1] // int(pt)
    return f, hidden.shape[3] // p, hidden.shape[4] // p


def register() -> None:
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0
    from diffusers.models.embeddings import CogVideoXPatchEmbed
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock, CogVideoXTransformer3DModel

    register_joint_processor(CogVideoXAttnProcessor2_0)
    register_joint_processor(FusedCogVideoXAttnProcessor2_0)
    register_block_inputs(CogVideoXBlock, _block_inputs)
    register_image_output(CogVideoXBlock, 0)
    register_folded_batch(CogVideoXPatchEmbed, _folded)
    register_token_grid(CogVideoXTransformer3DModel, _cogvideox_grid)
