"""The Inception-v3 of FID (Heusel et al. 2017), written here, loading pytorch-fid's state dict.

    net = load_fid_inception("pt_inception-2015-12-05-6726825d.pth")      # torch.load(weights_only=True)
    feats = net(preprocess(images_255, "nvlabs"))                         # [N, 2048] pool features

The network is TensorFlow's `inception-2015-12-05` graph as FID uses it: torchvision's Inception-v3 layout
(module names `Conv2d_1a_3x3 ... Mixed_7c`, `fc` with 1008 classes) with TF's quirks: average pools that do not
count the zero padding, and a max pool in the last block's pool branch. The output is the 2048-d global average
pool. The weight file is pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (also torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth`): a plain state dict, read with `torch.load(weights_only=True)`, so
loading it runs no code.

Two input conventions, both from uint8-valued images `[N, 3, H, W]` as floats in [0, 255]:

- `"nvlabs"` (default): NVlabs' detector `inception-2015-12-05.pkl` (StyleGAN3, EDM, EDM2 metrics), which
  reproduces the TF graph: TF1's bilinear resize to 299 (`align_corners=False` without half-pixel centres:
  output pixel j samples input coordinate `j * in / 299`, clamped at the border), then `(x - 128) / 128`.
- `"pytorch-fid"`: pytorch-fid: `x / 255`, PyTorch's bilinear resize to 299 (`align_corners=False`, half-pixel
  centres), then `2 x - 1`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from ..runs.files import file_sha256
from .weights import read_state_dict, state_mismatch

__all__ = ["FIDInceptionV3", "preprocess", "resize_tf1", "load_fid_inception", "check_inception_state",
           "CONVENTIONS", "OFFICIAL_FILE", "OFFICIAL_SHA256_PREFIX", "WHERE"]

CONVENTIONS = ("nvlabs", "pytorch-fid")
OFFICIAL_FILE = "pt_inception-2015-12-05-6726825d.pth"
# OFFICIAL: the release file name carries the first 8 hex digits of its SHA-256 (torch.hub's `check_hash`
# convention, github.com/mseitzer/pytorch-fid/releases/tag/fid_weights). No full official digest is published.
OFFICIAL_SHA256_PREFIX = "6726825d"
WHERE = ("github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + OFFICIAL_FILE +
         " (the same file as torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")


class _Conv(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, TF's), ReLU. Keys `conv.weight`, `bn.*`."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)   # TF's SAME average pool


class _BlockA(nn.Module):     # 35x35: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg-1x1
    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], 1)


class _BlockB(nn.Module):     # 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | max/2
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockC(nn.Module):     # 17x17 with factorised 7x7 convolutions
    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = _Conv(cin, c7, 1), _Conv(c7, c7, **row)
        self.branch7x7_3 = _Conv(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = _Conv(cin, c7, 1), _Conv(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = _Conv(c7, c7, **row), _Conv(c7, c7, **col)
        self.branch7x7dbl_5 = _Conv(c7, 192, **row)
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class _BlockD(nn.Module):     # 17 -> 8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):     # 8x8 with split 1x3 / 3x1 outputs; `max_pool`: the last block's TF quirk
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 448, 1), _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        s = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(s), self.branch3x3_2b(s),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """`net(x [N, 3, H, W] preprocessed) -> [N, 2048]` pool features (`fc` is kept only so that the official state
    dict loads strictly; it is not used)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _BlockA(192, 32), _BlockA(256, 64), _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b, self.Mixed_6c = _BlockC(768, 128), _BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _BlockC(768, 160), _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b, self.Mixed_7c = _BlockE(1280, max_pool=False), _BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean((2, 3))


def resize_tf1(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """TF1's `resize_bilinear(align_corners=False)`: output pixel j reads input coordinate `j * in / size`
    (no half-pixel centres), the neighbour index clamped at the last pixel. Separable; exact for `in == size`."""
    for dim in (2, 3):
        n = x.shape[dim]
        if n == size:
            continue
        src = torch.arange(size, dtype=torch.float64) * (n / size)
        i0 = src.floor().long().clamp(max=n - 1)
        i1 = (i0 + 1).clamp(max=n - 1)
        w = (src - i0).to(x.dtype)
        shape = [1, 1, 1, 1]
        shape[dim] = size
        w = w.to(x.device).reshape(shape)
        a, b = x.index_select(dim, i0.to(x.device)), x.index_select(dim, i1.to(x.device))
        x = a + (b - a) * w
    return x


def preprocess(x255: torch.Tensor, convention: str = "nvlabs") -> torch.Tensor:
    """Images `[N, 3, H, W]` float in [0, 255] -> the network's input `[N, 3, 299, 299]` (see the module doc)."""
    if convention == "nvlabs":
        return (resize_tf1(x255, 299) - 128) / 128
    if convention == "pytorch-fid":
        x = F.interpolate(x255 / 255, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1
    raise ValueError(f"unknown Inception convention {convention!r}: expected one of {', '.join(CONVENTIONS)}")


def _expected_shapes() -> dict:
    with torch.device("meta"):
        net = FIDInceptionV3()
    return {k: tuple(v.shape) for k, v in net.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def check_inception_state(state, path: str, flag: str = "--inception-weights") -> dict:
    """The state dict without `num_batches_tracked`, after checking its key set and shapes (one-line errors)."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{flag} {path} is not a state dict of tensors: pass {OFFICIAL_FILE} from {WHERE}")
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    want = _expected_shapes()
    what = state_mismatch(state, want)
    if what:
        raise ValueError(f"{flag} {path} is not the FID Inception-v3 state dict ({what}): pass {OFFICIAL_FILE} "
                         f"from {WHERE}")
    return state


def load_fid_inception(path: Union[str, Path], *, official_only: bool = True, device="cpu",
                       flag: str = "--inception-weights") -> FIDInceptionV3:
    """`FIDInceptionV3` with the weights of a state-dict file, read with `torch.load(weights_only=True)`.

    With `official_only` (default) the file's SHA-256 must start with the official file's `6726825d`; pass
    `official_only=False` for other weights of the same architecture (tests; FID values are then not comparable
    with published ones). The key set and shapes are always checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file. FID needs {OFFICIAL_FILE} (SHA-256 begins "
                                f"{OFFICIAL_SHA256_PREFIX}) from {WHERE}; autoguidance never downloads weights")
    if official_only:
        digest = file_sha256(path)
        if not digest.startswith(OFFICIAL_SHA256_PREFIX):
            raise ValueError(f"{flag} {path} is not {OFFICIAL_FILE}: its SHA-256 is {digest[:16]}..., the official "
                             f"file's begins {OFFICIAL_SHA256_PREFIX}; get it from {WHERE}")
    state = read_state_dict(path, flag, f"pass {OFFICIAL_FILE} from {WHERE}")
    net = FIDInceptionV3()
    net.load_state_dict(check_inception_state(state, str(path), flag), strict=False)
    return net.eval().requires_grad_(False).to(device)
