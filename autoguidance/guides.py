"""Guides that wrap a denoiser rather than degrade rows of its forward call.

    PreviousStepGuidance(net, w)     SG-prev (Li et al. 2024, arXiv 2412.05827): the bad prediction is the net's own
                                     prediction at the previous (noisier) sampler level, stored per image; no extra
                                     network pass. Stateful: `reset()` between sampling runs (a run that starts at
                                     a higher sigma than an image's last call resets that image by itself).
    SlidingWindow(net, window, stride)
                                     SWG's guide (Kaiser, Adaloglou, Kollmann 2024, arXiv 2411.10257): the same net
                                     on crops of `window` pixels, stitched, overlapping windows averaged; use it as
                                     the guide net of `autoguidance(net, SlidingWindow(net, ...), w)`.

`PreviousStepGuidance` is a denoiser wrapper, not a `Guided` pass: `Guided` evaluates every pass of one call on the
same (x, sigma), while SG-prev's bad prediction comes from a different, earlier call, so it needs state across calls.
Images are keyed by their seed (the sampler's noise context), so a sample does not depend on the batch it is in
(beyond the float rounding of the net's kernels at another batch size); outside a sampler, rows are keyed by their
index. It keeps one previous prediction per image, so it refuses to be the net of several passes of another guided
denoiser (`cfg(PreviousStepGuidance(net, w))`: an image's conditional and unconditional rows would read each
other's state); guide the combination instead, `PreviousStepGuidance(cfg(net, w_cfg), w)`.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from . import rng
from .denoiser import as_sigma, check_x
from .schedules import Schedule, ScheduleLike, as_schedule

__all__ = ["PreviousStepGuidance", "SlidingWindow", "window_starts", "Tabulated"]


def _row_seeds(n: int) -> tuple[torch.Tensor, Optional[int], bool]:
    """`(seeds [n], call, passes)`: the rows' image seeds and the sampler's denoiser call index (None outside a
    sampler: the row index stands for the seed), and whether the call is made on the rows of another guided
    denoiser's batched passes (`rng.rows_context`), where one image may have a row in each of several passes."""
    state = rng._STATE.get()
    if state is not None and len(state.seeds) == n:
        return state.seeds.to(torch.int64), int(state.call), isinstance(state, rng._RowsState)
    return torch.arange(n, dtype=torch.int64), None, False


class PreviousStepGuidance:
    """`D = D(x; s) + (w(s) - 1) (D(x; s) - D_prev)`, `D_prev` the same image's most recent prediction at a level
    `> s` (SG-prev). With Heun, a level is evaluated twice (the correction at t_next and the next step's first call):
    both use the prediction of the last strictly noisier level. The first call of a run has no previous prediction
    and is unguided. One network pass per call. State per image seed, in sorted tensors (vectorised look-up)."""

    def __init__(self, net: Callable, w: ScheduleLike):
        self.net = net
        self.w = as_schedule(w)
        self.stats = {"main": 0, "guided_rows": 0}
        self.reset()

    def reset(self) -> None:
        """Forget every stored prediction (call between sampling runs; a run starting above an image's last level
        resets that image anyway)."""
        self._seeds = None   # [M] sorted int64; per seed: last level and prediction, the one before (if any)
        self._sig_last = self._d_last = self._sig_prev = self._d_prev = self._has_prev = None
        self._call_last = None   # [M] int64: the sampler call of each seed's last prediction (-1: none known)

    @staticmethod
    def _one_row_per_image(seeds: torch.Tensor, passes: bool, twice: Optional[int] = None) -> None:
        """Refuse a call in which an image has more than one row (or a second call within one sampler call): the
        state is one prediction per image, so the rows of two passes would overwrite and read each other's."""
        if twice is None:
            u, c = torch.unique(seeds, return_counts=True)
            if not bool((c > 1).any()):
                return
            twice = int(u[c > 1][0])
        if passes:
            raise ValueError(f"PreviousStepGuidance is the net of several passes of another guided denoiser (image "
                             f"seed {twice} has a row in more than one pass of one denoiser call, e.g. "
                             "cfg(PreviousStepGuidance(net, w)): its conditional and unconditional passes), but it "
                             "keeps one previous prediction per image; guide the combination instead: "
                             "PreviousStepGuidance(cfg(net, w_cfg), w)")
        raise ValueError(f"PreviousStepGuidance got image seed {twice} in more than one row of a call: it keeps one "
                         "previous prediction per image, so give each image its own seed (sample with seeds=...)")

    def _slots(self, seeds: torch.Tensor, D: torch.Tensor, passes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """State indices of `seeds` (added if new) and a mask of the seeds seen before."""
        self._one_row_per_image(seeds, passes)
        if self._seeds is None:
            order = torch.argsort(seeds)
            self._seeds = seeds[order]
            self._sig_last = torch.zeros(len(seeds), dtype=torch.float64)
            self._sig_prev = torch.zeros(len(seeds), dtype=torch.float64)
            self._d_last = torch.zeros((len(seeds), *D.shape[1:]), dtype=D.dtype, device=D.device)
            self._d_prev = torch.zeros_like(self._d_last)
            self._has_prev = torch.zeros(len(seeds), dtype=torch.bool)
            self._call_last = torch.full((len(seeds),), -1, dtype=torch.int64)
            return torch.argsort(order), torch.zeros(len(seeds), dtype=torch.bool)
        pos = torch.searchsorted(self._seeds, seeds).clamp_max(len(self._seeds) - 1)
        known = self._seeds[pos] == seeds
        if not bool(known.all()):
            add = seeds[~known]
            k = len(add)
            allk = torch.cat([self._seeds, add])
            order = torch.argsort(allk)
            self._seeds = allk[order]
            self._sig_last = torch.cat([self._sig_last, torch.zeros(k, dtype=torch.float64)])[order]
            self._sig_prev = torch.cat([self._sig_prev, torch.zeros(k, dtype=torch.float64)])[order]
            self._d_last = torch.cat([self._d_last, torch.zeros((k, *D.shape[1:]), dtype=D.dtype)])[order]
            self._d_prev = torch.cat([self._d_prev, torch.zeros((k, *D.shape[1:]), dtype=D.dtype)])[order]
            self._has_prev = torch.cat([self._has_prev, torch.zeros(k, dtype=torch.bool)])[order]
            self._call_last = torch.cat([self._call_last, torch.full((k,), -1, dtype=torch.int64)])[order]
            pos = torch.searchsorted(self._seeds, seeds)
        return pos, known

    def __call__(self, x: torch.Tensor, sigma, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_x(x)
        sigma = as_sigma(sigma, x)
        D = self.net(x, sigma, labels)
        self.stats["main"] += len(x)
        seeds, call, passes = _row_seeds(len(x))
        j, known = self._slots(seeds, D, passes)
        s = sigma.to(torch.float64).cpu()
        s_last = self._sig_last[j]
        if call is not None:         # another pass of this denoiser call saw the image (same call, same level)
            again = known & (self._call_last[j] == call) & (s == s_last)
            if bool(again.any()):
                self._one_row_per_image(seeds, passes, int(seeds[again][0]))
        self._call_last[j] = -1 if call is None else call
        down = known & (s < s_last)                     # a new, cleaner level: the bad one is the last prediction
        same = known & (s == s_last)                    # the same level again (Heun): the one before it
        bad = torch.where(_rows(down, D), self._d_last[j], self._d_prev[j])
        use = (down | (same & self._has_prev[j])) & (self.w(sigma).cpu() != 1)
        # update the state: a cleaner level pushes last -> prev; a higher level (a new run) clears prev
        self._d_prev[j[down]] = self._d_last[j[down]]
        self._sig_prev[j[down]] = s_last[down]
        self._has_prev[j] = torch.where(down, True, torch.where(same, self._has_prev[j], False))
        self._d_last[j] = D.detach()
        self._sig_last[j] = s
        if not bool(use.any()):
            return D
        w = _rows(self.w(sigma).to(D.dtype), D)
        self.stats["guided_rows"] += int(use.sum())
        return torch.where(_rows(use, D), D + (w - 1) * (D - bad), D)


def _rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.device).reshape(-1, *([1] * (like.ndim - 1)))


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of `window` covering `[0, size)` with step `stride` (the last one flush right)."""
    if window >= size:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


class SlidingWindow(torch.nn.Module):
    """The net with a restricted receptive field (SWG): `x [N, C, H, W]` is cut into `window x window` crops at
    stride `stride`, the net denoises each crop (same sigma, labels), and the crops' predictions are stitched back,
    each pixel the mean over the windows that cover it. One window covering the image is the exact pass.
    The net must accept the crop size (a U-Net: a multiple of its downsampling factor)."""

    def __init__(self, net: Callable, window: int | Sequence[int], stride: Optional[int | Sequence[int]] = None):
        super().__init__()
        self.net = net
        wh, ww = (window, window) if isinstance(window, int) else tuple(window)
        stride = stride if stride is not None else (max(1, wh // 2), max(1, ww // 2))
        sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)
        if min(wh, ww, sh, sw) < 1:
            raise ValueError(f"window and stride must be >= 1, got {window}, {stride}")
        self.window, self.stride = (int(wh), int(ww)), (int(sh), int(sw))

    def forward(self, x: torch.Tensor, sigma, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"sliding-window guide needs images [N, C, H, W], got {list(x.shape)}")
        sigma = as_sigma(sigma, x)
        n, c, h, w = x.shape
        wh, ww = min(self.window[0], h), min(self.window[1], w)
        tops, lefts = window_starts(h, wh, self.stride[0]), window_starts(w, ww, self.stride[1])
        crops = [(t, l) for t in tops for l in lefts]
        batch = torch.cat([x[:, :, t:t + wh, l:l + ww] for t, l in crops])   # one call: [len(crops) * N, C, wh, ww]
        lab = None if labels is None else labels.repeat(len(crops), *([1] * (labels.ndim - 1)))
        pred = self.net(batch, sigma.repeat(len(crops)), lab)
        acc = torch.zeros_like(x)
        cnt = torch.zeros((1, 1, h, w), dtype=x.dtype, device=x.device)
        for j, (t, l) in enumerate(crops):
            acc[:, :, t:t + wh, l:l + ww] += pred[j * n:(j + 1) * n]
            cnt[:, :, t:t + wh, l:l + ww] += 1
        return acc / cnt


class Tabulated(Schedule):
    """`w(sigma)` interpolated linearly in log(sigma) between tabulated `(sigmas, values)` (held constant beyond
    the ends): e.g. an MSE-optimal `w*(sigma)` measured at a few noise levels (`autoguidance calibrate`)."""

    def __init__(self, sigmas: Sequence[float], values: Sequence[float]):
        s = [float(v) for v in sigmas]
        if len(s) != len(values) or len(s) < 1 or any(v <= 0 for v in s):
            raise ValueError("Tabulated needs as many positive sigmas as values (at least one)")
        order = sorted(range(len(s)), key=s.__getitem__)
        self.sigmas = tuple(s[i] for i in order)
        self.vals = tuple(float(values[i]) for i in order)

    def __call__(self, sigma):
        s = torch.as_tensor(sigma, dtype=torch.float64).clamp_min(1e-30).log()
        xs = torch.tensor(self.sigmas, dtype=torch.float64).log()
        ys = torch.tensor(self.vals, dtype=torch.float64)
        if len(xs) == 1:
            return torch.full_like(s, ys[0]).to(torch.float32)
        j = torch.searchsorted(xs, s.clamp(xs[0], xs[-1]).contiguous()).clamp(1, len(xs) - 1)
        t = ((s.clamp(xs[0], xs[-1]) - xs[j - 1]) / (xs[j] - xs[j - 1])).clamp(0, 1)
        return (ys[j - 1] + t * (ys[j] - ys[j - 1])).to(torch.float32)

    def values(self):
        return list(self.vals)

    def __repr__(self):
        return f"Tabulated(sigmas={list(self.sigmas)}, values={list(self.vals)})"
