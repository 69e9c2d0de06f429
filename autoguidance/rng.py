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
it with `current_keys`. Outside a sampler (a plain `D(x, sigma)` call) keys fall back to the row index. A guided
denoiser that calls a denoiser on other rows than its own batch (its passes batched, a row subset) declares each
row's seed with `rows_context`, so a guided denoiser inside it keys its perturbations per image too.
"""
from __future__ import annotations

import contextvars
import math
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

__all__ = ["StackedGenerators", "as_seeds", "DropoutMasks", "dropout_keep", "dropout_scale", "hash_uniform",
           "hash_normal", "mix_keys", "mix_keys_per_salt", "mix_keys_np", "mix_keys_per_salt_np", "dropout_factors",
           "dropout_factors_np",
           "noise_context", "current_keys", "current_state", "SamplingRun", "rows_context"]

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


# -- the same key mixing in numpy uint64, for the small CPU key arrays of every denoiser call ----------------------
# (int64 and uint64 share their bits: wrapping add / multiply and xor agree, and numpy's >> on uint64 is the logical
# shift `_shr` emulates; so these are bit for bit `mix_keys` / `mix_keys_per_salt`, at a third of the per-op cost)

_U = np.uint64


def _splitmix_np(x: np.ndarray) -> np.ndarray:
    x = x + _U(0x9E3779B97F4A7C15)
    x ^= x >> _U(30)
    x *= _U(0xBF58476D1CE4E5B9)
    x ^= x >> _U(27)
    x *= _U(0x94D049BB133111EB)
    x ^= x >> _U(31)
    return x


def _salt_np(v: int) -> np.uint64:
    return _U((int(v) * 0x632BE59BD9B4E019 + 1) & _M64)


def mix_keys_np(keys: np.ndarray, *salts: int) -> np.ndarray:
    """`mix_keys` on a numpy uint64 array (bit for bit)."""
    k = keys
    for v in salts:
        k = _splitmix_np(k ^ _salt_np(v))
    return k


_SALTS: dict = {}


def mix_keys_per_salt_np(keys: np.ndarray, salts: Sequence[int]) -> np.ndarray:
    """`mix_keys_per_salt` on a numpy uint64 array: `[S, N]` (bit for bit)."""
    salts = tuple(salts)
    s = _SALTS.get(salts)
    if s is None:
        if len(_SALTS) > 256:
            _SALTS.clear()
        s = _SALTS[salts] = np.array([_salt_np(v) for v in salts], dtype=np.uint64)[:, None]
    return _splitmix_np(keys[None, :] ^ s)


def _as_u64(keys: torch.Tensor) -> np.ndarray:
    """A CPU int64 key tensor's bits as numpy uint64 (no copy when it already is int64)."""
    return keys.detach().to(torch.int64).numpy().view(np.uint64)


def _low32(keys: np.ndarray) -> torch.Tensor:
    """The low 32 bits of uint64 keys as an int32 tensor (the `seed_n` of `dropout_keep`)."""
    return torch.from_numpy(keys.astype(np.uint32).view(np.int32))


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
    u = torch.empty((len(keys), 2 * half), dtype=torch.int32, device=keys.device)
    return _uniforms16_into(seeds.to(torch.int32), half, u)


def _uniforms16_into(seeds32: torch.Tensor, half: int, u: torch.Tensor) -> torch.Tensor:
    """The hash of `_dropout_uniforms16` for int32 seeds `[...]` (the low 32 bits of the keys), written into `u`
    `[..., 2 * half]` (any strides): high halves first, then low halves."""
    c = _counters(half, seeds32.device)
    x = torch.bitwise_xor(c.view(*([1] * seeds32.ndim), half), seeds32[..., None])
    t = u[..., :half]                                 # scratch space, overwritten by the high halves below
    for shift, mul in _LOWBIAS32:   # x ^= x >>> shift; x *= mul (>> is arithmetic: mask off the sign copies)
        torch.bitwise_right_shift(x, shift, out=t)
        x.bitwise_xor_(t.bitwise_and_((1 << (32 - shift)) - 1))
        if mul is not None:
            x.mul_(mul)
    torch.bitwise_right_shift(x, 16, out=u[..., :half]).bitwise_and_(0xFFFF)   # high halves
    torch.bitwise_and(x, 0xFFFF, out=u[..., half:])                             # low halves
    return u


_ONE_BITS = 0x3F800000                                   # the bit pattern of float32 1.0
_COUNTERS_NP: dict = {}                                  # half -> j * 0x9E3779B9 as uint32 [half]


def dropout_factors_np(seeds: np.ndarray, numel: int, thr_m1: int, inv_bits: int, pad: int = 0) -> torch.Tensor:
    """`dropout_factors` on the CPU for one p for every row (`thr_m1`, `inv_bits` Python ints), from uint32 seeds
    `[S, K]`, in numpy: the same 32-bit hash bit for bit (uint32 wraps as int32 does; numpy shifts uint32
    logically, so no masking), at a fraction of torch's per-op cost on the small arrays of a small net's sites."""
    half = (numel + 1) // 2
    if half >= (1 << 31):
        raise ValueError(f"a dropout site with {numel} elements per row is too large for 32-bit counters")
    c = _COUNTERS_NP.get(half)
    if c is None:
        if len(_COUNTERS_NP) > 256:
            _COUNTERS_NP.clear()
        c = _COUNTERS_NP[half] = (np.arange(half, dtype=np.uint64) * np.uint64(0x9E3779B9)).astype(np.uint32)
    S, K = seeds.shape
    x = np.bitwise_xor(seeds[:, :, None], c)
    t = np.empty_like(x)
    for shift, mul in ((16, 0x7FEB352D), (15, 0x846CA68B), (16, None)):
        np.right_shift(x, np.uint32(shift), out=t)
        x ^= t
        if mul is not None:
            x *= np.uint32(mul)
    u = np.empty((S, pad + K, 2 * half), dtype=np.uint32)
    if pad:
        u[:, :pad] = _ONE_BITS
    d = u[:, pad:]
    np.right_shift(x, np.uint32(16), out=d[..., :half])                    # high halves
    np.bitwise_and(x, np.uint32(0xFFFF), out=d[..., half:])                # low halves
    di = d.view(np.int32)
    np.subtract(np.int32(thr_m1), di, out=di)                              # < 0 exactly where u >= thr (keep)
    np.right_shift(di, np.int32(31), out=di)                               # arithmetic: all ones (keep) or 0
    np.bitwise_and(di, np.int32(inv_bits), out=di)                         # the multiplier's bits
    f = torch.from_numpy(u.view(np.float32))
    return f if 2 * half == numel else f[..., :numel]


def dropout_factors(seeds32: torch.Tensor, numel: int, thr_m1: torch.Tensor, inv_bits: torch.Tensor,
                    pad: int = 0) -> torch.Tensor:
    """Dropout multipliers of many sites of one size at once: float32 `[S, pad + K, numel]` for int32 seeds `[S, K]`
    (site s, degraded row k: the low 32 bits of its key), equal to `DropoutMasks.scale` row by row; rows
    `[:pad]` are exactly 1.0 (the exact rows of a batched call, so one product writes a whole site).
    `thr_m1`, `inv_bits`: `ceil(p 2^16) - 1` and the bits of `1 / (1 - p)`, int32, broadcast over `[K, 1]`."""
    half = (numel + 1) // 2
    if half >= (1 << 31):
        raise ValueError(f"a dropout site with {numel} elements per row is too large for 32-bit counters")
    S, K = seeds32.shape
    u = torch.empty((S, pad + K, 2 * half), dtype=torch.int32, device=seeds32.device)
    if pad:
        u[:, :pad].fill_(_ONE_BITS)
    d = _uniforms16_into(seeds32, half, u[:, pad:] if pad else u)
    torch.sub(thr_m1, d, out=d)                          # < 0 exactly where u >= thr (keep)
    d.bitwise_right_shift_(31).bitwise_and_(inv_bits)    # all ones (keep) or 0, then the multiplier's bits
    f = u.view(torch.float32)
    return f if 2 * half == numel else f[..., :numel]


class DropoutMasks:
    """Dropout multipliers for rows with drop probabilities `p` `[N]`, prepared once per forward call and shared by
    every site: `scale(keys, shape)` is `dropout_scale(keys, shape, p)`."""

    def __init__(self, p: torch.Tensor):
        p32 = torch.as_tensor(p).detach().cpu().to(torch.float32)
        self._same = p32.ndim == 0                    # one p for every row: [1, 1] parameters, broadcast
        p32 = p32.reshape(-1)
        thr = (p32.to(torch.float64) * (1 << 16)).ceil().to(torch.int32)       # drop where u < ceil(p 2^16)
        inv = 1.0 / (1.0 - p32)                                                # float32, as torch's dropout scales
        self._cpu = ((thr - 1)[:, None], inv.view(torch.int32)[:, None])
        self._on = {}

    def _params(self, device, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._on:
            self._on[key] = tuple(t.to(device) for t in self._cpu)
        thr_m1, inv_bits = self._on[key]
        if self._same:
            return thr_m1, inv_bits
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


def as_seeds(seeds, what: str = "seeds") -> torch.Tensor:
    """Image seeds as an int64 `[N]` tensor (accepts a range, a list of ints, or a 1-D integer tensor), each >= 0:
    an image seed is a `torch.Generator` seed (and names the image's PNG). The one check of seeds for every entry
    point (samplers, `generate`, pipelines, the guider, the command line); `what` names them in the error."""
    if isinstance(seeds, torch.Tensor):
        t = seeds
    elif isinstance(seeds, Iterable) and not isinstance(seeds, (str, bytes)):
        seeds = list(seeds)
        t = torch.as_tensor(seeds) if seeds else torch.zeros(0, dtype=torch.int64)   # [] is not a float list
    else:
        raise TypeError(f"{what} must be a sequence of integers (e.g. range(100)), got {type(seeds).__name__}")
    if t.ndim != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{what} must be a 1-D sequence of integers, got dtype {t.dtype} and shape {list(t.shape)}")
    t = t.to(torch.int64)
    if len(t) and bool((t < 0).any()):
        raise ValueError(f"{what} must be integers >= 0 (one image seed each, as torch.Generator.manual_seed takes), "
                         f"got {int(t.min())}")
    return t


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


class SamplingRun:
    """One sampling run (a sampler call): a scratch `cache` for what does not change from one denoiser call to the
    next within it (a perturbation's sites, its sites' output shapes), dropped with the run."""

    __slots__ = ("cache", "__weakref__")

    def __init__(self):
        self.cache: dict = {}


class _NoiseState:
    """What a sampler declares for one denoiser call (read-only by convention)."""

    __slots__ = ("seeds", "call", "run", "sigma", "_u64")

    def __init__(self, seeds: torch.Tensor, call: int, run: Optional[SamplingRun] = None, sigma: Any = None):
        self.seeds = seeds      # [N] int64 image seeds of the rows of the current denoiser call
        self.call = call        # index of the denoiser evaluation within the sampling run
        self.run = run          # the sampling run, when a sampler declares it
        self.sigma = sigma      # the [N] sigma tensor the sampler passes, checked by the sampler
        self._u64 = None

    @property
    def seeds_u64(self) -> Optional[np.ndarray]:
        """The seeds as numpy uint64 (CPU seeds only; None otherwise), for key mixing in numpy."""
        if self._u64 is None and self.seeds.device.type == "cpu":
            run = self.run
            hit = run.cache.get("seeds_u64") if run is not None else None
            if hit is not None and hit[0] is self.seeds:
                self._u64 = hit[1]
            else:
                self._u64 = _as_u64(self.seeds)
                if run is not None:
                    run.cache["seeds_u64"] = (self.seeds, self._u64)
        return self._u64


_STATE: contextvars.ContextVar[Optional[_NoiseState]] = contextvars.ContextVar("autoguidance_noise", default=None)


class _StateContext:
    """Set `self.state` as the noise state of the block (the one enter/exit of both contexts below)."""

    __slots__ = ("state", "token")

    def __enter__(self) -> None:
        self.token = _STATE.set(self.state)

    def __exit__(self, *exc) -> bool:
        _STATE.reset(self.token)
        return False


class noise_context(_StateContext):
    """Declare, for denoiser calls inside the block, the image seed of each row and the call index. A sampler may
    also declare its run (`SamplingRun`: caches that live for the run) and the sigma tensor it passes (which it
    has checked: finite and > 0). Use as `with noise_context(seeds, call): ...`."""

    __slots__ = ()

    def __init__(self, seeds: torch.Tensor, call: int, run: Optional[SamplingRun] = None, sigma=None):
        if not (type(seeds) is torch.Tensor and seeds.dtype == torch.int64 and seeds.ndim == 1):
            seeds = as_seeds(seeds)
        self.state = _NoiseState(seeds, int(call), run, sigma)
        self.token = None


def current_state() -> Optional[_NoiseState]:
    """The noise context of the current denoiser call (None outside a sampler)."""
    return _STATE.get()


def current_keys(n: int) -> torch.Tensor:
    """Per-row keys for a batch of `n` rows in the current context: `mix(seed_row, call)`.
    Without a matching context (no sampler, or a batch of another size), the row index stands for the seed."""
    state = _STATE.get()
    if state is not None and len(state.seeds) == n:
        if state.seeds_u64 is not None:
            return torch.from_numpy(mix_keys_np(state.seeds_u64, state.call).view(np.int64))
        return mix_keys(state.seeds, state.call)
    return mix_keys(torch.arange(n, dtype=torch.int64), -1)


class _RowsState(_NoiseState):
    """The noise state of a call made on rows of the current batch (`rows_context`): its seeds are made only when
    asked for (a plain network never asks; a guided denoiser inside the call does)."""

    __slots__ = ("_base", "_rows", "_repeat", "_chunk", "_seeds")

    def __init__(self, base: torch.Tensor, call: int, run, rows, repeat: int, chunk):
        self._base, self._rows, self._repeat, self._chunk, self._seeds = base, rows, repeat, chunk, None
        self.call, self.run, self.sigma, self._u64 = call, run, None, None

    @property
    def seeds(self) -> torch.Tensor:
        if self._seeds is None:
            s = self._base
            if self._rows is not None:
                s = s[self._rows.to(s.device)]
            elif self._repeat != 1:
                s = s.repeat(self._repeat)
            self._seeds = s if self._chunk is None else s[self._chunk]
        return self._seeds


class rows_context(_StateContext):
    """The noise context of a call made on rows of the current batch of `n` rows: row r of the call is row
    `rows[r]` of the batch, or (no `rows`) the batch repeated `repeat` times, cut to `chunk`. A denoiser called
    inside it (a guided denoiser inside another's batched call) sees each row's own image seed and call index,
    so its `current_keys` are `current_keys(n)` of the rows it got: per image, whatever batch they share. Outside
    a matching context, the row index stands for the seed (call -1), as `current_keys` reads it."""

    __slots__ = ()

    def __init__(self, n: int, rows: Optional[torch.Tensor] = None, repeat: int = 1, chunk: Optional[slice] = None):
        state = _STATE.get()
        if state is not None and len(state.seeds) == n:
            self.state = _RowsState(state.seeds, state.call, state.run, rows, repeat, chunk)
        else:
            self.state = _RowsState(torch.arange(n, dtype=torch.int64), -1, None, rows, repeat, chunk)
        self.token = None
