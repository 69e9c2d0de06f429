"""Fixed, seeded, per-class train/test splits: the same on every machine and every version of this library."""
from __future__ import annotations

import numpy as np

__all__ = ["stratified_split"]


def stratified_split(target: np.ndarray, num_classes: int, test_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`(train_indices, test_indices)`, sorted and disjoint: per class (in class order), one
    `RandomState(seed)` permutation of that class's indices picks its first `test_per_class` as test images."""
    rs = np.random.RandomState(seed)
    test = []
    for c in range(num_classes):
        idx = np.flatnonzero(target == c)
        if len(idx) < test_per_class:
            raise ValueError(f"class {c} has {len(idx)} images, fewer than the {test_per_class} test images asked")
        test.append(idx[rs.permutation(len(idx))[:test_per_class]])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(target)), test)
    return train, test
