"""Self-supervised training of the label-free feature space (`nets.encoder.ContrastiveEncoder`): SimCLR (Chen et al.
2020, arXiv 2002.05709), two augmented views of each image, the NT-Xent loss at temperature `tau`:

    l(i, j) = -log exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau)      s = cosine similarity of the projections

over the 2B views of a batch (the positive of view i is the other view of the same image). Augmentations, per
image, from one seeded generator: a random resized crop (area 50-100% of the image, aspect 3/4-4/3, bilinear,
background-filled), a horizontal flip (p 0.5), a contrast and brightness jitter, Gaussian pixel noise. The encoder
never sees a label; its quality is reported as the k-nearest-neighbour accuracy (k = 20, cosine) of its features
on the test split, with the training split as the memory bank.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch

from ..checkpoint import save
from ..nets.encoder import ContrastiveEncoder

__all__ = ["augment", "nt_xent", "knn_accuracy", "train_contrastive"]


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random view of each image `[N, 1, R, R]` in [-1, 1] (background -1); see the module docstring."""
    n = len(x)
    u = torch.rand(n, 7, generator=gen)
    area = 0.5 + 0.5 * u[:, 0]
    aspect = torch.exp((u[:, 1] - 0.5) * 2 * math.log(4 / 3))
    fw = (area * aspect).sqrt().clamp(max=1.0)                  # crop width and height as fractions of the image
    fh = (area / aspect).sqrt().clamp(max=1.0)
    tx = (2 * u[:, 2] - 1) * (1 - fw)                           # crop centre, inside the image
    ty = (2 * u[:, 3] - 1) * (1 - fh)
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = fw * flip, tx, fh, ty
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    y = torch.nn.functional.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) / 2
    contrast = (0.6 + 0.8 * u[:, 5]).reshape(-1, 1, 1, 1)         # y in [0, 1] here
    brightness = (0.4 * u[:, 6] - 0.2).reshape(-1, 1, 1, 1)
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * contrast + mean + brightness
    y = y + 0.05 * torch.randn(y.shape, generator=gen)
    return (y.clamp(0, 1) * 2 - 1).to(x.dtype)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss of two batches of L2-normalised projections `[B, d]` (view i of z1 pairs with i of z2)."""
    z = torch.cat([z1, z2])
    sim = z @ z.T / tau
    sim.fill_diagonal_(float("-inf"))
    b = len(z1)
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    return torch.nn.functional.cross_entropy(sim, target)


@torch.no_grad()
def knn_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, chunk: int = 1000) -> float:
    """Accuracy of a k-nearest-neighbour majority vote (cosine similarity) of test features among train features."""
    a = torch.nn.functional.normalize(train_f.double(), dim=1)
    correct = 0
    for s in range(0, len(test_f), chunk):
        q = torch.nn.functional.normalize(test_f[s:s + chunk].double(), dim=1)
        idx = (q @ a.T).topk(k, dim=1).indices
        votes = torch.nn.functional.one_hot(train_y[idx], int(train_y.max()) + 1).sum(1)
        correct += int((votes.argmax(1) == test_y[s:s + chunk]).sum())
    return correct / len(test_f)


def train_contrastive(
    train, test,                    # Digits-like splits: .images [N, 1, R, R] in [-1, 1], .classes (evaluation only)
    out=None,                       # checkpoint folder (None: do not save)
    epochs:   int = 8,              # passes over the training split
    batch:    int = 256,            # images per step (2 x batch views)
    lr:       float = 2e-3,         # AdamW, linear warm-up over the first 5% of steps, cosine decay to 0
    weight_decay: float = 1e-4,
    tau:      float = 0.2,          # NT-Xent temperature
    channels: int = 32,
    seed:     int = 0,
    progress: bool = True,
    meta:     Optional[dict] = None,
) -> ContrastiveEncoder:
    """Train a `ContrastiveEncoder` on `train.images` with SimCLR; its kNN test accuracy goes in the meta."""
    import tqdm

    from ..metrics.features import extract

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = ContrastiveEncoder(channels=channels, resolution=train.images.shape[-1])
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    per_epoch = len(train) // batch
    steps = epochs * per_epoch
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min((t + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps))))
    t0 = time.perf_counter()
    bar = tqdm.tqdm(total=steps, desc="train contrastive encoder", disable=not progress, unit="step")
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(train), generator=gen)
        for s in range(per_epoch):
            x = train.images[perm[s * batch:(s + 1) * batch]]
            loss = nt_xent(net(augment(x, gen)), net(augment(x, gen)), tau)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            if s % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    net.eval().requires_grad_(False)
    f_train, f_test = extract(net, train.images)[0], extract(net, test.images)[0]
    record = dict(data=train.split, epochs=epochs, batch=batch, lr=lr, weight_decay=weight_decay, tau=tau, seed=seed,
                  knn20_test_accuracy=knn_accuracy(f_train, train.classes, f_test, test.classes),
                  train_seconds=round(time.perf_counter() - t0, 1), **(meta or {}))
    net.checkpoint_meta = record
    if out is not None:
        save(net, out, meta=record)
    return net
