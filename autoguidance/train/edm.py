"""EDM2 training of class-conditional U-Nets on a real image set (Karras et al. 2024, "Analyzing and Improving
the Training Dynamics of Diffusion Models", Sec. 2-3 and App. B), with snapshots and exact resume.

Loss (paper Eq. 21, as the official `EDM2Loss`): per image, noise level `ln sigma ~ N(P_mean, P_std^2)`,
noisy input `y + sigma n`, and

    L = E[ lambda(sigma) / exp(u(sigma)) * (D(y + sigma n; sigma, c) - y)^2 + u(sigma) ]
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2

where `u(sigma)` is the net's learned log-variance head (`EDM2Precond.logvar`): the uncertainty weighting that
equalises the loss over sigma. Here the squared error is averaged (not summed) over pixels; Adam is invariant
to that constant. Optimiser: Adam (betas 0.9, 0.99, eps 1e-8), learning rate

    lr(t) = lr_ref / sqrt(max(t / t_ref, 1)) * min(t / t_rampup, 1)       (inverse square-root decay, Eq. 69)

Power-function EMAs of several relative lengths are kept at once (`PowerFunctionEMA`), so the main net's and
the guide's EMA can be tuned separately after training. Snapshots at chosen fractions of training write
every EMA as a checkpoint folder (`autoguidance.checkpoint`), and the complete training state (net, Adam, EMAs,
RNG states, step) as safetensors + JSON, never pickle: `resume=` continues bit-identically to an uninterrupted
run with the same seed (checked by `tests/test_train_edm.py`).

Randomness: one `torch.Generator` seeded by `seed` draws, per iteration and in this order, the batch indices,
the noise levels, the noise and the label-dropout mask; the global torch RNG (seeded once) draws the initial
weights and the training-time dropout masks. Both states are part of the saved training state.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence

import torch
import tqdm

from ..checkpoint import save
from ..nets.edm2 import EDM2Precond
from .ema import PowerFunctionEMA
from .state import STATE_FORMAT, load_state, save_state

__all__ = ["DIGITS_NETS", "MNIST_NETS", "FASHION_NETS", "DATASETS", "digits_net_config", "net_config", "EDM2TrainConfig", "edm2_loss", "load_dataset", "learning_rate", "train_edm2",
           "snapshot_name", "snapshot_iterations", "save_train_state", "load_train_state", "STATE_FORMAT"]

#: EDM2-style U-Nets sized for 8x8 digits (two levels, 8x8 and 4x4, self-attention at 4x4). The XS/S channel
#: ratio (8/12) is the papers' 128/192; XS has ~0.45x S's parameters (papers: 125M / 280M).
DIGITS_NETS: dict[str, dict] = {
    "S":   dict(model_channels=12, channel_mult=[1, 2], num_blocks=2, attn_resolutions=[4], channels_per_head=8,
                logvar_channels=16),
    "XS":  dict(model_channels=8, channel_mult=[1, 2], num_blocks=2, attn_resolutions=[4], channels_per_head=8,
                logvar_channels=16),
    "XXS": dict(model_channels=4, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=4,
                logvar_channels=8),   # for tests
}


def digits_net_config(size: str = "S", label_dim: int = 10, dropout: float = 0.0) -> dict:
    """`EDM2Precond` constructor kwargs of a digits net: `[N, 1, 8, 8]` images, `label_dim` classes (0 =
    unconditional), `dropout` in every block's residual branch (training only, and in-situ guidance)."""
    if size not in DIGITS_NETS:
        raise ValueError(f"unknown digits net size {size!r}; known: {', '.join(DIGITS_NETS)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if label_dim < 0:
        raise ValueError(f"label_dim must be >= 0 (0 = unconditional), got {label_dim}")
    return dict(img_resolution=8, img_channels=1, label_dim=label_dim, use_fp16=False, sigma_data=0.5,
                dropout=dropout, **DIGITS_NETS[size])


#: EDM2-style U-Nets for MNIST at 14x14 (two levels, 14x14 and 7x7, self-attention at 7x7): S 252k parameters,
#: XS ~0.56x of them (papers: 0.45x). `XXS` is for tests.
MNIST_NETS: dict[str, dict] = {
    "S":   dict(model_channels=16, channel_mult=[1, 2], num_blocks=2, attn_resolutions=[7], channels_per_head=8,
                logvar_channels=16),
    "XS":  dict(model_channels=12, channel_mult=[1, 2], num_blocks=2, attn_resolutions=[7], channels_per_head=8,
                logvar_channels=16),
    "XXS": dict(model_channels=4, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[7], channels_per_head=4,
                logvar_channels=8),
}

#: EDM2-style U-Nets for Fashion-MNIST at the native 28x28 (three levels, 28x28, 14x14 and 7x7, self-attention at
#: 7x7): S 422k parameters, XS ~0.56x of them (MNIST's channel ratio 12/16; papers: 0.45x). `XXS` is for tests.
FASHION_NETS: dict[str, dict] = {
    "S":   dict(model_channels=16, channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[7], channels_per_head=8,
                logvar_channels=16),
    "XS":  dict(model_channels=12, channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[7], channels_per_head=8,
                logvar_channels=16),
    "XXS": dict(model_channels=4, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[7], channels_per_head=4,
                logvar_channels=8),
}

#: dataset name -> (image resolution, net sizes)
DATASETS: dict[str, tuple[int, dict[str, dict]]] = {"digits": (8, DIGITS_NETS), "mnist14": (14, MNIST_NETS),
                                                    "fashion28": (28, FASHION_NETS)}


def net_config(data: str = "digits", size: str = "S", label_dim: int = 10, dropout: float = 0.0) -> dict:
    """`EDM2Precond` constructor kwargs of a net of size `size` for the dataset `data` (see `DATASETS`)."""
    if data not in DATASETS:
        raise ValueError(f"unknown dataset {data!r}; known: {', '.join(DATASETS)}")
    if data == "digits":
        return digits_net_config(size, label_dim, dropout)
    resolution, sizes = DATASETS[data]
    if size not in sizes:
        raise ValueError(f"unknown {data} net size {size!r}; known: {', '.join(sizes)}")
    cfg = digits_net_config("S", label_dim, dropout)   # the shared checks and settings
    return {**cfg, "img_resolution": resolution, **sizes[size]}


@dataclass
class EDM2TrainConfig:
    """Everything that determines a training run (saved in every checkpoint's meta and in the training state)."""

    net: dict                                   # EDM2Precond constructor kwargs
    iters: int = 2048                           # training iterations T
    batch: int = 128                            # images per iteration
    seed: int = 0                               # seeds the weights, batches, noise and dropout
    P_mean: float = -0.8                        # ln(sigma) ~ N(P_mean, P_std^2) (EDM2 img64 values)
    P_std: float = 1.6
    lr_ref: float = 1e-2                        # lr(t) = lr_ref / sqrt(max(t / t_ref, 1)) * min(t / t_rampup, 1)
    t_ref: int = 512                            # iterations before the inverse-sqrt decay starts
    t_rampup: int = 32                          # linear warm-up iterations
    betas: tuple = (0.9, 0.99)                  # Adam
    ema_stds: tuple = (0.050, 0.150)            # power-function EMA relative stds kept side by side
    snapshots: tuple = (1.0,)                   # fractions of `iters` at which every EMA is written
    label_dropout: float = 0.0                  # probability of zeroing a label row (CFG from one net)
    data: str = "digits"                        # dataset name
    data_subset: str = "all"                    # 'all' or 'half' (the "less data" guide)

    def __post_init__(self):
        if self.iters < 1 or self.batch < 1:
            raise ValueError(f"iters and batch must be >= 1, got {self.iters}, {self.batch}")
        if not self.ema_stds:
            raise ValueError("ema_stds must name at least one EMA length, e.g. (0.05, 0.15)")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        self.betas = tuple(float(b) for b in self.betas)
        self.ema_stds = tuple(float(s) for s in self.ema_stds)
        self.snapshots = tuple(float(f) for f in self.snapshots)
        snapshot_iterations(self.iters, self.snapshots)  # validates


def snapshot_iterations(iters: int, fractions: Sequence[float]) -> dict[int, float]:
    """`{iteration: fraction}` for snapshot fractions of `iters` (rounded to the nearest iteration, >= 1)."""
    out = {}
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"snapshot fractions must lie in (0, 1], got {f} (e.g. 0.0625 for T/16)")
        out[max(1, round(f * iters))] = f
    return dict(sorted(out.items()))


def snapshot_name(fraction: float, std: float) -> str:
    """Folder suffix of one EMA at one snapshot: 'T-ema050' (end of training, std 0.050), 'T16-ema150' (T/16),
    'f0.375-ema050' for a fraction that is not 1/k."""
    fr = Fraction(fraction).limit_denominator(1024)
    tag = "T" if fr == 1 else (f"T{fr.denominator}" if fr.numerator == 1 else f"f{fraction:g}")
    return f"{tag}-ema{round(std * 1000):03d}"


def learning_rate(t: int, lr_ref: float, t_ref: int, t_rampup: int) -> float:
    """Learning rate for the update after `t` completed iterations (EDM2 Eq. 69 plus a linear warm-up)."""
    lr = lr_ref / math.sqrt(max(t / t_ref, 1.0)) if t_ref > 0 else lr_ref
    if t_rampup > 0:
        lr *= min((t + 1) / t_rampup, 1.0)
    return lr


def edm2_loss(net: EDM2Precond, images: torch.Tensor, labels: Optional[torch.Tensor], sigma: torch.Tensor,
              noise: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-image EDM2 loss `[N]` (see module docstring). `images`, `noise`: `[N, C, H, W]`; `sigma`: `[N]`;
    `labels`: `[N, label_dim]` or None. `target` (default `images`) is what D is pulled to: another net's
    prediction `D_main(images + sigma noise; sigma)` makes it EDM2's loss for distillation (same weighting and
    uncertainty head, the main's prediction in place of the clean image)."""
    sd = net.sigma_data
    weight = ((sigma**2 + sd**2) / (sigma * sd) ** 2).reshape(-1, 1, 1, 1)
    D, logvar = net(images + sigma.reshape(-1, 1, 1, 1) * noise, sigma, labels, return_logvar=True)
    per_pixel = weight / logvar.exp() * (D - (images if target is None else target)).square() + logvar
    return per_pixel.mean(dim=(1, 2, 3))


# -- training state: safetensors + JSON (train/state.py) -----------------------------------------------------

def save_train_state(path, *, config: EDM2TrainConfig, step: int, net: torch.nn.Module,
                     opt: torch.optim.Optimizer, ema: PowerFunctionEMA, gen: torch.Generator,
                     seconds: float) -> Path:
    """Write the complete training state to folder `path` (`state.safetensors` + `state.json`), atomically."""
    return save_state(path, settings=asdict(config), step=step, net=net, opt=opt, ema=ema, gen=gen, seconds=seconds)


def load_train_state(path, *, net: torch.nn.Module, opt: torch.optim.Optimizer, ema: PowerFunctionEMA,
                     gen: torch.Generator, config: Optional[EDM2TrainConfig] = None) -> dict:
    """Restore a state written by `save_train_state` into the given objects; returns its JSON record.
    With `config`, refuses a state from a run with different settings (other than the snapshot list)."""
    return load_state(path, net=net, opt=opt, ema=ema, gen=gen,
                      settings=asdict(config) if config is not None else None, ignore=("snapshots",))


# -- the training loop -----------------------------------------------------------------------------------------

def load_dataset(name: str, subset: str = "all"):
    """The training split of a dataset of `DATASETS` (images `[N, C, R, R]` in [-1, 1], one-hot labels)."""
    return _dataset(name, subset)


def _dataset(name: str, subset: str):
    if name == "fashion28":
        from ..data.fashion import load_fashion
        return load_fashion("train", subset)
    if name == "mnist14":
        from ..data.mnist import load_mnist
        return load_mnist("train", subset, resolution=14)
    if name != "digits":
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    from ..data.digits import load_digits
    return load_digits("train", subset)


def train_edm2(
    config: EDM2TrainConfig,
    out=None,                         # checkpoint prefix: EMAs go to '<out>-<snapshot_name>' folders; None: none
    state_dir=None,                   # where training states go ('<state_dir>/iter-XXXXXX'); None: no states
    resume=None,                      # a training state folder to continue from
    state_every: int = 0,             # also save the training state every this many iterations (0: snapshots only)
    stop_after: Optional[int] = None, # stop (after saving the state) at this iteration: simulates an interruption
    progress: bool = True,
    meta: Optional[dict] = None,      # extra provenance for every checkpoint (e.g. the command line)
) -> dict:
    """Train an `EDM2Precond` with the EDM2 loss; returns `{'net', 'ema', 'step', 'seconds', 'written'}`.

    Snapshots: at each fraction f of `config.iters`, every EMA length is saved as a checkpoint folder
    `<out>-<snapshot_name(f, std)>` whose meta records the iteration, the training seconds so far (the guide's
    training cost) and `meta`; with `state_dir`, the training state is saved there too (`iter-XXXXXX`)."""
    data = _dataset(config.data, config.data_subset)
    images, labels = data.images, data.labels
    torch.manual_seed(config.seed)
    net = EDM2Precond(**config.net).train().requires_grad_(True)
    if net.label_dim not in (0, labels.shape[1]):
        raise ValueError(f"net label_dim {net.label_dim} does not match the data's {labels.shape[1]} classes")
    ema = PowerFunctionEMA(net, stds=config.ema_stds)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr_ref, betas=config.betas, eps=1e-8)
    gen = torch.Generator().manual_seed(config.seed)
    step, seconds = 0, 0.0
    if resume is not None:
        rec = load_train_state(resume, net=net, opt=opt, ema=ema, gen=gen, config=config)
        step, seconds = int(rec["step"]), float(rec["seconds"])
    snaps = snapshot_iterations(config.iters, config.snapshots)
    record = dict(train=json.loads(json.dumps(asdict(config))), **(meta or {}))
    written: list[str] = []
    end = config.iters if stop_after is None else min(int(stop_after), config.iters)
    bar = tqdm.tqdm(range(step, end), initial=step, total=config.iters, disable=not progress, unit="it",
                    desc=f"train edm2 c{config.net.get('model_channels')} d{config.net.get('dropout', 0)}")
    t_last = time.perf_counter()
    for t in bar:
        for g in opt.param_groups:
            g["lr"] = learning_rate(t, config.lr_ref, config.t_ref, config.t_rampup)
        idx = torch.randint(len(images), (config.batch,), generator=gen)
        sigma = (torch.randn(config.batch, generator=gen) * config.P_std + config.P_mean).exp()
        noise = torch.randn(config.batch, *images.shape[1:], generator=gen)
        keep = torch.rand(config.batch, generator=gen) >= config.label_dropout
        y = images[idx]
        c = (labels[idx] * keep[:, None].to(labels.dtype)) if net.label_dim else None
        loss = edm2_loss(net, y, c, sigma, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in net.parameters():  # as EDM2: replace non-finite gradients, so one bad batch cannot poison Adam
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0, out=p.grad)
        opt.step()
        ema.update(net)
        step = t + 1
        now = time.perf_counter()
        seconds += now - t_last
        t_last = now
        if t % 16 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step in snaps and out is not None:
            for s, avg in ema.averages.items():
                folder = Path(f"{out}-{snapshot_name(snaps[step], s)}")
                save(avg, folder, meta=dict(record, iteration=step, fraction=snaps[step], ema_std=s,
                                            train_seconds=round(seconds, 2)))
                written.append(str(folder))
        save_state = state_dir is not None and (step in snaps or step == end or
                                                (state_every > 0 and step % state_every == 0))
        if save_state:
            save_train_state(Path(state_dir) / f"iter-{step:06d}", config=config, step=step, net=net, opt=opt,
                             ema=ema, gen=gen, seconds=seconds)
        t_last = time.perf_counter()  # saving is not training time
    bar.close()
    return {"net": net, "ema": ema, "step": step, "seconds": seconds, "written": written}
