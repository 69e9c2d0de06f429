"""SD3 / MMDiT: `JointTransformerBlock` returns `(encoder_hidden_states, hidden_states)`; its inputs in that
order for `SkipLayers` (a skipped block passes both streams through)."""
from __future__ import annotations

from ....perturb import register_block_inputs


def _joint_block_inputs(block, args, kwargs):
    """`JointTransformerBlock(hidden_states, encoder_hidden_states, temb)` returns `(encoder_hidden_states,
    hidden_states)` (encoder None when context_pre_only): its inputs in that order."""
    names = ("hidden_states", "encoder_hidden_states")
    h, e = [args[i] if len(args) > i else kwargs.get(names[i]) for i in range(2)]
    return (None if getattr(block, "context_pre_only", False) else e, h)


def register() -> None:
    try:
        from diffusers.models.attention import JointTransformerBlock
    except ImportError:  # pragma: no cover - older diffusers
        return
    register_block_inputs(JointTransformerBlock, _joint_block_inputs)
