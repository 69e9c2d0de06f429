"""diffusers' `Attention` (U-Nets, DiT, PixArt, Sana, SD3's joint attention, CogVideoX): identity attention for
`IdentityAttention` (perturbed-attention guidance), the query projection for `SmoothedAttention` (SEG), and the token
grid of an attention called on a 4-D feature map. Shared by the families whose attention is this class, and the
helpers other attention classes reuse (`query_projection`, `value_identity`)."""
from __future__ import annotations

from ....perturb import SiteError, register_identity_attention, register_query_projection, register_token_grid

#: processors of diffusers' `Attention` that attend over one sequence of text tokens then image tokens, built
#: from `hidden_states` (image) and `encoder_hidden_states` (text) of a self-attention module (CogVideoX's):
#: their first output is the image stream. Family modules add theirs (`register_joint_processor`).
_JOINT_PROCESSORS: set = set()


def register_joint_processor(processor_type: type) -> None:
    """An `Attention` processor that concatenates the text tokens before the image tokens into one self-attention
    sequence (`encoder_hidden_states` given, no added projections) and returns `(image, text)` streams."""
    _JOINT_PROCESSORS.add(processor_type)


def joint_by_concatenation(attn) -> bool:
    """Whether `attn`'s processor attends over `[text, image]` as one sequence (see `register_joint_processor`)."""
    return type(getattr(attn, "processor", None)) in _JOINT_PROCESSORS


def arg(args, kwargs, i: int, name: str):
    """Argument `name` of a call, given at position `i` or by keyword (None if absent)."""
    return args[i] if len(args) > i else kwargs.get(name)


def value_identity(attn, hidden):
    """`to_out(to_v(hidden))`: each token's output is its own value (the attention map replaced by the identity)."""
    return attn.to_out[1](attn.to_out[0](attn.to_v(hidden)))


def query_projection(attn):
    """The module whose output holds `attn`'s queries (`to_q`); refuses fused projections, which skip it."""
    if getattr(attn, "fused_projections", False):
        raise SiteError(f"smoothed attention needs the query projection to_q, but this {type(attn).__name__} uses "
                        "fused projections (fuse_qkv_projections): call model.unfuse_qkv_projections() first")
    q = getattr(attn, "to_q", None)
    if q is None:
        raise SiteError(f"smoothed attention: {type(attn).__name__} has no query projection to_q")
    return q


def _attention_identity(attn, args, kwargs):
    """diffusers `Attention` with the attention map replaced by the identity: the processor's path with
    `softmax(q k^T)` -> I, i.e. to_out(to_v(h)) with the same norms, reshapes, residual and rescale."""
    hidden = arg(args, kwargs, 0, "hidden_states")
    ehs = arg(args, kwargs, 1, "encoder_hidden_states")
    if getattr(attn, "pre_only", False) and ehs is None:   # Flux single blocks: one joint sequence, no to_out
        return attn.to_v(hidden), 0
    if ehs is not None and ehs is not hidden and (getattr(attn, "add_v_proj", None) is not None
                                                  or joint_by_concatenation(attn)):
        # joint attention (SD3 / MMDiT with added projections, CogVideoX by concatenation): identity on the
        # image-image part, as perturbed-attention guidance does on MMDiT: each image token's output is its own
        # value, to_out(to_v(h)); the text tokens' output (the second element of the module's output) stays that of
        # the exact attention.
        return value_identity(attn, hidden), 0
    if ehs is not None and ehs is not hidden:
        raise ValueError("identity attention needs self-attention, but this diffusers Attention was called with "
                         "encoder_hidden_states (cross-attention); choose the self-attention modules (attn1)")
    temb = arg(args, kwargs, 3, "temb")
    residual = hidden
    if attn.spatial_norm is not None:
        hidden = attn.spatial_norm(hidden, temb)
    four_d = hidden.ndim == 4
    if four_d:
        n, c, h, w = hidden.shape
        hidden = hidden.view(n, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden = attn.group_norm(hidden.transpose(1, 2)).transpose(1, 2)
    out = value_identity(attn, hidden)
    if four_d:
        out = out.transpose(-1, -2).reshape(n, c, h, w)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor, 0


def _query_prefix(attn, args, kwargs):
    """Text tokens before the image tokens in `to_q`'s output: CogVideoX's joint sequence puts the text first."""
    ehs = arg(args, kwargs, 1, "encoder_hidden_states")
    return ehs.shape[1] if ehs is not None and joint_by_concatenation(attn) else 0


def _feature_map_grid(attn, args, kwargs):
    """An `Attention` called on a feature map `[N, C, H, W]` (U-Net mid blocks of `UNet2DModel`): its own grid."""
    hidden = arg(args, kwargs, 0, "hidden_states")
    return tuple(hidden.shape[2:]) if hidden is not None and hidden.ndim == 4 else None


def _self_attention(attn) -> bool:
    return not getattr(attn, "is_cross_attention", False)


def register() -> None:
    from diffusers.models.attention_processor import Attention

    register_identity_attention(Attention, _attention_identity, is_self_attention=_self_attention)
    register_query_projection(Attention, query_projection, _query_prefix, is_self_attention=_self_attention)
    register_token_grid(Attention, _feature_map_grid)
