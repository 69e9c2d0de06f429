"""Frequency-decoupled guidance (FDG, 2025): the guidance difference split into the levels of a Laplacian pyramid,
each level with its own weight (and optionally its parallel part down-weighted)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .base import Rule, check_form, check_number, check_space, project

__all__ = ["FDG", "laplacian_pyramid", "from_pyramid"]

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])


def _blur(x: torch.Tensor) -> torch.Tensor:
    """The 5 x 5 binomial blur of a Burt-Adelson pyramid (1 4 6 4 1 / 16 in each direction), reflected borders."""
    k = _BINOMIAL.to(x.device, x.dtype)
    k2 = (k[:, None] * k[None, :] / 256.0).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k2, groups=x.shape[1])


def _down(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(_blur(x), size=(x.shape[2] // 2, x.shape[3] // 2), mode="bilinear", align_corners=False)


def _up(x: torch.Tensor) -> torch.Tensor:
    return _blur(F.interpolate(x, size=(2 * x.shape[2], 2 * x.shape[3]), mode="bilinear", align_corners=False))


def _padded_size(h: int, w: int, levels: int) -> tuple[int, int]:
    """The size the pyramid is built at: the next powers of two when neither side is one, or when a side is not
    divisible by 2^(levels - 1) (kornia's `build_laplacian_pyramid` convention), else (h, w)."""
    def pow2(n):
        return n > 0 and n & (n - 1) == 0
    stride = 1 << (levels - 1)
    if not (pow2(h) or pow2(w)) or h % stride or w % stride:
        return 1 << (h - 1).bit_length(), 1 << (w - 1).bit_length()
    return h, w


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """`levels` band-pass images of `x` `[N, C, H, W]`, highest frequency first, the last the coarsest Gaussian level
    (`L_k = G_k - up(G_{k+1})`, `G_{k+1} = down(G_k)`), built at `_padded_size` (reflect padding)."""
    h, w = x.shape[2:]
    ph, pw = _padded_size(h, w, levels)
    if (ph, pw) != (h, w):
        x = F.pad(x, (0, pw - w, 0, ph - h), mode="reflect")
    if min(ph, pw) >> (levels - 1) < 3:
        raise ValueError(f"FDG with {levels} levels needs images of at least {3 << (levels - 1)} pixels per side "
                         f"(got {h} x {w}): use fewer levels (fewer scales)")
    gauss = [x]
    for _ in range(levels - 1):
        gauss.append(_down(gauss[-1]))
    return [g - _up(g_next) for g, g_next in zip(gauss[:-1], gauss[1:])] + [gauss[-1]]


def from_pyramid(pyr: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """The image of a Laplacian pyramid, cropped to `size` (H, W)."""
    img = pyr[-1]
    for band in reversed(pyr[:-1]):
        img = _up(img) + band
    return img[:, :, :size[0], :size[1]]


@dataclass(frozen=True)
class FDG(Rule):
    """Per guide: Laplacian pyramids of c and u (`len(scales)` levels, highest frequency first); at level l the
    difference `D_l = c_l - u_l`, optionally `D_l = p_l D_par + D_orth` (parts with respect to c_l, float64) when
    `parallel_weights` is given, and the level weight `w_l = 1 + scales[l] (w - 1)`:

        g_l = c_l + (w_l - 1) D_l               (form 'conditional')
        g_l = u_l + w_l D_l                     (form 'unconditional', diffusers' FrequencyDecoupledGuidance default)

    and g is the image of the pyramid (g_l). The pyramid is linear, so `g = c + image(terms)`; a level with scale 0
    keeps c's component. diffusers' guidance_scales `(a_0, ..., a_{L-1})` are `w = a_0`, `scales[l] = (a_l - 1) /
    (a_0 - 1)`; the paper's SDXL setting (w_high, w_low) = (10, 5) is w = 10, scales = (1, 4/9). Several guides:
    each guide its own pyramid terms, added. Images `[N, C, H, W]` only.

    Differences from diffusers' guider, on purpose: a level whose weight is 1 is skipped there and then appends the
    previous level's (or an unbound) tensor, so any disabled level fails or mixes sizes; and an image whose sides
    are not powers of two is padded and returned padded (14 x 14 -> 16 x 16). Here the result is cropped back to the
    input size. Its pyramid is kornia's (the same 5 x 5 binomial blur, bilinear resampling, reflected borders).
    Space (None, the default): x0 for the library's denoisers, the model output inside pipelines (where diffusers
    acts); or 'x0', 'eps', 'v' anywhere."""

    scales:           tuple = (1.0, 0.5)     # per level, high to low frequency: (w_l - 1) = scales[l] (w - 1)
    parallel_weights: Optional[tuple] = None  # per level weight of the part parallel to c (None: plain difference)
    space:            Optional[str] = None   # None (x0; pipelines: the model output), 'x0', 'eps', 'v'
    form:             str = "conditional"    # 'conditional' or 'unconditional' (diffusers)

    name = "fdg"
    paper = "Frequency-decoupled guidance, arXiv 2506.19713"
    formula = "Laplacian levels l: g_l = c_l + scales[l](w - 1)(p_l D_par + D_orth), D = c_l - u_l; g = image(g_l)"

    def __post_init__(self):
        try:
            scales = tuple(check_number(v, "scales") for v in self.scales)
        except TypeError:
            raise ValueError(f"rule parameter scales must be a list of numbers (one per level), got "
                             f"{self.scales!r}") from None
        if not scales:
            raise ValueError("rule parameter scales needs at least one level")
        object.__setattr__(self, "scales", scales)
        if self.parallel_weights is not None:
            try:
                pw = tuple(check_number(v, "parallel_weights") for v in self.parallel_weights)
            except TypeError:
                raise ValueError("rule parameter parallel_weights must be a list of numbers, one per level") from None
            if len(pw) != len(scales):
                raise ValueError(f"rule parameter parallel_weights has {len(pw)} values for {len(scales)} levels: "
                                 "give one per level (as many as scales)")
            object.__setattr__(self, "parallel_weights", pw)
        check_space(self.space)
        check_form(self.form)

    def delta(self, c, u, w, state=None):
        if c.ndim != 4:
            raise ValueError(f"FDG needs images [N, C, H, W], got predictions of shape {list(c.shape)}")
        levels = len(self.scales)
        both = laplacian_pyramid(torch.cat([c, u]), levels)          # one pass for both predictions
        pc, pu = [b[:len(c)] for b in both], [b[len(c):] for b in both]
        terms = []
        for l, (cl, ul, s) in enumerate(zip(pc, pu, self.scales)):
            if s == 0:                                  # w_l = 1: the level keeps c's component
                terms.append(torch.zeros_like(cl))
                continue
            diff = cl - ul
            d = diff
            pw = self.parallel_weights[l] if self.parallel_weights is not None else 1.0
            if pw != 1.0:
                par, orth = project(diff, cl)
                d = pw * par + orth
            wm1 = s * (w - 1)
            terms.append(wm1 * d if self.form == "conditional" else (wm1 + 1) * d - diff)
        return from_pyramid(terms, c.shape[2:]), None
