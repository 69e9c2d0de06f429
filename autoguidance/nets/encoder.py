"""A self-supervised image encoder: the second, label-free feature space of the image tables (as FD_DINOv2 is to
FID's supervised Inception-v3). Trained by `autoguidance.train.contrastive` (SimCLR's NT-Xent objective) on the
training images only; never sees a class label.

A different architecture from the classifier of the first feature space (`nets.classifier`): four stages with
GroupNorm (no batch statistics, so a feature never depends on the other images of its batch), global average
pooling, and a projection head that only the training objective uses.
"""
from __future__ import annotations

import torch

from .classifier import check_grey_images

__all__ = ["ContrastiveEncoder"]


def _stage(c_in: int, c_out: int, stride: int, groups: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), torch.nn.GroupNorm(groups, c_out), torch.nn.SiLU(),
        torch.nn.Conv2d(c_out, c_out, 3, padding=1), torch.nn.GroupNorm(groups, c_out), torch.nn.SiLU())


class ContrastiveEncoder(torch.nn.Module):
    """CNN encoder of `[N, 1, R, R]` images in [-1, 1]: stages at R, R/2, R/4, R/8 (stride-2 convs), global average
    pooling to `feature_dim` = 4 x `channels`. `features -> [N, feature_dim]` (the metric's space);
    `forward -> [N, projection_dim]` L2-normalised projections (the training objective's space)."""

    family = "contrastive-encoder"

    def __init__(self,
        channels:        int = 32,    # width of the first stage (doubled at each of the next two)
        projection_dim:  int = 64,    # width of the projection head's output
        groups:          int = 8,     # GroupNorm groups
        resolution:      int = 28,    # image side R
    ):
        super().__init__()
        self.config = dict(channels=channels, projection_dim=projection_dim, groups=groups, resolution=resolution)
        self.resolution = resolution
        c = channels
        self.body = torch.nn.Sequential(_stage(1, c, 1, groups), _stage(c, 2 * c, 2, groups),
                                        _stage(2 * c, 4 * c, 2, groups), _stage(4 * c, 4 * c, 2, groups))
        self.feature_dim = 4 * c
        self.projection = torch.nn.Sequential(torch.nn.Linear(4 * c, 4 * c), torch.nn.SiLU(),
                                              torch.nn.Linear(4 * c, projection_dim))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(check_grey_images(x, self.resolution, "this encoder")).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.projection(self.features(x)), dim=1)
