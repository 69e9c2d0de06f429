"""Reference statistics made elsewhere (`mu`, `sigma`) in the library's form, `RunningStats`.

    stats, meta = read_reference("fid_stats_cifar10_train.npz")              # pytorch-fid / EDM .npz: mu, sigma
    stats, meta = read_reference("img512.pkl", space="inception")           # EDM2 dataset-refs: fid, fd_dinov2
    write_reference("img512-inception.npz", stats, meta)                    # the library's format (below)

    python -m autoguidance.metrics.refstats img512.pkl --space inception --out img512-inception.npz

Formats read:
- the library's own `.npz` (`RunningStats.save`): `n`, `s1`, `s2` (float64 sums), `mu`, `sigma`, optional
  `features`, `meta_*` strings;
- a `.npz` with `mu` [dim] and `sigma` [dim, dim] (pytorch-fid `--save-stats`, NVlabs/edm `fid-refs`), and `n`
  if present;
- NVlabs/edm2 `dataset-refs/*.pkl`: a pickled dict `{num_images, fid: {mu, sigma}, fd_dinov2: {mu, sigma}}`.
  Pickles are read by an allow-list unpickler that can build only dicts, lists, numbers, strings and numpy
  arrays (like `torch.load(weights_only=True)`): it runs no code, and anything else in the file is refused.
  `trust_pickle=True` falls back to Python's unrestricted `pickle.load` (runs code; for files you trust only).

`mu`, `sigma` become sums `s1 = n mu`, `s2 = (n - 1) sigma + n mu mu^T`, so that `mean()` and `cov()` give them
back (to float64 rounding) and the FD equals the FD of the original statistics. When `n` is unknown (pytorch-fid
files), `NOMINAL_N` is used and `meta['n']` says so; the reported `n_ref` is then nominal.

The format written (`write_reference`, the same as `RunningStats.save`): an uncompressed NumPy `.npz`, no
pickled objects, with `n` (int64), `s1` [dim] and `s2` [dim, dim] (float64 sums of features and outer
products), `mu` [dim] and `sigma` [dim, dim] (float64; unbiased covariance), and `meta_space`, `meta_source`,
`meta_n` strings. Other tools need only `mu` and `sigma` (pytorch-fid reads it as is).
"""
from __future__ import annotations

import argparse
import io
import pickle
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .running import RunningStats

__all__ = ["load_reference", "read_reference", "write_reference", "from_moments", "NOMINAL_N", "EDM2_KEYS"]

NOMINAL_N = 50000
EDM2_KEYS = {"inception": "fid", "dinov2": "fd_dinov2"}
_DIMS = {"inception": 2048, "dinov2": 1024}


def from_moments(mu, sigma, n: int) -> RunningStats:
    """`RunningStats` whose `mean()` is `mu` and `cov()` is `sigma` (float64), as if from `n` features."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"mu must be [dim] and sigma [dim, dim], got {list(mu.shape)} and {list(sigma.shape)}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError("reference mu / sigma contain NaN or inf: the statistics file is damaged")
    if int(n) < 2:
        raise ValueError(f"reference statistics need n >= 2 images, got {n}")
    st = RunningStats(len(mu))
    st.n = int(n)
    m = torch.from_numpy(mu.copy())
    st.s1 = m * st.n
    st.s2 = torch.from_numpy(sigma.copy()) * (st.n - 1) + st.n * torch.outer(m, m)
    return st


class _ArraysOnly(pickle.Unpickler):
    """Builds dicts, lists, tuples, numbers, strings and numpy arrays; refuses every other global."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


def _read_pickle(path: Path, trust_pickle: bool) -> dict:
    raw = path.read_bytes()
    try:
        obj = pickle.load(io.BytesIO(raw)) if trust_pickle else _ArraysOnly(io.BytesIO(raw)).load()  # noqa: S301
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds more than arrays and numbers ({e}), so it is refused unread: use an "
                         "EDM2 dataset-refs .pkl or a .npz with mu and sigma, or pass trust_pickle=True if you "
                         "trust the file") from e
    except Exception as e:
        raise ValueError(f"{path} is not a readable pickle ({type(e).__name__}: {str(e)[:120]}): the file is "
                         "damaged; get it again") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not EDM2's dict of statistics")
    return obj


def _pick(d: dict, space: Optional[str], path: Path) -> tuple[dict, str]:
    """The `{mu, sigma}` dict of `space` in an EDM2-style dict (or the dict itself if it holds mu/sigma)."""
    if "mu" in d and "sigma" in d:
        return d, space or ""
    have = [s for s, k in EDM2_KEYS.items() if isinstance(d.get(k), dict)]
    if not have:
        raise ValueError(f"{path} has no 'mu'/'sigma' nor EDM2's 'fid'/'fd_dinov2' statistics (keys: "
                         f"{', '.join(map(str, d))})")
    if space is None:
        if len(have) > 1:
            raise ValueError(f"{path} holds statistics of {' and '.join(have)}: convert the one you need with "
                             f"`python -m autoguidance.metrics.refstats {path} --space {have[0]} --out "
                             f"{path.stem}-{have[0]}.npz` and pass that file")
        space = have[0]
    if space not in have:
        raise ValueError(f"{path} has no statistics for the '{space}' space (it has {', '.join(have)})")
    return d[EDM2_KEYS[space]], space


def load_reference(path, space: Optional[str] = None,
                   trust_pickle: bool = False) -> tuple[RunningStats, Optional[np.ndarray], dict]:
    """`(stats, features or None, meta)` of any reference statistics file: the library's own `.npz` (with its
    features, for precision/recall), a `.npz` with only `mu`/`sigma` (pytorch-fid, EDM), or an EDM2 `.pkl`
    (features None for the last two)."""
    path = Path(path)
    if path.suffix.lower() not in (".pkl", ".pickle"):
        try:
            with np.load(path, allow_pickle=False) as z:
                own = "s1" in z.files
        except (ValueError, OSError):
            own = True          # not an .npz at all: RunningStats.load reports it
        if own:
            return RunningStats.load(path)
    st, meta = read_reference(path, space=space, trust_pickle=trust_pickle)
    return st, None, meta


def read_reference(path, space: Optional[str] = None, n: Optional[int] = None,
                   trust_pickle: bool = False) -> tuple[RunningStats, dict]:
    """`(stats, meta)` from a statistics file in any format the module docstring lists. `space` picks the
    statistics in an EDM2 `.pkl` (required when it holds both) and checks the dimension; `n` overrides the
    image count. The library's own `.npz` also returns its features via `RunningStats.load`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no reference statistics at {path}: pass an existing .npz (mu, sigma) or EDM2 "
                                "dataset-refs .pkl, or compute it with `autoguidance metrics --ref SOURCE "
                                f"--ref-stats {path}`")
    meta: dict = {"source": str(path)}
    if path.suffix.lower() in (".pkl", ".pickle"):
        d = _read_pickle(path, trust_pickle)
        stats_d, space = _pick(d, space, path)
        count = n or d.get("num_images") or stats_d.get("n")
    else:
        try:
            with np.load(path, allow_pickle=False) as z:
                if "s1" in z.files:
                    st, _, own = RunningStats.load(path)
                    return st, own
                stats_d = {k: z[k] for k in ("mu", "sigma", "n") if k in z.files}
        except (ValueError, OSError) as e:
            raise ValueError(f"{path} is not a .npz of statistics ({str(e)[:120]}): pass a .npz with mu and "
                             "sigma (pytorch-fid, EDM), an EDM2 .pkl, or one written by autoguidance") from e
        if "mu" not in stats_d or "sigma" not in stats_d:
            raise ValueError(f"{path} has no 'mu' and 'sigma' arrays: pass a .npz with mu and sigma (pytorch-fid, "
                             "EDM), an EDM2 .pkl, or one written by autoguidance")
        count = n or (int(stats_d["n"]) if "n" in stats_d else None)
    mu, sigma = np.asarray(stats_d["mu"]), np.asarray(stats_d["sigma"])
    if space in _DIMS and mu.shape != (_DIMS[space],):
        raise ValueError(f"{path}: mu has shape {list(mu.shape)}, but '{space}' features are {_DIMS[space]}-d; "
                         "use the statistics of the matching feature network")
    meta["n"] = str(int(count)) if count else f"unknown (nominal {NOMINAL_N})"
    if space:
        meta["space"] = space
    return from_moments(mu, sigma, int(count) if count else NOMINAL_N), meta


def write_reference(path, stats: RunningStats, meta: Optional[dict] = None) -> Path:
    """Write `stats` in the library's documented `.npz` format (see the module docstring)."""
    return stats.save(path, **{k: str(v) for k, v in (meta or {}).items()})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m autoguidance.metrics.refstats",
                                description="Convert reference statistics (pytorch-fid / EDM .npz with mu and "
                                            "sigma, EDM2 dataset-refs .pkl) to autoguidance's .npz format.")
    p.add_argument("src")
    p.add_argument("--space", choices=sorted(EDM2_KEYS), default=None, help="which statistics of an EDM2 .pkl")
    p.add_argument("--out", required=True, help="the .npz to write")
    p.add_argument("--n", type=int, default=None, help="number of images the statistics come from, if known")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle without the allow-list (RUNS CODE; only for files you trust)")
    a = p.parse_args(argv)
    stats, meta = read_reference(a.src, a.space, a.n, a.trust_pickle)
    out = write_reference(a.out, stats, meta)
    print(f"wrote {out}: {stats.dim}-d statistics, n = {meta.get('n')}, space = {meta.get('space', 'unspecified')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
