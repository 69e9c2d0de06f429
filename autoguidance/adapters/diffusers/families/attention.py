"""diffusers' `Attention` (U-Nets, DiT, PixArt, Sana, SD3's joint attention): identity attention for
`IdentityAttention` (perturbed-attention guidance)."""
from __future__ import annotations

from ....perturb import register_identity_attention


def _attention_identity(attn, args, kwargs):
    """diffusers `Attention` with the attention map replaced by the identity: the processor's path with
    `softmax(q k^T)` -> I, i.e. to_out(to_v(h)) with the same norms, reshapes, residual and rescale."""
    hidden = args[0] if args else kwargs["hidden_states"]
    ehs = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
    if getattr(attn, "pre_only", False) and ehs is None:   # Flux single blocks: one joint sequence, no to_out
        return attn.to_v(hidden), 0
    if ehs is not None and ehs is not hidden and getattr(attn, "add_v_proj", None) is not None:
        # joint attention (SD3 / MMDiT): identity on the image-image part, as perturbed-attention guidance does on
        # MMDiT: each image token's output is its own value, to_out(to_v(h)); the text tokens' output (the second
        # element of the module's output) stays that of the exact attention.
        return attn.to_out[1](attn.to_out[0](attn.to_v(hidden))), 0
    if ehs is not None and ehs is not hidden:
        raise ValueError("identity attention needs self-attention, but this diffusers Attention was called with "
                         "encoder_hidden_states (cross-attention); choose the self-attention modules (attn1)")
    temb = args[3] if len(args) > 3 else kwargs.get("temb")
    residual = hidden
    if attn.spatial_norm is not None:
        hidden = attn.spatial_norm(hidden, temb)
    four_d = hidden.ndim == 4
    if four_d:
        n, c, h, w = hidden.shape
        hidden = hidden.view(n, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden = attn.group_norm(hidden.transpose(1, 2)).transpose(1, 2)
    out = attn.to_out[1](attn.to_out[0](attn.to_v(hidden)))
    if four_d:
        out = out.transpose(-1, -2).reshape(n, c, h, w)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor, 0



def register() -> None:
    from diffusers.models.attention_processor import Attention

    register_identity_attention(Attention, _attention_identity,
                                is_self_attention=lambda m: not getattr(m, "is_cross_attention", False))
