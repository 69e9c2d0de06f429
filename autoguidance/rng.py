"""Per-sample randomness that does not depend on batch size.

Three sources, all keyed by the image's seed:

- `StackedGenerators`: one `torch.Generator` per image, for the sampler's initial noise and churn noise
  (as EDM2's per-image seeding). Image i's noise is the same in a batch of 1000 or in four batches of 250.
- `hash_uniform` / `hash_normal`: counter-based random numbers (a splitmix64 hash of key and element index),
  for perturbations that run on every denoiser call. A per-row key mixes the image seed, the denoiser-call
  index and the perturbation site, so a masked pass reproduces from the seed whatever rows it shares a batch
  with, at no per-row generator cost.
- `dropout_keep` / `dropout_scale`: a 32-bit counter hash for dropout masks, the hot path of in-situ guidance
  (one draw per activation at every site).

The sampler publishes the current rows' seeds and the call index through `noise_context`; perturbations read
it with `current_keys`. Outside a sampler (a plain `D(x, sigma)` call) keys fall back to the row index.
"""
from __future__ import annotations

import contextvars
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

__all__ = ["StackedGenerators", "as_seeds", "DropoutMasks", "dropout_keep", "dropout_scale", "hash_uniform",
           "hash_normal", "mix_keys", "mix_keys_per_salt", "noise_context", "current_keys"]

_M64 = (1 << 64) - 1


def _s64(c: int) -> int:
    """A 64-bit constant as the signed int64 torch stores (two's complement wraparound)."""
    c &= _M64
    return c - (1 << 64) if c >= (1 << 63) else c


_GOLDEN = _s64(0x9E3779B97F4A7C15)
_MUL1 = _s64(0xBF58476D1CE4E5B9)
_MUL2 = _s64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix(x: torch.Tensor) -> torch.Tensor:
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MUL1
    x = (x ^ _shr(x, 27)) * _MUL2
    return x ^ _shr(x, 31)


def mix_keys(keys: torch.Tensor, *salts: int) -> torch.Tensor:
    """Derive new int64 keys from `keys` `[N]` and integer salts (call index, site index, ...)."""
    k = keys.to(torch.int64)
    for s in salts:
        k = _splitmix(k ^ _s64(int(s) * 0x632BE59BD9B4E019 + 1))
    return k


def mix_keys_per_salt(keys: torch.Tensor, salts: Sequence[int]) -> torch.Tensor:
    """`[S, N]`: row s is `mix_keys(keys, salts[s])`, in one vectorised pass (per-site keys of a perturbation)."""
    s = torch.tensor([_s64(int(v) * 0x632BE59BD9B4E019 + 1) for v in salts], dtype=torch.int64, device=keys.device)
    return _splitmix(keys.to(torch.int64)[None, :] ^ s[:, None])


def hash_uniform(keys: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Uniform numbers in [0, 1) of shape `[N, *shape]`, row n a pure function of `keys[n]`."""
    numel = math.prod(shape)
    idx = torch.arange(numel, dtype=torch.int64, device=keys.device)
    h = _splitmix(_splitmix(keys.to(torch.int64))[:, None] ^ idx[None, :])
    u = _shr(h, 40).to(torch.float32) * (1.0 / (1 << 24))  # top 24 bits: exact in float32
    return u.view(len(keys), *shape)


def hash_normal(keys: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal numbers `[N, *shape]` (Box-Muller on two hashed uniforms), row n a function of keys[n]."""
    numel = math.prod(shape)
    u = hash_uniform(keys, (2, numel))
    u1 = u[:, 0].clamp_min(1.0 / (1 << 25))
    return ((-2 * u1.log()).sqrt() * torch.cos(2 * math.pi * u[:, 1])).view(len(keys), *shape)


_WEYL32 = 0x9E3779B9 - (1 << 32)                        # 2^32 / golden ratio, as a signed int32
_LOWBIAS32 = ((16, 0x7FEB352D), (15, 0x846CA68B - (1 << 32)), (16, None))  # C. Wellons' lowbias32 finaliser
_COUNTERS: dict = {}                                     # (half, device) -> j * 0x9E3779B9 as int32 [half]


def _counters(half: int, device) -> torch.Tensor:
    """`j * 0x9E3779B9` for j < half (wrapping int32), cached per length: every call of a site needs the same."""
    key = (half, str(device))
    c = _COUNTERS.get(key)
    if c is None:
        if len(_COUNTERS) > 256:
            _COUNTERS.clear()
        c = _COUNTERS[key] = torch.arange(half, dtype=torch.int32, device=device).mul_(_WEYL32)
    return c


def _dropout_uniforms16(keys: torch.Tensor, numel: int) -> torch.Tensor:
    """16-bit uniforms as int32 in [0, 2^16), `[N, 2 * ceil(numel / 2)]`: row n from `keys[n]` only (see
    `dropout_keep`). All in-place int32 ops; int32 products wrap as uint32 ones do."""
    half = (numel + 1) // 2
    if half >= (1 << 31):
        raise ValueError(f"a dropout site with {numel} elements per row is too large for 32-bit counters")
    seeds = ((keys.to(torch.int64) + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)
    x = torch.bitwise_xor(_counters(half, keys.device)[None, :], seeds.to(torch.int32)[:, None])
    u = torch.empty((len(keys), 2 * half), dtype=torch.int32, device=keys.device)
    t = u[:, :half]                                   # scratch space, overwritten by the high halves below
    for shift, mul in _LOWBIAS32:   # x ^= x >>> shift; x *= mul (>> is arithmetic: mask off the sign copies)
        torch.bitwise_right_shift(x, shift, out=t)
        x.bitwise_xor_(t.bitwise_and_((1 << (32 - shift)) - 1))
        if mul is not None:
            x.mul_(mul)
    torch.bitwise_right_shift(x, 16, out=u[:, :half]).bitwise_and_(0xFFFF)   # high halves
    torch.bitwise_and(x, 0xFFFF, out=u[:, half:])                             # low halves
    return u


class DropoutMasks:
    """Dropout multipliers for rows with drop probabilities `p` `[N]`, prepared once per forward call and shared by
    every site: `scale(keys, shape)` is `dropout_scale(keys, shape, p)`."""

    def __init__(self, p: torch.Tensor):
        p32 = p.detach().cpu().to(torch.float32)
        thr = (p32.to(torch.float64) * (1 << 16)).ceil().to(torch.int32)       # drop where u < ceil(p 2^16)
        inv = 1.0 / (1.0 - p32)                                                # float32, as torch's dropout scales
        self._cpu = ((thr - 1)[:, None], inv.view(torch.int32)[:, None])
        self._on = {}

    def _params(self, device, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._on:
            self._on[key] = tuple(t.to(device) for t in self._cpu)
        thr_m1, inv_bits = self._on[key]
        return thr_m1[rows], inv_bits[rows]

    def thresholds(self, device) -> torch.Tensor:
        """`ceil(p 2^16)` as int32 `[N, 1]`."""
        return self._params(device)[0] + 1

    def scale(self, keys: torch.Tensor, shape: Sequence[int], rows: slice = slice(None)) -> torch.Tensor:
        """Multipliers for `keys` `[K]`, the rows `rows` of the `p` given at construction (default: all)."""
        numel = math.prod(shape)
        u = _dropout_uniforms16(keys, numel)
        thr_m1, inv_bits = self._params(u.device, rows)
        torch.sub(thr_m1, u, out=u)                          # < 0 exactly where u >= thr (keep)
        u.bitwise_right_shift_(31).bitwise_and_(inv_bits)    # all ones (keep) or 0, then the multiplier's bits
        return u.view(torch.float32)[:, :numel].reshape(len(keys), *shape)


def dropout_keep(keys: torch.Tensor, shape: Sequence[int], p: torch.Tensor) -> torch.Tensor:
    """Keep masks of dropout: `[N, *shape]` bool, True where `u >= p[n]`, row n a pure function of `keys[n]`.

    A 32-bit counter hash per pair of elements, `h_j = lowbias32(seed_n ^ (j * 0x9E3779B9))` (C. Wellons'
    finaliser; `seed_n` = the low 32 bits of `keys[n]`), gives two 16-bit uniforms: element j of the first half of
    the row gets `u = (h_j >> 16) / 2^16`, element j of the second half `u = (h_j & 0xFFFF) / 2^16`. The drop
    probability is `ceil(p 2^16) / 2^16`, within 2^-16 of p. The perturbations use `dropout_scale`, the same
    masks as ready-made multipliers."""
    numel = math.prod(shape)
    u = _dropout_uniforms16(keys, numel)
    return torch.ge(u, DropoutMasks(p).thresholds(u.device))[:, :numel].reshape(len(keys), *shape)


def dropout_scale(keys: torch.Tensor, shape: Sequence[int], p: torch.Tensor) -> torch.Tensor:
    """Dropout multipliers: float32 `[N, *shape]`, `1 / (1 - p[n])` where `dropout_keep` keeps, else 0.

    This is the hot path of in-situ guidance (one draw per activation of every site), so it stays in int32 from
    the hash to the result: `(thr - 1 - u) >> 31` is all ones exactly where `u >= thr`, and that mask ANDed with the
    bit pattern of `1 / (1 - p)` IS the float32 multiplier. No bool tensor is made: on CPU, comparisons into bool
    and bool-to-float conversion cost more than the whole hash. (`DropoutMasks` prepares `p` once for many sites.)"""
    return DropoutMasks(p).scale(keys, shape)


def as_seeds(seeds) -> torch.Tensor:
    """Seeds as an int64 `[N]` tensor (accepts a range, a list of ints, or a 1-D integer tensor)."""
    if isinstance(seeds, torch.Tensor):
        t = seeds
    elif isinstance(seeds, Iterable) and not isinstance(seeds, (str, bytes)):
        t = torch.as_tensor(list(seeds))
    else:
        raise TypeError(f"seeds must be a sequence of integers (e.g. range(100)), got {type(seeds).__name__}")
    if t.ndim != 1 or t.is_floating_point() or t.is_complex():
        raise ValueError(f"seeds must be a 1-D sequence of integers, got dtype {t.dtype} and shape {list(t.shape)}")
    return t.to(torch.int64)


class StackedGenerators:
    """One `torch.Generator` per image seed; `randn(shape)` stacks one draw per image: `[N, *shape]`."""

    def __init__(self, seeds, device="cpu"):
        self.seeds = as_seeds(seeds)
        self.generators = [torch.Generator(device).manual_seed(int(s) % (1 << 63)) for s in self.seeds]
        self.device = device

    def randn(self, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        return torch.stack([torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype)
                            for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape[1:], dtype=x.dtype)


@dataclass(frozen=True)
class _NoiseState:
    seeds: torch.Tensor  # [N] int64 image seeds of the rows of the current denoiser call
    call: int            # index of the denoiser evaluation within the sampling run


_STATE: contextvars.ContextVar[Optional[_NoiseState]] = contextvars.ContextVar("autoguidance_noise", default=None)


@contextmanager
def noise_context(seeds: torch.Tensor, call: int):
    """Declare, for denoiser calls inside the block, the image seed of each row and the call index."""
    token = _STATE.set(_NoiseState(as_seeds(seeds), int(call)))
    try:
        yield
    finally:
        _STATE.reset(token)


def current_keys(n: int) -> torch.Tensor:
    """Per-row keys for a batch of `n` rows in the current context: `mix(seed_row, call)`.
    Without a matching context (no sampler, or a batch of another size), the row index stands for the seed."""
    state = _STATE.get()
    if state is not None and len(state.seeds) == n:
        return mix_keys(state.seeds, state.call)
    return mix_keys(torch.arange(n, dtype=torch.int64), -1)
