"""Pixel space as a feature space: images projected on the leading principal components of the training images.

No network stands between the images and the metric, so a claim that holds here does not hinge on what a feature
network learned to see. `PixelPCA.fit(train_images, dim=32)` takes the top `dim` eigenvectors of the training
images' pixel covariance (float64 `eigh`; each vector's sign fixed so its largest-magnitude entry is positive, so
the basis is the same on every machine); `features(x)` is `(flatten(x) - mean) @ components`.

    pca = PixelPCA.fit(load_fashion("train").images, dim=32)
    f = pca.features(images)            # [N, 1, 28, 28] -> [N, 32]
"""
from __future__ import annotations

import hashlib

import torch

__all__ = ["PixelPCA"]


class PixelPCA(torch.nn.Module):
    """Projection of flattened images on `components [P, dim]` after subtracting `mean [P]` (see module docstring)."""

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, shape: tuple):
        super().__init__()
        self.register_buffer("mean", mean.to(torch.float64))
        self.register_buffer("components", components.to(torch.float64))
        self.shape = tuple(shape)

    @classmethod
    def fit(cls, images: torch.Tensor, dim: int = 32) -> "PixelPCA":
        x = images.reshape(len(images), -1).to(torch.float64)
        if not 1 <= dim <= x.shape[1]:
            raise ValueError(f"dim must be in [1, {x.shape[1]}] (pixels per image), got {dim}")
        mean = x.mean(0)
        xc = x - mean
        cov = xc.T @ xc / (len(x) - 1)
        _, vecs = torch.linalg.eigh(cov)                       # ascending eigenvalues
        comps = vecs[:, -dim:].flip(1)                          # leading first
        sign = torch.sign(comps.gather(0, comps.abs().argmax(0, keepdim=True)))
        return cls(mean, comps * sign, tuple(images.shape[1:]))

    def digest(self) -> str:
        """sha256 of the basis (rounded to 1e-9, so the identity survives float noise in the last bits)."""
        q = torch.round(torch.cat([self.mean, self.components.flatten()]) * 1e9).to(torch.int64)
        return hashlib.sha256(q.numpy().tobytes()).hexdigest()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"pixel-space features take images [N, {', '.join(map(str, self.shape))}], "
                             f"got {list(x.shape)}")
        return ((x.reshape(len(x), -1).to(torch.float64) - self.mean) @ self.components).to(torch.float32)
