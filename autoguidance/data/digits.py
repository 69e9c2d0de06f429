"""scikit-learn's handwritten digits (UCI "Optical Recognition of Handwritten Digits", test part): 1797 real
8x8 greyscale images with 16 grey levels, 10 classes, shipped inside scikit-learn (no download).

A fixed stratified train/test split (seeded, so it is the same on every machine and every version of this
library): `DIGITS_TEST_SIZE` images (50 per class) form the test split, which only the metrics' reference
statistics use; the rest (1297) train the diffusion models and the feature classifier.

    d = load_digits("train")
    d.images   # [1297, 1, 8, 8] float32, pixel / 16 * 2 - 1, so in [-1, 1] (background = -1)
    d.labels   # [1297, 10] float32 one-hot rows
    d.classes  # [1297] int64
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .split import stratified_split

__all__ = ["Digits", "load_digits", "digits_split_indices", "DIGITS_NUM_CLASSES", "DIGITS_SPLIT_SEED",
           "DIGITS_TEST_SIZE", "DIGITS_SHAPE"]

DIGITS_NUM_CLASSES = 10
DIGITS_SPLIT_SEED = 20240601   # seeds the fixed split (numpy RandomState, one permutation per class)
DIGITS_TEST_PER_CLASS = 50     # test images per class
DIGITS_TEST_SIZE = DIGITS_NUM_CLASSES * DIGITS_TEST_PER_CLASS
DIGITS_SHAPE = (1, 8, 8)       # one image's shape [C, H, W]


@dataclass(frozen=True)
class Digits:
    """One split of the digits: `images [N, 1, 8, 8]` float32 in [-1, 1], `labels [N, 10]` float32 one-hot,
    `classes [N]` int64, `indices [N]` positions in scikit-learn's array (for provenance)."""

    split: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: torch.Tensor
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


@lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """`(images [1797, 8, 8] float64 in 0..16, target [1797] int64)`, read from the CSV file scikit-learn ships
    (`sklearn/datasets/data/digits.csv.gz`, the same data as `sklearn.datasets.load_digits`), without importing
    scikit-learn itself (which takes seconds)."""
    import gzip
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ImportError("the digits dataset ships with scikit-learn: install it with `pip install scikit-learn` "
                          "(no download is needed afterwards)")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if not path.exists():  # pragma: no cover - a future layout: fall back to the public loader
        from sklearn.datasets import load_digits as sk_load_digits
        d = sk_load_digits()
        return d.images.astype(np.float64), d.target.astype(np.int64)
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    if table.shape != (1797, 65):
        raise ValueError(f"{path} has shape {table.shape}, expected (1797, 65): an unexpected scikit-learn version")
    return table[:, :64].reshape(-1, 8, 8), table[:, 64].astype(np.int64)


@lru_cache(maxsize=1)
def digits_split_indices() -> tuple[np.ndarray, np.ndarray]:
    """The fixed split: `(train_indices, test_indices)`, sorted, disjoint, covering all 1797 images.
    Per class (in class order), one `RandomState(DIGITS_SPLIT_SEED)` permutation picks the 50 test images."""
    _, target = _sklearn_digits()
    return stratified_split(target, DIGITS_NUM_CLASSES, DIGITS_TEST_PER_CLASS, DIGITS_SPLIT_SEED)


def load_digits(split: str = "train", subset: str = "all") -> Digits:
    """Load split 'train' (1297 images), 'test' (500) or 'all' (1797).

    `subset='half'` keeps a fixed half of the chosen split, stratified by class (every second image of each class
    in index order): the "less training data" guide of Karras et al. 2024."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"digits split must be 'train', 'test' or 'all', got {split!r}")
    if subset not in ("all", "half"):
        raise ValueError(f"digits subset must be 'all' or 'half', got {subset!r}")
    images, target = _sklearn_digits()
    train, test = digits_split_indices()
    idx = {"train": train, "test": test, "all": np.arange(len(target))}[split]
    if subset == "half":
        idx = np.sort(np.concatenate([idx[target[idx] == c][::2] for c in range(DIGITS_NUM_CLASSES)]))
    x = torch.from_numpy((images[idx] / 16.0 * 2.0 - 1.0).astype(np.float32)).unsqueeze(1)
    classes = torch.from_numpy(target[idx])
    labels = torch.nn.functional.one_hot(classes, DIGITS_NUM_CLASSES).to(torch.float32)
    return Digits(split if subset == "all" else f"{split}-half", x, labels, classes, idx)
