"""The classifier whose features the digits metrics use (FD_digits): a small CNN on 8x8 digits. Trained and
used by `autoguidance.metrics.features`; defined here with the other networks so checkpoints can build it."""
from __future__ import annotations

import torch

__all__ = ["DigitsClassifier", "check_grey_images"]


def check_grey_images(x, resolution: int, who: str) -> torch.Tensor:
    """`x` as float32 if it is a batch of grey images `[N, 1, R, R]` (R = `resolution`), else a one-line error."""
    r = resolution
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (1, r, r):
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{who} takes images [N, 1, {r}, {r}] in [-1, 1], got {got}")
    return x.to(torch.float32)


class DigitsClassifier(torch.nn.Module):
    """CNN on `[N, 1, R, R]` images in [-1, 1] (R = `resolution`, even; 8 for the digits, 14 for MNIST at 14x14):
    three 3x3 conv layers (R, R/2, R/2), a 64-d feature layer, a linear classifier.
    `forward -> logits [N, num_classes]`, `features -> [N, feature_dim]`."""

    family = "digits-features"

    def __init__(self,
        num_classes:  int = 10,    # output classes
        channels:     int = 32,    # conv channels (doubled after the stride-2 conv)
        feature_dim:  int = 64,    # width of the feature layer
        dropout:      float = 0.2, # dropout before the classifier, training only
        resolution:   int = 8,     # image side R
    ):
        super().__init__()
        if resolution < 2 or resolution % 2:
            raise ValueError(f"resolution must be an even number >= 2, got {resolution}")
        self.config = dict(num_classes=num_classes, channels=channels, feature_dim=feature_dim, dropout=dropout)
        if resolution != 8:          # the shipped digits net's config predates the setting
            self.config["resolution"] = resolution
        self.resolution = resolution
        c = channels
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, c, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(2 * c, 2 * c, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Flatten(), torch.nn.Linear(2 * c * (resolution // 2) ** 2, feature_dim), torch.nn.SiLU())
        self.drop = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(feature_dim, num_classes)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        return check_grey_images(x, self.resolution, "this feature net")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self._check(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))
