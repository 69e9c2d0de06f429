"""diffusers' U-Nets (SD 1.x / 2.x, SDXL, ControlNet's): the skip path of `ResnetBlock2D` for `BlockDrop`, and the
token grid of a `Transformer2DModel` (its input feature map) for perturbations on image tokens (SEG)."""
from __future__ import annotations

from ....perturb import register_skip_path, register_token_grid
from .attention import arg


def _resnet_skip(block, input_tensor, temb=None, *args, **kwargs):
    """diffusers `ResnetBlock2D` without its residual branch: (resampled) input, shortcut conv, / output scale."""
    x = input_tensor
    if block.upsample is not None:
        x = block.upsample(x)
    elif block.downsample is not None:
        x = block.downsample(x)
    if block.conv_shortcut is not None:
        x = block.conv_shortcut(x)
    return x / block.output_scale_factor


def _transformer_2d_grid(model, args, kwargs):
    """`Transformer2DModel` on a feature map `[N, C, H, W]`: its attention sees the H x W positions (continuous
    input), or the (H / p) x (W / p) patches (patched input)."""
    hidden = arg(args, kwargs, 0, "hidden_states")
    if hidden is None or hidden.ndim != 4:
        return None
    h, w = hidden.shape[2:]
    if getattr(model, "is_input_patches", False):
        p = int(model.patch_size)
        return h // p, w // p
    return (h, w) if getattr(model, "is_input_continuous", False) else None


def register() -> None:
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    register_skip_path(ResnetBlock2D, _resnet_skip)
    register_token_grid(Transformer2DModel, _transformer_2d_grid)
