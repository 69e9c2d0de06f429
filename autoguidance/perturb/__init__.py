"""Seeded, per-sample degradations of one forward pass, which leave the model exactly as it was found.

A perturbation degrades chosen rows of one batched call: forward hooks on chosen module paths, registered only
inside `Perturbation.active(...)` and removed on exit (also after an exception). Random draws are pure functions
of per-row keys (image seed, denoiser call, site: `autoguidance.rng`; dropout masks via the faster 32-bit
`rng.dropout_keep`), so one call can carry the exact pass and the degraded pass side by side, a seed reproduces the
image, and the draws do not depend on batch size (the result only up to the float rounding of the net's kernels,
which sum in another order at another batch size). The model is never put in `train()`
(which would also switch normalisation layers, and make EDM2's layers rewrite their weights).

The perturbations (each strength a number or a `Schedule` of sigma, so p(sigma) can follow the noise level):

    Dropout(p, where, mode)          dropout on module outputs, element- or channel-wise (in-situ autoguidance)
    BlockDrop(p, where, path)        stochastic depth: a residual block returns its input / its skip path at rate p
    InputNoise(k)                    D(x + sqrt(s'^2 - s^2) n; s') with s' = (1 + k) s (Karras et al. 2024, "+10%")
    WeightNoise(std, where, params)  multiplicative Gaussian noise W (1 + std n) on chosen weights, per row
    IdentityAttention(scale, where)  self-attention map -> identity: the output is the values (perturbed-attention
                                     guidance, Ahn et al. 2024); scale blends A' = (1 - scale) A + scale I
    SmoothedAttention(s, where)      queries blurred by a Gaussian of width s tokens (SEG, Hong 2024); inf: mean query
    TokenShuffle(where)              output tokens of chosen blocks shuffled per row (TPG, 2025)
    NoisierLevel(k)                  D(x; (1 + k) s): the net told a noisier level than its input (self-guidance)
    SkipLayers(layers, blocks)       chosen blocks of a block list return their input (skip-layer guidance, SD3.5)

Default sites leave out what is not the model's own: an adapter's modules (a peft LoRA's `lora_dropout`,
`lora_A`, `lora_B`: `register_adapter_layer`; name them with `where=` to include them) and calls that fold another
axis into the batch (`register_folded_batch`). Perturbations on image tokens read the token grid from the nearest
enclosing module with a `register_token_grid` rule.

Choosing where (`where=`):
    torch.nn.Dropout              every module of a type (or a tuple of types)
    "trunk.act*"                  a glob on module paths
    ["trunk.act0", "trunk.act1"]  explicit paths; a path that does not exist raises an error listing close matches
Use `list_sites(model)` (or `autoguidance sites MODEL`) to see the candidates.
"""
from .attention import IdentityAttention, register_identity_attention
from .base import Hook, Perturbation, check_nonnegative, check_not_compiled, check_rate
from .blocks import BlockDrop, register_skip_path
from .dropout import Dropout
from .input_noise import InputNoise
from .sites import (SiteError, Where, find_sites, list_sites, register_adapter_layer, register_folded_batch,
                    register_rule_provider, register_token_grid)
from .skip_layer import SkipLayers, block_lists, register_block_inputs
from .weight_noise import WeightNoise
from .seg import SmoothedAttention, register_query_projection, register_smoothed_attention
from .tokens import TokenShuffle, register_image_output
from .self_guidance import NoisierLevel
from ..rng import dropout_keep

__all__ = ["Perturbation", "Hook", "Dropout", "BlockDrop", "InputNoise", "WeightNoise", "IdentityAttention",
           "find_sites", "list_sites", "register_skip_path", "register_identity_attention", "register_rule_provider",
           "dropout_keep", "Where", "SiteError", "check_nonnegative", "check_rate", "check_not_compiled",
           "SmoothedAttention", "register_smoothed_attention", "register_query_projection", "TokenShuffle",
           "register_image_output", "NoisierLevel", "SkipLayers", "block_lists", "register_block_inputs",
           "register_adapter_layer", "register_folded_batch", "register_token_grid"]
