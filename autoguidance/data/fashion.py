"""Fashion-MNIST (Zalando, MIT licence): 70,000 real 28x28 greyscale images of clothing in 10 classes, read from
the four idx files of Debian's `dataset-fashion-mnist` package (nothing is downloaded):

    apt-get install dataset-fashion-mnist      # /usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz

The official split: 60,000 training images (the diffusion models and the feature classifiers train on them) and
10,000 test images (only the metrics' reference statistics and the real-data floor use them). Native 28x28.

    d = load_fashion("train")      # Digits: images [60000, 1, 28, 28] float32, pixel / 255 * 2 - 1, in [-1, 1]
    d.labels                       # [60000, 10] float32 one-hot rows; d.classes [60000] int64
    load_fashion("test")           # the 10,000 test images

Another folder holding the four files (e.g. the upstream `data/fashion` folder) is read from the environment
variable `AUTOGUIDANCE_FASHION_MNIST`.
"""
from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .digits import Digits

__all__ = ["load_fashion", "fashion_dir", "read_idx", "FASHION_CLASSES", "FASHION_NUM_CLASSES", "FASHION_DIR",
           "FASHION_ENV"]

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")   # where Debian's package puts the idx files
FASHION_ENV = "AUTOGUIDANCE_FASHION_MNIST"                # another folder holding them
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
FASHION_NUM_CLASSES = len(FASHION_CLASSES)
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000)}


def fashion_dir() -> Path:
    """The folder the idx files are read from: `$AUTOGUIDANCE_FASHION_MNIST`, else Debian's package folder."""
    return Path(os.environ.get(FASHION_ENV) or FASHION_DIR)


def read_idx(path: Path) -> np.ndarray:
    """One idx file (`.gz` or plain) as a uint8 array: magic `0x0000 08 ndim`, then ndim big-endian int32 sizes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (magic {raw[:4].hex()!r}, expected 000008xx)")
    ndim = raw[3]
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {data.size} bytes after its header, but its shape {shape} needs "
                         f"{int(np.prod(shape))}: the file is truncated")
    return data.reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"Fashion-MNIST file {stem}(.gz) not found in {folder}: install it offline with "
                            f"`apt-get install dataset-fashion-mnist`, or set {FASHION_ENV} to a folder holding the "
                            "four idx files")


@lru_cache(maxsize=4)
def _read_split(folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_stem, labels_stem, count = _FILES[split]
    images = read_idx(_find(Path(folder), images_stem))
    labels = read_idx(_find(Path(folder), labels_stem))
    if images.shape != (count, 28, 28) or labels.shape != (count,):
        raise ValueError(f"Fashion-MNIST {split} files in {folder} hold images {images.shape} and labels "
                         f"{labels.shape}; expected ({count}, 28, 28) and ({count},)")
    if labels.max() >= FASHION_NUM_CLASSES:
        raise ValueError(f"Fashion-MNIST {split} labels in {folder} go up to {labels.max()}; expected 0..9")
    return images, labels.astype(np.int64)


def load_fashion(split: str = "train", subset: str = "all") -> Digits:
    """Load the official split 'train' (60,000 images) or 'test' (10,000), at the native 28x28.

    `subset='half'` keeps a fixed half of the split, stratified by class (every second image of each class in
    file order): the "less training data" guide of Karras et al. 2024."""
    if split not in _FILES:
        raise ValueError(f"fashion split must be 'train' or 'test', got {split!r}")
    if subset not in ("all", "half"):
        raise ValueError(f"fashion subset must be 'all' or 'half', got {subset!r}")
    images, target = _read_split(str(fashion_dir()), split)
    idx = np.arange(len(target))
    if subset == "half":
        idx = np.sort(np.concatenate([idx[target == c][::2] for c in range(FASHION_NUM_CLASSES)]))
    x = torch.from_numpy(images[idx].astype(np.float32) / 255.0 * 2.0 - 1.0).unsqueeze(1)
    classes = torch.from_numpy(target[idx])
    labels = torch.nn.functional.one_hot(classes, FASHION_NUM_CLASSES).to(torch.float32)
    name = split if subset == "all" else f"{split}-half"
    return Digits(f"fashion28-{name}", x, labels, classes, idx)
