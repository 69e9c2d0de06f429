"""The exact 2D ground truth of Karras et al. (2024), Fig. 1 and App. C: a Gaussian mixture shaped as a tree.

Every quantity is exact: heat diffusion to noise level sigma adds sigma^2 * I to each component's covariance,
so `p(x; sigma)`, its log and its score are closed-form. Log-densities use log-sum-exp, so they stay finite
far away from the tree where a plain sum of densities underflows.

Shapes: `x` is `[N, 2]`; `sigma` a Python float, a 0-d tensor or an `[N]` tensor.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["GaussianMixture", "TreeComponents", "tree_components", "tree_mixture", "CLASSES"]

CLASSES = ("A", "B", "AB")

# Construction constants (RESEARCH.md section 3).
_SEED = 2
_MAX_DEPTH = 7
_ORIGIN = np.array([0.0030, 0.0325])
_SCALE = np.array([1.3136, 1.3844])
_START_ANGLE = {"A": math.pi * 0.25, "B": math.pi * 1.25}
_COMPONENTS_PER_SEGMENT = 8


@dataclass(frozen=True)
class TreeComponents:
    """The raw construction, in float64 numpy, for both classes in construction order."""

    cls: np.ndarray      # [K] 'A' or 'B'
    segment: np.ndarray  # [K] index of the branch segment within its class (0..126, depth-first order)
    depth: np.ndarray    # [K] depth of the segment (0..6)
    phi: np.ndarray      # [K] unnormalised weight
    mu: np.ndarray       # [K, 2]
    Sigma: np.ndarray    # [K, 2, 2]


@functools.lru_cache(maxsize=None)
def tree_components() -> TreeComponents:
    """Build the tree of both classes with one `RandomState(2)`, depth-first, class A first."""
    rnd = np.random.RandomState(_SEED)
    rows: list[tuple] = []
    counters = {"A": 0, "B": 0}

    def segment(cls: str, depth: int, pos: np.ndarray, angle: float) -> None:
        if depth >= _MAX_DEPTH:
            return
        direction = np.array([np.cos(angle), np.sin(angle)])
        dist = 0.292 * 0.8**depth * (1 + 0.2 * rnd.randn())  # drawn on entering the segment
        thick = 0.2 * 0.8**depth / dist
        size = _SCALE * dist * 0.06
        outer = np.outer(direction, direction)
        Sigma = (outer + (np.eye(2) - outer) * thick**2) * np.outer(size, size)
        index = counters[cls]
        counters[cls] += 1
        for t in np.linspace(0.07, 0.93, _COMPONENTS_PER_SEGMENT):
            mu = (pos + direction * dist * t) * _SCALE
            rows.append((cls, index, depth, dist * 0.5**depth, mu, Sigma))
        for sign in (1, -1):  # the child's angle is drawn just before descending into it
            child_angle = angle + sign * 0.7**depth * (1 + 0.2 * rnd.randn())
            segment(cls, depth + 1, pos + direction * dist, child_angle)

    for cls in ("A", "B"):
        segment(cls, 0, _ORIGIN, _START_ANGLE[cls])
    cls, seg, depth, phi, mu, Sigma = zip(*rows)
    return TreeComponents(np.array(cls), np.array(seg), np.array(depth), np.array(phi),
                          np.stack(mu), np.stack(Sigma))


def _check_classes(classes: str) -> str:
    if classes not in CLASSES:
        raise ValueError(f"unknown toy class {classes!r}: expected one of {', '.join(map(repr, CLASSES))}")
    return classes


class GaussianMixture:
    """A 2D Gaussian mixture with exact heat-diffused density, score and sampling.

    Each covariance is stored by its eigendecomposition `Sigma_k = Q_k diag(L_k) Q_k^T`, so the diffused
    covariance `Sigma_k + sigma^2 I = Q_k diag(L_k + sigma^2) Q_k^T` costs no matrix inverse.
    """

    def __init__(self, phi: np.ndarray, mu: np.ndarray, Sigma: np.ndarray, segment: np.ndarray | None = None):
        phi = np.asarray(phi, dtype=np.float64)
        L, Q = np.linalg.eigh(np.asarray(Sigma, dtype=np.float64))
        self.dim = mu.shape[1]
        self.log_phi = torch.tensor(np.log(phi / phi.sum()), dtype=torch.float32)  # [K]
        self.phi = self.log_phi.exp()
        self.mu = torch.tensor(mu, dtype=torch.float32)                             # [K, 2]
        self.Sigma = torch.tensor(Sigma, dtype=torch.float32)                       # [K, 2, 2]
        self.L = torch.tensor(L, dtype=torch.float32)                               # [K, 2]
        self.Q = torch.tensor(Q, dtype=torch.float32)                               # [K, 2, 2], columns = eigvecs
        # Flattened eigenbasis layout: column (j, k) of `_Qm` is eigenvector j of component k, so projecting a
        # batch on every component's eigenbasis is one matmul and all per-component work is elementwise.
        K = self.mu.shape[0]
        self._Qm = self.Q.permute(1, 2, 0).reshape(self.dim, self.dim * K).contiguous()    # [2, 2K]
        self._mu_rot = (self.mu[:, None, :] @ self.Q)[:, 0].t().reshape(1, -1).contiguous()  # [1, 2K]
        self._L = self.L.t().reshape(1, -1).contiguous()                                     # [1, 2K]
        self.segment = None if segment is None else torch.as_tensor(segment, dtype=torch.long)
        self._cdf = torch.tensor(np.cumsum(phi / phi.sum()), dtype=torch.float64)

    @property
    def num_components(self) -> int:
        return self.mu.shape[0]

    # -- checks ---------------------------------------------------------------------------------------------
    def _prepare(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape [N, {self.dim}], got {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [N, {self.dim}], got {list(x.shape)}")
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        elif sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a scalar or have shape [{x.shape[0]}], got {list(sigma.shape)}")
        if not torch.all(torch.isfinite(sigma)) or torch.any(sigma < 0):
            raise ValueError("sigma must be finite and >= 0")
        return x, sigma

    # -- core evaluation ------------------------------------------------------------------------------------
    def _log_terms(self, x: torch.Tensor, sigma: torch.Tensor):
        """Per-component `log(phi_k N(x; mu_k, Sigma_k + sigma^2 I))` `[N, K]` and the rotated
        `inv(Sigma'_k)(mu_k - x)` `[N, 2K]` (eigenbasis of component k; column layout (j, k))."""
        K = self.num_components
        r = torch.addmm(self._mu_rot, x, self._Qm, alpha=-1)            # (mu - x) in each eigenbasis
        var = self._L + (sigma * sigma)[:, None]                        # eigenvalues of Sigma + sigma^2 I
        z = r / var
        rz = r.mul_(z).view(-1, self.dim, K)                            # squared Mahalanobis terms
        v = var.view(-1, self.dim, K)
        log_w = torch.log(v.prod(1)).add_(rz.sum(1)).mul_(-0.5)
        log_w.add_(self.log_phi - 0.5 * self.dim * math.log(2 * math.pi))
        return log_w, z

    def _chunks(self, n: int, chunk: int):
        for start in range(0, n, chunk):
            yield slice(start, min(start + chunk, n))

    def logp(self, x: torch.Tensor, sigma=0.0, chunk: int = 256) -> torch.Tensor:
        """Exact `log p(x; sigma)`: `[N]`, finite everywhere."""
        x, sigma = self._prepare(x, sigma)
        out = [torch.logsumexp(self._log_terms(x[s], sigma[s])[0], dim=1) for s in self._chunks(len(x), chunk)]
        return torch.cat(out) if out else x.new_zeros(0)

    def score(self, x: torch.Tensor, sigma=0.0, chunk: int = 256) -> torch.Tensor:
        """Exact score `grad_x log p(x; sigma)`: `[N, 2]`."""
        x, sigma = self._prepare(x, sigma)
        out = []
        for s in self._chunks(len(x), chunk):
            log_w, z = self._log_terms(x[s], sigma[s])
            resp = torch.softmax(log_w, dim=1)                          # posterior responsibilities
            z = z.view(len(resp), self.dim, -1).mul_(resp[:, None]).view(len(resp), -1)
            out.append(z @ self._Qm.t())                                # sum_k resp_k inv(Sigma'_k)(mu_k - x)
        return torch.cat(out) if out else x.new_zeros(0, self.dim)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The ideal denoiser `D(x; sigma) = x + sigma^2 * score` (Tweedie): `[N, 2]`."""
        x, sigma_v = self._prepare(x, sigma)
        return x + sigma_v[:, None] ** 2 * self.score(x, sigma_v)

    def responsibilities(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """Posterior probability of each component given x: `[N, K]`."""
        x, sigma = self._prepare(x, sigma)
        return torch.softmax(self._log_terms(x, sigma)[0], dim=1)

    def most_responsible(self, x: torch.Tensor, sigma=0.0, chunk: int = 256) -> torch.Tensor:
        """Index of the most responsible component for each point: `[N]` long."""
        x, sigma = self._prepare(x, sigma)
        out = [self._log_terms(x[s], sigma[s])[0].argmax(1) for s in self._chunks(len(x), chunk)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def sample(self, n: int, sigma=0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """`n` exact samples of `p(x; sigma)`: `[n, 2]`, reproducible from `generator`."""
        if int(n) != n or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        n = int(n)
        sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(n)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        k = torch.searchsorted(self._cdf, u).clamp_(max=self.num_components - 1)
        eps = torch.randn(n, self.dim, generator=generator)
        std = (self.L[k] + sigma[:, None] ** 2).sqrt()                  # [n, 2]
        return self.mu[k] + torch.einsum("nij,nj->ni", self.Q[k], std * eps)


@functools.lru_cache(maxsize=None)
def tree_mixture(classes: str = "A") -> GaussianMixture:
    """The ground-truth tree mixture for `'A'`, `'B'` or `'AB'` (weights renormalised over the chosen classes)."""
    _check_classes(classes)
    c = tree_components()
    sel = np.isin(c.cls, list(classes))
    segment = c.segment[sel] + np.where(c.cls[sel] == "B", 127, 0)
    return GaussianMixture(c.phi[sel], c.mu[sel], c.Sigma[sel], segment=segment)
