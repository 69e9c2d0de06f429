"""Token perturbation guidance (TPG, arXiv 2506.10036): shuffle the tokens of chosen blocks' outputs.

In the degraded rows, the output tokens of each chosen module are permuted by a random permutation drawn per row
from the row's key (image seed, denoiser call) and the site's index, so the permutation depends on the image and
the step but not on the batch it shares. Tokens: the spatial positions of a `[N, C, H, W]` output (all H*W of
them are permuted together, channels stay with their token), or axis 1 of a `[N, L, C]` output (batch-first
transformers); `token_axis=` overrides. The exact rows are untouched. A block returning a tuple has its image tokens
in the element its type registers (`register_image_output`: joint blocks return a text and an image stream, e.g.
SD3's `(encoder_hidden_states, hidden_states)`: the image stream is shuffled, the text stream kept), else in its
first element (a U-Net block's `(hidden_states, residuals)`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..rng import hash_uniform, mix_keys
from .base import Hook, Perturbation, _RowSet
from .sites import RuleRegistry, Where, find_sites

__all__ = ["TokenShuffle", "token_permutations", "register_image_output"]

#: block type -> the index of the element of its tuple output that holds the image tokens
_IMAGE_OUTPUT = RuleRegistry()


def register_image_output(module_type: type, index: int) -> None:
    """Tell `TokenShuffle` which element of a block type's tuple output holds the image tokens (joint blocks:
    SD3's and Flux's blocks return `(encoder_hidden_states, hidden_states)`, index 1; CogVideoX's
    `(hidden_states, encoder_hidden_states)`, index 0)."""
    if not isinstance(module_type, type) or isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise TypeError("register_image_output(module_type, index) needs a class and an index >= 0")
    _IMAGE_OUTPUT[module_type] = index

_SALT = 0x7F6A


def token_permutations(keys: torch.Tensor, n_tokens: int, site: int = 0) -> torch.Tensor:
    """`[M, n_tokens]` int64: row m a uniformly random permutation of `range(n_tokens)`, a pure function of
    `keys[m]` and `site` (argsort of hashed uniforms; ties broken by index, which has probability ~n^2 / 2^25)."""
    u = hash_uniform(mix_keys(keys, _SALT, site), (n_tokens,))
    return torch.argsort(u, dim=1, stable=True)


@dataclass(frozen=True, eq=False)
class TokenShuffle(Perturbation):
    """TPG: the degraded rows' output tokens of the chosen modules (`where`, required: the TPG paper picks blocks,
    e.g. the U-Net's down blocks) are shuffled by a per-image, per-call seeded permutation.

    `token_axis`: None = spatial positions of 4-D outputs, axis 1 of 3-D outputs; or an int axis (>= 1)."""

    where: Where = None
    token_axis: Optional[int] = None
    name = "token shuffle"

    def sites(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        if self.where is None:
            raise ValueError("token shuffle needs where= (the blocks whose output tokens are shuffled); list the "
                             "candidates with autoguidance.perturb.list_sites(model)")
        return find_sites(model, self.where)

    def _tokens_view(self, t: torch.Tensor, path: str = "") -> tuple[torch.Tensor, callable]:
        """`t [M, ...]` -> (`[M, L, F]` tokens first, inverse reshaping)."""
        if self.token_axis is not None:
            ax = int(self.token_axis)
            moved = t.movedim(ax, 1)
            shp = moved.shape
            return moved.reshape(shp[0], shp[1], -1), lambda u: u.reshape(shp).movedim(1, ax)
        if t.ndim == 4:
            m, c, h, w = t.shape
            return t.reshape(m, c, h * w).transpose(1, 2), lambda u: u.transpose(1, 2).reshape(m, c, h, w)
        if t.ndim == 3:
            return t, lambda u: u
        raise ValueError(f"token shuffle at {path!r}: cannot tell the token axis of its {t.ndim}-D output "
                         f"{list(t.shape)}; a flat feature vector has no tokens. Choose blocks, not their layers "
                         f"(a glob like 'x.*' also matches submodules: list the blocks with "
                         f"autoguidance.perturb.list_sites(model)), or pass token_axis= to force one")

    def _hooks(self, model, rows, keys, sigma):
        sites = self.sites(model)
        idx = torch.nonzero(rows).flatten()
        if len(idx) == 0:
            return []
        degraded = _RowSet(idx)
        row_keys = keys[idx]
        hooks = []
        for i, (path, module) in enumerate(sites):
            def hook(mod, args, out, i=i, path=path):
                k = 0 if isinstance(out, torch.Tensor) else (_IMAGE_OUTPUT.lookup(mod) or 0)
                first = out if isinstance(out, torch.Tensor) else out[k]
                tok, back = self._tokens_view(degraded.take(first), path)
                perm = token_permutations(row_keys, tok.shape[1], i).to(tok.device)
                shuffled = torch.gather(tok, 1, perm[:, :, None].expand(-1, -1, tok.shape[2]))
                new = degraded.put(first, back(shuffled).to(first.dtype))
                return new if isinstance(out, torch.Tensor) else (*out[:k], new, *out[k + 1:])

            hooks.append(Hook(module, hook))
        return hooks
