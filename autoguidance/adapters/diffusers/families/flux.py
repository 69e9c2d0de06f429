"""Flux: `FluxAttention` (identity attention, as diffusers' `Attention`; single blocks: one joint sequence) and
the double / single stream blocks (their inputs in output order, as SD3's joint blocks, for `SkipLayers`)."""
from __future__ import annotations

from ....perturb import register_block_inputs, register_identity_attention
from .attention import _attention_identity
from .sd3 import _joint_block_inputs


def register() -> None:
    try:
        from diffusers.models.transformers.transformer_flux import (FluxAttention, FluxSingleTransformerBlock,
                                                                    FluxTransformerBlock)
    except ImportError:  # pragma: no cover - older diffusers
        return
    register_identity_attention(FluxAttention, _attention_identity)
    register_block_inputs(FluxTransformerBlock, _joint_block_inputs)
    register_block_inputs(FluxSingleTransformerBlock, _joint_block_inputs)
