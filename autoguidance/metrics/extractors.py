"""Feature spaces of the sample metrics: samples `[N, ...]` -> features `[N, dim]` float64.

| space       | features                                                              | weights                       |
|-------------|-----------------------------------------------------------------------|-------------------------------|
| `raw`       | the flattened samples (the 2D toy, quick checks)                      | none                          |
| `digits`    | the shipped digits classifier's 64-d penultimate layer (FD_digits);  | shipped (`metrics.features`)  |
|             | its head also gives the accuracy on the conditioning labels           |                               |
| `inception` | Inception-v3 pool features, 2048-d (FID)                              | `--inception-weights PATH`    |
| `dinov2`    | DINOv2 ViT-L/14 class token after the final norm, 1024-d (FD_DINOv2)  | `--dinov2-weights PATH`       |

Inception and DINOv2 are never downloaded. The networks are the library's own (`metrics.inception`,
`metrics.dinov2`) and read the files researchers have as plain state dicts, with `torch.load(weights_only=True)`,
which runs no code: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (SHA-256 prefix checked) and
`dinov2_vitl14_pretrain.pth` (key set and shapes checked). Files that run code when loaded -- pickles (`.pkl`,
e.g. NVlabs' `inception-2015-12-05.pkl`), TorchScript archives (`torch.jit.save`) and `torch.export` programs
(`.pt2`) -- are refused unless the caller passes `trust_pickle=True` (`--trust-pickle`); then the module is called
as below. `check_weights` reports a missing or refused file at once, before any sampling.

Image samples are in [-1, 1]; both networks see them quantised as the PNGs would be (`floor(x * 127.5 + 128)`
clamped to [0, 255]), grey images repeated to 3 channels:

- inception: convention `nvlabs` (default; NVlabs' detector as used by StyleGAN3 / EDM / EDM2, = the TF FID
  graph: TF1 bilinear resize to 299, `(x - 128) / 128`) or `pytorch-fid` (`x / 255`, PyTorch bilinear resize to
  299, `2x - 1`); see `metrics.inception`. A trusted NVlabs pickle / TorchScript module is called on floats in
  [0, 255], `[N, 3, H, W]` (it resizes inside): `module(x, return_features=True)`, else `module(x)`.
- dinov2: EDM2's preprocessing: bicubic antialiased resize to 224, / 255, ImageNet mean / std; then the network
  (or a trusted module) -> `[N, 1024]`.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Callable, Optional

import torch

__all__ = ["Extractor", "get_extractor", "SPACES", "check_weights", "weights_kind"]

SPACES = ("raw", "digits", "inception", "dinov2")
_FLAG = {"inception": "--inception-weights", "dinov2": "--dinov2-weights"}


def _official(space: str) -> tuple[str, str, str]:
    """(what, official file, where) of a network space."""
    if space == "inception":
        from . import inception as m
        return "Inception-v3 (FID)", f"{m.OFFICIAL_FILE} (SHA-256 begins {m.OFFICIAL_SHA256_PREFIX})", m.WHERE
    from . import dinov2 as m
    return "DINOv2 ViT-L/14 (FD_DINOv2)", m.OFFICIAL_FILE, m.WHERE


def weights_kind(path) -> str:
    """What a weight file is, from its name and (for zip archives) its member names, without loading it:
    `state_dict` (torch.save archive or legacy file; read with weights_only), `torchscript`, `export` (`.pt2`),
    or `pickle` (`.pkl` / `.pickle`)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in (".pkl", ".pickle"):
        return "pickle"
    if suffix == ".pt2":
        return "export"
    if zipfile.is_zipfile(p):
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "state_dict"     # let torch.load(weights_only=True) report the damage
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        if any("serialized_exported_program" in n or n.endswith("archive_format") for n in names):
            return "export"
    return "state_dict"


def check_weights(space: str, inception_weights: Optional[str] = None, dinov2_weights: Optional[str] = None,
                  trust_pickle: bool = False) -> None:
    """Raise at once (before any sampling or reading) if `space` needs weights that are not given, not there, or
    of a kind that runs code when loaded (pickle, TorchScript, .pt2) while `trust_pickle` is False."""
    if space not in SPACES:
        raise ValueError(f"unknown feature space {space!r}: expected one of {', '.join(SPACES)}")
    if space not in _FLAG:
        return
    what, official, where = _official(space)
    flag = _FLAG[space]
    path = inception_weights if space == "inception" else dinov2_weights
    if not path:
        raise FileNotFoundError(f"feature space '{space}' needs local {what} weights: pass {flag} PATH, the file "
                                f"{official} from {where}. autoguidance never downloads weights.")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file. It must be {official} from {where}; autoguidance "
                                "never downloads weights.")
    kind = weights_kind(path)
    if kind != "state_dict" and not trust_pickle:
        name = {"pickle": "a pickle", "torchscript": "a TorchScript archive", "export": "a torch.export program"}
        raise ValueError(f"{flag} {path} is {name[kind]}, which runs code when loaded, so it is refused: pass the "
                         f"state dict {official} from {where} (loaded natively, no code runs), or add "
                         "--trust-pickle (trust_pickle=True) if you trust this file and its origin")


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
    """Samples in [-1, 1] -> uint8-valued floats [0, 255], 3 channels; one-line errors for wrong inputs."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"this feature network takes images [N, 1 or 3, H, W] in [-1, 1], got {list(x.shape)}: "
                         "pass image samples (grey or RGB), channels first")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("images contain NaN or inf: the generator produced non-finite samples")
    lo, hi = float(x.min()), float(x.max())
    if lo < -2 or hi > 2:
        raise ValueError(f"images must be in [-1, 1], these span [{lo:g}, {hi:g}]: convert uint8 / [0, 255] images "
                         "with x / 127.5 - 1 (PNG folders are read in [-1, 1] already)")
    x = (x * 127.5 + 128).floor().clamp(0, 255)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _trusted_module(path: str, flag: str, device) -> Callable:
    """A pickle, TorchScript file or .pt2 program the user trusts (check_weights refused it otherwise).
    THIS RUNS CODE FROM THE FILE."""
    kind = weights_kind(path)
    try:
        if kind == "export":
            return torch.export.load(path).module().to(device)
        if kind == "torchscript":
            return torch.jit.load(path, map_location=device).eval()
        import pickle
        with open(path, "rb") as f:
            net = pickle.load(f)  # noqa: S301 - explicitly trusted by the caller (--trust-pickle)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(f"{flag} {path}: the trusted {kind} file did not load ({first})") from e
    if not callable(net):
        raise ValueError(f"{flag} {path}: the trusted pickle holds a {type(net).__name__}, not a network")
    return net.to(device) if hasattr(net, "to") else net


def get_extractor(space: str, *, inception_weights: Optional[str] = None, dinov2_weights: Optional[str] = None,
                  digits_weights: Optional[str] = None, batch: int = 256, device="cpu", trust_pickle: bool = False,
                  inception_convention: str = "nvlabs", official_only: bool = True) -> Extractor:
    """The feature extractor of `space` (see the module docstring). `official_only=False` accepts state dicts
    other than the official files (same architecture, any ViT size for DINOv2): for tests and fine-tuned
    networks, whose FID / FD_DINOv2 are not comparable with published numbers."""
    check_weights(space, inception_weights, dinov2_weights, trust_pickle)
    if space == "raw":
        return Extractor("raw", lambda x: x.reshape(len(x), -1), batch=1 << 16, device=device)
    if space == "digits":
        from .features import load_feature_net

        net = load_feature_net(digits_weights).to(device)
        return Extractor("digits", lambda x: net.features(x.clamp(-1, 1)), batch=batch, device=device,
                         classify=net.head)
    if space == "inception":
        from . import inception as inc

        if inception_convention not in inc.CONVENTIONS:
            raise ValueError(f"unknown Inception convention {inception_convention!r}: expected one of "
                             f"{', '.join(inc.CONVENTIONS)}")
        if weights_kind(inception_weights) != "state_dict":
            module = _trusted_module(inception_weights, _FLAG[space], device)

            def inception(x):
                x = _images_255(x)
                try:
                    return module(x, return_features=True)
                except (RuntimeError, TypeError):
                    return module(x)
            return Extractor("inception", inception, batch=batch, device=device)
        net = inc.load_fid_inception(inception_weights, official_only=official_only, device=device)
        return Extractor("inception", lambda x: net(inc.preprocess(_images_255(x), inception_convention)),
                         batch=batch, device=device)
    from . import dinov2 as dino

    if weights_kind(dinov2_weights) != "state_dict":
        module = _trusted_module(dinov2_weights, _FLAG[space], device)
    else:
        module = dino.load_dinov2(dinov2_weights, config=dino.VITL14 if official_only else None, device=device)
    return Extractor("dinov2", lambda x: module(dino.preprocess(_images_255(x))), batch=batch, device=device)
