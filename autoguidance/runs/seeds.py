"""Seeds and classes of a run: parsing `--seeds 0-999,2000`, the class of each seed, blocks of seeds per shard."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..rng import as_seeds

MAX_SEEDS = 10_000_000   # one run's seeds at most (one image each)

__all__ = ["MAX_SEEDS", "parse_seeds", "format_seeds", "parse_classes", "labels_for", "shard_blocks"]


def parse_seeds(text: str) -> list[int]:
    """'0-999' (inclusive), '0,5,10-19', or a single seed -> a list of ints, in the given order."""
    out: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            a, sep, b = part.partition("-") if not part.startswith("-") else (part, "", "")
            if sep:
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                if hi - lo + 1 + len(out) > MAX_SEEDS:
                    raise OverflowError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError:
        out = []
    except OverflowError:
        raise ValueError(f"--seeds {text!r} names more than {MAX_SEEDS:,} seeds (one image each): split the run "
                         "into several --seeds ranges") from None
    if not out:
        raise ValueError(f"--seeds must be seeds or inclusive ranges separated by commas (e.g. 0-999 or 0,7,100-199), "
                         f"got {text!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"--seeds {text!r} names some seed twice; each image needs its own seed")
    as_seeds(out, "--seeds")                     # the one check of image seeds: integers >= 0
    return out


def format_seeds(seeds: Sequence[int]) -> str:
    """Inverse of `parse_seeds` with ranges compressed: [0, 1, 2, 5] -> '0-2,5'."""
    parts, i = [], 0
    seeds = list(seeds)
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(f"{seeds[i]}-{seeds[j]}" if j > i else f"{seeds[i]}")
        i = j + 1
    return ",".join(parts)


def parse_classes(text: Optional[str], dim: int) -> Optional[list[int]]:
    """'all' (or None) -> every class of a conditional net, None for an unconditional one; 'none' -> None
    (a conditional net sampled without labels); '3' or '0,2,4' -> list."""
    if text == "none":
        return None
    if text is None or text == "all":
        return list(range(dim)) if dim > 0 else None
    if dim == 0:
        raise ValueError(f"--classes {text} given, but the net is unconditional (label_dim 0); drop --classes")
    try:
        cls = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        cls = []
    if not cls or any(not 0 <= c < dim for c in cls):
        raise ValueError(f"--classes must be 'all', 'none' or class indices in [0, {dim - 1}] separated by commas, "
                         f"got {text!r}")
    return cls


def labels_for(seeds: Sequence[int], classes: Optional[list[int]]) -> np.ndarray:
    """Class of each seed, `classes[s % len(classes)]`, or -1 (unconditional): `[n]` int64."""
    if not classes:
        return np.full(len(seeds), -1, dtype=np.int64)
    return np.array([classes[s % len(classes)] for s in seeds], dtype=np.int64)


def shard_blocks(seeds: Sequence[int], shard_size: int) -> list[list[int]]:
    """Consecutive blocks of `shard_size` seeds (the last may be shorter): shard i = seeds[i*size:(i+1)*size]."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    return [list(seeds[a:a + shard_size]) for a in range(0, len(seeds), shard_size)]
