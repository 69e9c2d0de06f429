"""The feature network of the digits metrics: a small CNN classifier trained on the digits' train split.

Its penultimate activations (`features`, 64-d) play the role Inception-v3 plays for FID and DINOv2 for FD_DINOv2:
"FD_digits" is the Frechet distance in this space, and precision/recall/density/coverage use the same features.
Its logits give the accuracy of class-conditional samples (does a sample conditioned on "3" look like a 3?).
Reference statistics come from the test split, which neither the classifier nor the diffusion models saw.

    net = load_feature_net()                  # shipped: autoguidance/weights/digits/features
    f = net.features(images)                  # [N, 1, 8, 8] in [-1, 1] -> [N, 64]
    ref = reference_features()                # test split features [500, 64]
"""
from __future__ import annotations

import math
import time
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint import WEIGHTS_DIR, save
from ..nets.classifier import DigitsClassifier

__all__ = ["DigitsClassifier", "train_feature_net", "load_feature_net", "reference_features", "FEATURES_DIR",
           "extract"]

FEATURES_DIR = WEIGHTS_DIR / "digits" / "features"


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translations by up to one pixel (zero-padded with background -1), per image: `[N, 1, R, R]`."""
    r = x.shape[-1]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2, len(x)), generator=gen)
    rows = (dy[:, None] + torch.arange(r)[None, :])             # [N, R]
    cols = (dx[:, None] + torch.arange(r)[None, :])
    n = torch.arange(len(x))[:, None, None]
    return padded[n, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


@torch.no_grad()
def extract(net: torch.nn.Module, images: torch.Tensor, batch: int = 1024) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`(features [N, dim], logits [N, classes])` of images `[N, 1, R, R]`, in eval mode, clamped to [-1, 1];
    logits are None for a feature net without a classifier head (the self-supervised encoder)."""
    was = net.training
    head = getattr(net, "head", None)
    net.eval()
    try:
        fs, ls = [], []
        for a in range(0, len(images), batch):
            x = images[a:a + batch].clamp(-1, 1)
            f = net.features(x)
            fs.append(f)
            if head is not None:
                ls.append(head(f))
        return torch.cat(fs), (torch.cat(ls) if head is not None else None)
    finally:
        net.train(was)


def train_feature_net(
    out=None,                  # checkpoint folder (None: do not save)
    epochs: int = 40,          # passes over the training split
    batch: int = 64,
    lr: float = 2e-3,          # Adam, cosine decay to 0
    seed: int = 0,
    progress: bool = True,
    meta: Optional[dict] = None,
    data: str = "digits",      # 'digits' (8x8), 'mnist14' (MNIST at 14x14) or 'fashion28' (Fashion-MNIST, 28x28)
) -> DigitsClassifier:
    """Train the classifier on a train split (1-pixel random shifts); its test accuracy goes in the meta."""
    import tqdm

    if data == "digits":
        from ..data.digits import load_digits
        train, test = load_digits("train"), load_digits("test")
    elif data == "mnist14":
        from ..data.mnist import load_mnist
        train, test = load_mnist("train", resolution=14), load_mnist("test", resolution=14)
    elif data == "fashion28":
        from ..data.fashion import load_fashion
        train, test = load_fashion("train"), load_fashion("test")
    else:
        raise ValueError(f"unknown dataset {data!r}: expected 'digits', 'mnist14' or 'fashion28'")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = DigitsClassifier(resolution=train.images.shape[-1])
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * math.ceil(len(train) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    t0 = time.perf_counter()
    for _ in tqdm.trange(epochs, desc=f"train {data} features", disable=not progress, unit="epoch"):
        net.train()
        perm = torch.randperm(len(train), generator=gen)
        for a in range(0, len(perm), batch):
            idx = perm[a:a + batch]
            loss = torch.nn.functional.cross_entropy(net(_shift(train.images[idx], gen)), train.classes[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval().requires_grad_(False)
    acc = {s.split: float((extract(net, s.images)[1].argmax(1) == s.classes).float().mean()) for s in (train, test)}
    record = dict(data=data, epochs=epochs, batch=batch, lr=lr, seed=seed, train_accuracy=acc[train.split],
                  test_accuracy=acc[test.split], train_seconds=round(time.perf_counter() - t0, 1), **(meta or {}))
    net.checkpoint_meta = record
    if out is not None:
        save(net, out, meta=record)
    return net


def load_feature_net(path=None) -> DigitsClassifier:
    """The shipped feature net (or the checkpoint folder `path`), eval mode, gradients off."""
    from ..checkpoint import load

    path = Path(path) if path is not None else FEATURES_DIR
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no digits feature net at {path}: train it with "
                                "`autoguidance digits features --out autoguidance/weights/digits/features`")
    return load(path)


@lru_cache(maxsize=4)
def _reference(path: str) -> torch.Tensor:
    from ..data.digits import load_digits
    return extract(load_feature_net(path), load_digits("test").images)[0]


def reference_features(path=None) -> torch.Tensor:
    """Features `[500, dim]` of the digits test split (the reference set of every digits metric)."""
    return _reference(str(Path(path) if path is not None else FEATURES_DIR))
