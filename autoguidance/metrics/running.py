"""Feature statistics that accumulate in pieces and merge exactly: over batches, files, and ranks.

    stats = RunningStats(dim)
    for f in batches:                 # f: [n, dim] features
        stats.update(f)
    stats = stats.all_reduce()        # sum over torch.distributed ranks (no-op in one process)
    mu, sigma = stats.mean(), stats.cov()
    stats.save("ref.npz"); RunningStats.load("ref.npz")

The state is three sums in float64: the count `n`, `s1 = sum_i f_i` `[dim]` and `s2 = sum_i f_i f_i^T`
`[dim, dim]`. Merging adds them, so the statistics of a set do not depend on how it was split (up to the order of
float64 additions). The covariance is the unbiased one, `(s2 - n mu mu^T) / (n - 1)`, as `metrics.frechet` uses.
With features of large mean relative to their spread this one-pass formula loses digits; for the features used
here (unit-scale activations) the float64 error is far below the FD's sampling error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

__all__ = ["RunningStats"]


class RunningStats:
    """Count, sum and sum of outer products of `dim`-dimensional features, in float64."""

    def __init__(self, dim: int):
        if int(dim) != dim or dim < 1:
            raise ValueError(f"feature dimension must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self.n = 0
        self.s1 = torch.zeros(self.dim, dtype=torch.float64)
        self.s2 = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def update(self, features: Union[torch.Tensor, np.ndarray]) -> "RunningStats":
        """Add the rows of `features [n, dim]`."""
        f = torch.as_tensor(features).detach().to("cpu", torch.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"features must be [n, {self.dim}], got {list(f.shape)}")
        if not bool(torch.isfinite(f).all()):
            raise ValueError("features contain NaN or inf: the generator produced non-finite samples?")
        self.n += f.shape[0]
        self.s1 += f.sum(0)
        self.s2 += f.T @ f
        return self

    def merge(self, other: "RunningStats") -> "RunningStats":
        """Add another accumulator's rows (in place; returns self)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        self.n += other.n
        self.s1 += other.s1
        self.s2 += other.s2
        return self

    def all_reduce(self) -> "RunningStats":
        """The sum over all torch.distributed ranks (every rank gets it); in one process, a copy."""
        from ..runs import dist

        flat = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), self.s1, self.s2.flatten()])
        flat = dist.all_reduce_sum(flat)
        out = RunningStats(self.dim)
        out.n = int(round(float(flat[0])))
        out.s1 = flat[1:1 + self.dim].clone()
        out.s2 = flat[1 + self.dim:].reshape(self.dim, self.dim).clone()
        return out

    def mean(self) -> np.ndarray:
        """`mu [dim]` float64."""
        if self.n < 1:
            raise ValueError("no features accumulated: the sample set is empty")
        return (self.s1 / self.n).numpy()

    def cov(self) -> np.ndarray:
        """Unbiased covariance `[dim, dim]` float64: `(s2 - n mu mu^T) / (n - 1)`."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        mu = self.s1 / self.n
        c = (self.s2 - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return ((c + c.T) / 2).numpy()

    # -- files ----------------------------------------------------------------------------------------------------
    def save(self, path, features: Optional[np.ndarray] = None, **meta: str) -> Path:
        """Write an NPZ (no pickle): `n`, `s1`, `s2`, `mu`, `sigma`, optionally the `features` themselves (for
        precision/recall against this reference), and string metadata (e.g. `space='digits'`)."""
        from ..runs.files import atomic_path

        arrays = dict(n=np.array(self.n, dtype=np.int64), s1=self.s1.numpy(), s2=self.s2.numpy(), mu=self.mean(),
                      sigma=self.cov())
        if features is not None:
            arrays["features"] = np.asarray(features, dtype=np.float32)
        for k, v in meta.items():
            arrays[f"meta_{k}"] = np.array(str(v))
        path = Path(path)
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, **arrays)
        return path

    @staticmethod
    def load(path) -> tuple["RunningStats", Optional[np.ndarray], dict]:
        """`(stats, features or None, meta)` from a file written by `save`."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no reference statistics at {path}: compute them once with "
                                    f"`autoguidance metrics --ref SOURCE --ref-stats {path} ...`")
        try:
            with np.load(path, allow_pickle=False) as z:
                s1 = z["s1"]
                st = RunningStats(len(s1))
                st.n, st.s1, st.s2 = int(z["n"]), torch.from_numpy(s1.copy()), torch.from_numpy(z["s2"].copy())
                feats = z["features"].copy() if "features" in z.files else None
                meta = {k[5:]: str(z[k]) for k in z.files if k.startswith("meta_")}
        except (KeyError, ValueError, OSError) as e:
            raise ValueError(f"{path} is not a statistics file written by autoguidance metrics ({e}); delete it and "
                             "compute it again") from e
        return st, feats, meta
