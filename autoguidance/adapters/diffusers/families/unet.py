"""diffusers' U-Net blocks: the skip path of `ResnetBlock2D` for `BlockDrop`."""
from __future__ import annotations

from ....perturb import register_skip_path


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


def register() -> None:
    from diffusers.models.resnet import ResnetBlock2D

    register_skip_path(ResnetBlock2D, _resnet_skip)
