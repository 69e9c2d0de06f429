"""The classifier whose features the digits metrics use (FD_digits): a small CNN on 8x8 digits. Trained and
used by `autoguidance.metrics.features`; defined here with the other networks so checkpoints can build it."""
from __future__ import annotations

import torch

__all__ = ["DigitsClassifier"]


class DigitsClassifier(torch.nn.Module):
    """CNN on `[N, 1, 8, 8]` images in [-1, 1]: three 3x3 conv layers (8x8, 4x4, 4x4), a 64-d feature layer,
    a linear classifier. `forward -> logits [N, num_classes]`, `features -> [N, feature_dim]`."""

    family = "digits-features"

    def __init__(self,
        num_classes:  int = 10,    # output classes
        channels:     int = 32,    # conv channels (doubled after the stride-2 conv)
        feature_dim:  int = 64,    # width of the feature layer
        dropout:      float = 0.2, # dropout before the classifier, training only
    ):
        super().__init__()
        self.config = dict(num_classes=num_classes, channels=channels, feature_dim=feature_dim, dropout=dropout)
        c = channels
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, c, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(2 * c, 2 * c, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Flatten(), torch.nn.Linear(2 * c * 16, feature_dim), torch.nn.SiLU())
        self.drop = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(feature_dim, num_classes)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"the digits feature net takes images [N, 1, 8, 8] in [-1, 1], got {got}")
        return x.to(torch.float32)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self._check(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))
