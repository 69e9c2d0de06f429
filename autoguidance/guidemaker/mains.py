"""The main model behind one interface, whatever it is: the library's EDM2-style nets (`EDM2Main`) or a diffusers
U-Net / transformer in a pipeline folder (`DiffusersMain`, `mains_diffusers.py`).

A recipe asks the main for: its identity (digest, the signature a guide must share), its training record (noise
level distribution, optimiser settings, training FLOPs), its forward FLOPs (of itself or of a guide config), a fresh
or copied trainable net, noise levels drawn from its training distribution, its own training loss, the
prediction-matching loss of a guide against it, data-free samples, and how to write a guide.

**Losses of EDM2-style mains** (`train/edm.py`'s `edm2_loss`, Karras et al. 2024 Eq. 21): recipes that train on
data (self-synthetic, weight-decay) use the main's own EDM2 loss with its learned uncertainty head; distillation uses
the same weighting with the main's prediction `D_main(y + sigma n; sigma, c)` as the target in place of the image
`y` (prediction matching). Noise levels: `ln sigma ~ N(P_mean, P_std^2)` of the main's training record.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Sequence

import torch

from .budget import TRAIN_FACTOR, count_flops

__all__ = ["Main", "EDM2Main"]


class Main:
    """What every recipe needs of a main model (see the module docstring). Subclasses fill it in."""

    kind: str = ""                 # 'edm2' | 'diffusers'
    ref: str                       # how the user named it
    net: torch.nn.Module           # the main, eval mode, gradients off (never changed)
    digest: str                    # sha256 of its files (checkpoint.digest)
    record: dict                   # its training record ({} without one)

    # -- identity ------------------------------------------------------------------------------------------------
    def signature(self) -> dict:
        """What a guide must share with this main (sample shape, class count, text widths)."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"ref": self.ref, "kind": self.kind, "digest": self.digest, "signature": self.signature()}

    # -- sizes and costs -----------------------------------------------------------------------------------------
    def family(self) -> str:
        """The reducer's name of this main's architecture ('edm2', 'SD3Transformer2DModel', ...)."""
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError

    def flops(self, config: Optional[dict] = None) -> int:
        """Forward FLOPs per sample of this main (or of a net of this family built from `config`)."""
        raise NotImplementedError

    def training_flops(self) -> Optional[float]:
        """The main's training FLOPs from its record (`3 F x images seen`), None without a record."""
        return None

    # -- training ------------------------------------------------------------------------------------------------
    def build(self, config: dict, seed: int) -> torch.nn.Module:
        """A fresh trainable net of this family from `config` (weights drawn after `torch.manual_seed(seed)`)."""
        raise NotImplementedError

    def copy(self) -> torch.nn.Module:
        """A trainable copy of the main (the main itself is left as found)."""
        net = copy.deepcopy(self.net)
        return net.train().requires_grad_(True)

    def optimizer_defaults(self, fresh: bool) -> dict:
        """`{'lr': constant or None, 'schedule': (lr_ref, t_ref, t_rampup) or None, 'betas', 'eps'}`."""
        raise NotImplementedError

    def draw_levels(self, n: int, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def own_loss(self, model, x0, cond, level, noise, const=None) -> torch.Tensor:
        raise NotImplementedError

    def distill_loss(self, model, x0, cond, level, noise, const=None) -> torch.Tensor:
        raise NotImplementedError

    # -- inputs --------------------------------------------------------------------------------------------------
    def sample_shape(self) -> list[int]:
        raise NotImplementedError

    def sample(self, seeds: torch.Tensor, cond, const=None, *, steps: int, device) -> torch.Tensor:
        raise NotImplementedError

    def sampler_name(self) -> str:
        raise NotImplementedError

    # -- writing a guide ------------------------------------------------------------------------------------------
    def save_guide(self, model: torch.nn.Module, folder: Path, meta: dict) -> None:
        raise NotImplementedError


class EDM2Main(Main):
    """A library checkpoint of family `edm2` (`autoguidance train`, `import-edm2`, a shipped name)."""

    kind = "edm2"

    def __init__(self, ref: str, device="cpu", noise: Optional[Sequence[float]] = None):
        from ..checkpoint import digest, load

        self.ref = str(ref)
        self.net = load(ref, device=device)
        if getattr(self.net, "family", None) != "edm2":
            raise ValueError(f"{ref} is a {getattr(self.net, 'family', type(self.net).__name__)} network: make-guide "
                             "knows the library's EDM2-style nets (family edm2) and diffusers models")
        self.digest = digest(ref)
        self.record = dict(getattr(self.net, "checkpoint_meta", {}) or {})
        train = self.record.get("train") or {}
        if noise is not None:
            self.P_mean, self.P_std = (float(v) for v in noise)
        elif "P_mean" in train and "P_std" in train:
            self.P_mean, self.P_std = float(train["P_mean"]), float(train["P_std"])
        else:
            raise ValueError(f"{ref} records no training noise distribution (not trained by `autoguidance train`): "
                             "pass --noise P_MEAN,P_STD (ln sigma ~ N(P_mean, P_std^2); EDM2 img512 -0.4,1.0, "
                             "img64 -0.8,1.6)")
        if not self.P_std > 0:
            raise ValueError(f"--noise P_STD must be > 0, got {self.P_std}")

    def signature(self) -> dict:
        c = self.net.config
        return {"img_channels": c["img_channels"], "img_resolution": c["img_resolution"],
                "label_dim": c["label_dim"]}

    def family(self) -> str:
        return "edm2"

    def config(self) -> dict:
        return copy.deepcopy(self.net.config)

    def flops(self, config: Optional[dict] = None) -> int:
        from ..nets.edm2 import EDM2Precond

        cfg = config or self.net.config
        with torch.device("meta"):
            net = EDM2Precond(**cfg)
            x = torch.zeros(1, cfg["img_channels"], cfg["img_resolution"], cfg["img_resolution"])
            labels = torch.zeros(1, cfg["label_dim"]) if cfg["label_dim"] else None
            return count_flops(lambda: net.unet(x, torch.zeros(1), labels))  # the precondition is element-wise

    def training_flops(self) -> Optional[float]:
        train = self.record.get("train") or {}
        it = self.record.get("iteration")
        if not train or it is None or "batch" not in train:
            return None
        return float(TRAIN_FACTOR) * self.flops() * int(it) * int(train["batch"])

    def build(self, config: dict, seed: int) -> torch.nn.Module:
        from ..nets.edm2 import EDM2Precond

        torch.manual_seed(seed)
        return EDM2Precond(**config).train().requires_grad_(True)

    def optimizer_defaults(self, fresh: bool) -> dict:
        from ..train.edm import learning_rate

        train = self.record.get("train") or {}
        betas = tuple(train.get("betas", (0.9, 0.99)))
        sched = (float(train.get("lr_ref", 1e-2)), int(train.get("t_ref", 512)), int(train.get("t_rampup", 32)))
        if fresh:   # a new net runs the main's schedule from the start
            return {"lr": None, "schedule": sched, "betas": betas, "eps": 1e-8}
        it = int(self.record.get("iteration", train.get("iters", 1)))
        # a copy continues at the main's final learning rate (EDM2's inverse square-root schedule at its last step)
        return {"lr": learning_rate(max(it - 1, 0), *sched), "schedule": None, "betas": betas, "eps": 1e-8}

    def draw_levels(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return (torch.randn(n, generator=gen) * self.P_std + self.P_mean).exp()

    def own_loss(self, model, x0, cond, level, noise, const=None) -> torch.Tensor:
        from ..train.edm import edm2_loss

        return edm2_loss(model, x0, cond, level, noise)

    def distill_loss(self, model, x0, cond, level, noise, const=None) -> torch.Tensor:
        from ..train.edm import edm2_loss

        with torch.no_grad():
            target = self.net(x0 + level.reshape(-1, 1, 1, 1) * noise, level, cond)
        return edm2_loss(model, x0, cond, level, noise, target=target)

    def sample_shape(self) -> list[int]:
        c = self.net.config
        return [c["img_channels"], c["img_resolution"], c["img_resolution"]]

    def sampler_name(self) -> str:
        return "heun"

    def sample(self, seeds: torch.Tensor, cond, const=None, *, steps: int, device) -> torch.Tensor:
        from ..sampling import generate

        with torch.no_grad():
            return generate(self.net, seeds, self.sample_shape(), labels=cond, num_steps=steps, batch=256,
                            device=device, progress=False)

    def draw_cond(self, n: int, gen: torch.Generator) -> Optional[torch.Tensor]:
        """Class labels for data-free samples (or unlabelled data): one-hot rows of uniform classes."""
        dim = int(self.net.config["label_dim"])
        if not dim:
            return None
        return torch.nn.functional.one_hot(torch.randint(dim, (n,), generator=gen), dim).to(torch.float32)

    def save_guide(self, model: torch.nn.Module, folder: Path, meta: dict) -> None:
        from ..checkpoint import save_into

        save_into(model, folder, meta={"guide": meta})
