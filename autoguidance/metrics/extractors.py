"""Feature spaces of the sample metrics: samples `[N, ...]` -> features `[N, dim]` float64.

| space       | features                                                              | weights                       |
|-------------|-----------------------------------------------------------------------|-------------------------------|
| `raw`       | the flattened samples (the 2D toy, quick checks)                      | none                          |
| `digits`    | the shipped digits classifier's 64-d penultimate layer (FD_digits);  | shipped (`metrics.features`)  |
|             | its head also gives the accuracy on the conditioning labels           |                               |
| `inception` | Inception-v3 pool features, 2048-d (FID)                              | `--inception-weights PATH`    |
| `dinov2`    | DINOv2 ViT-L/14 class token, 1024-d (FD_DINOv2)                       | `--dinov2-weights PATH`       |

Inception and DINOv2 are never downloaded: the user points to a local TorchScript file or `torch.export`
program (`.pt2`); loading either runs no arbitrary Python, unlike a pickle. Without it, `get_extractor` fails at
once with an error that names the flag and says how to make the file. Image samples are in [-1, 1]; both
networks see them quantised as the PNGs would be (`floor(x * 127.5 + 128)` clamped to [0, 255]), grey images
repeated to 3 channels:

- inception: the module is called on float images in [0, 255], `[N, 3, H, W]`, as NVlabs' detector takes them
  (it resizes to 299 inside); `module(x, return_features=True)` is tried first, then `module(x)`.
- dinov2: images / 255, bicubic resize to 224, ImageNet mean/std normalisation (as NVlabs/edm2 does), then
  `module(x)` -> `[N, 1024]`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

__all__ = ["Extractor", "get_extractor", "SPACES", "check_weights"]

SPACES = ("raw", "digits", "inception", "dinov2")

_HOW = {
    "inception": ("Inception-v3 (FID)", "--inception-weights",
                  "a TorchScript file of the FID Inception-v3 that maps images [N, 3, H, W] in [0, 255] to [N, 2048] "
                  "pool features. Make it once, on a machine with the weights: e.g. NVlabs' detector "
                  "inception-2015-12-05.pkl (StyleGAN3 / EDM2 metrics) re-saved with torch.jit.save, or pytorch-fid's "
                  "InceptionV3 with pt_inception-2015-12-05-6726825d.pth (github.com/mseitzer/pytorch-fid releases) "
                  "traced with torch.jit.trace"),
    "dinov2": ("DINOv2 ViT-L/14 (FD_DINOv2)", "--dinov2-weights",
               "a TorchScript file of DINOv2 ViT-L/14 that maps normalised images [N, 3, 224, 224] to [N, 1024] "
               "features. Make it once: load dinov2_vitl14 from the facebookresearch/dinov2 repository (weights "
               "dinov2_vitl14_pretrain.pth) and save it with torch.jit.trace(model, example).save(PATH)"),
}


def check_weights(space: str, inception_weights: Optional[str] = None, dinov2_weights: Optional[str] = None) -> None:
    """Raise at once (before any sampling or reading) if `space` needs weights that are not given or not there."""
    if space not in SPACES:
        raise ValueError(f"unknown feature space {space!r}: expected one of {', '.join(SPACES)}")
    if space not in _HOW:
        return
    what, flag, how = _HOW[space]
    path = inception_weights if space == "inception" else dinov2_weights
    if not path:
        raise FileNotFoundError(f"feature space '{space}' needs local {what} weights: pass {flag} PATH, {how}. "
                                "autoguidance never downloads weights.")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file. It must be {how}.")


class Extractor:
    """`extractor(samples [N, ...]) -> [N, dim]` float64 features, computed in batches of `batch`. `classify`,
    when the feature network is a classifier (digits), maps features `[N, dim]` to class logits `[N, classes]`."""

    def __init__(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor], batch: int = 256, device="cpu",
                 classify: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.name, self.fn, self.batch, self.device = name, fn, batch, torch.device(device)
        self.classify = classify

    @torch.no_grad()
    def correct(self, features: torch.Tensor, labels) -> tuple[int, int]:
        """`(correct, labelled)`: rows whose label (>= 0; -1 = none) is the classifier's argmax, and rows with a
        label. `(0, 0)` when the network is not a classifier."""
        labels = torch.as_tensor(labels, dtype=torch.int64)
        has = labels >= 0
        if self.classify is None or not bool(has.any()):
            return 0, 0
        pred = self.classify(features[has].to(self.device, torch.float32)).argmax(1).cpu()
        return int((pred == labels[has]).sum()), int(has.sum())

    @torch.no_grad()
    def __call__(self, samples) -> torch.Tensor:
        x = torch.as_tensor(samples)
        out = [self.fn(x[a:a + self.batch].to(self.device, torch.float32)).to("cpu", torch.float64)
               for a in range(0, len(x), self.batch)]
        return torch.cat(out) if out else torch.zeros(0, 1, dtype=torch.float64)


def _images_255(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"this feature network takes images [N, 1 or 3, H, W] in [-1, 1], got {list(x.shape)}")
    x = (x * 127.5 + 128).floor().clamp(0, 255)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _torchscript(path: str, flag: str, device) -> Callable:
    """A TorchScript file (`torch.jit.save`), or a `torch.export` program (`.pt2`, `torch.export.save`)."""
    try:
        if str(path).endswith(".pt2"):
            return torch.export.load(path).module().to(device)
        return torch.jit.load(path, map_location=device).eval()
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{flag} {path} is not a TorchScript file ({str(e).splitlines()[0]}). Pickles are not "
                         "loaded (they run code); export the network with torch.jit.save / torch.jit.trace, or "
                         "torch.export.save to a .pt2 file") from e


def get_extractor(space: str, *, inception_weights: Optional[str] = None, dinov2_weights: Optional[str] = None,
                  digits_weights: Optional[str] = None, batch: int = 256, device="cpu") -> Extractor:
    """The feature extractor of `space` (see the module docstring)."""
    check_weights(space, inception_weights, dinov2_weights)
    if space == "raw":
        return Extractor("raw", lambda x: x.reshape(len(x), -1), batch=1 << 16, device=device)
    if space == "digits":
        from .features import load_feature_net

        net = load_feature_net(digits_weights).to(device)
        return Extractor("digits", lambda x: net.features(x.clamp(-1, 1)), batch=batch, device=device,
                         classify=net.head)
    if space == "inception":
        net = _torchscript(inception_weights, "--inception-weights", device)

        def inception(x):
            x = _images_255(x)
            try:
                return net(x, return_features=True)
            except (RuntimeError, TypeError):
                return net(x)
        return Extractor("inception", inception, batch=batch, device=device)
    net = _torchscript(dinov2_weights, "--dinov2-weights", device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).reshape(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).reshape(1, 3, 1, 1)

    def dinov2(x):
        x = _images_255(x) / 255
        x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", antialias=True)
        return net((x - mean) / std)
    return Extractor("dinov2", dinov2, batch=batch, device=device)
