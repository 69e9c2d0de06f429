"""The one training loop of every recipe that trains: data-parallel over torchrun ranks, exact resume.

Each step draws, from one `torch.Generator` seeded by the run's seed (the same on every rank), the global batch's
input indices, noise levels and noise; rank r takes its contiguous share of the rows (`torch.tensor_split`),
computes the sum of its rows' losses divided by the global batch, and the gradients are summed over the ranks
(one all-reduce of the flattened gradients per step; gloo on CPU, NCCL on CUDA): the gradient of the global batch's
mean loss, so any number of ranks trains the same guide as one, up to the floating-point rounding of the kernels
and of the reduction. AdamW (weight decay 0 unless the recipe sets it), the power-function EMAs of EDM2, non-finite
gradients zeroed (as EDM2). On an accelerator the forward passes run under bf16 autocast.

The training state (net, AdamW, EMAs, both RNG states, step, seconds; `train/state.py`, safetensors + JSON) is written
by rank 0 every `state_every` steps and at the end, into `state_dir/iter-XXXXXXXX` (older states removed); a rerun
resumes from the latest, to the same result as an uninterrupted run. Test hook: `AUTOGUIDANCE_STOP_AFTER_STEPS=K`
makes every rank exit hard (`os._exit(3)`) right after the state of step K is written, as a kill would.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..runs import dist
from ..train.ema import PowerFunctionEMA
from ..train.state import latest_state, load_state, save_state, state_name

__all__ = ["TrainSpec", "train"]


@dataclass(frozen=True)
class TrainSpec:
    """The optimisation of one guide (recorded in its state and record)."""

    steps:        int                          # training steps
    batch:        int                          # samples per step, all ranks together
    seed:         int = 0                      # batches, noise levels, noise (and the init, dropout masks)
    lr:           Optional[float] = None       # a constant learning rate, or None with `schedule`
    schedule:     Optional[tuple] = None       # (lr_ref, t_ref, t_rampup): EDM2's inverse square-root schedule
    betas:        tuple = (0.9, 0.99)          # AdamW
    eps:          float = 1e-8
    weight_decay: float = 0.0                  # AdamW's decoupled weight decay
    ema_stds:     tuple = (0.050, 0.150)       # power-function EMA relative stds kept side by side
    state_every:  int = 0                      # also save the state every this many steps (0: at the end only)

    def __post_init__(self):
        if (self.lr is None) == (self.schedule is None):
            raise ValueError("give a constant learning rate or a schedule, not both")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not self.ema_stds:
            raise ValueError("--ema-stds must name at least one EMA length, e.g. 0.05,0.15")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "ema_stds", tuple(float(s) for s in self.ema_stds))

    def learning_rate(self, t: int) -> float:
        from ..train.edm import learning_rate

        return self.lr if self.schedule is None else learning_rate(t, *self.schedule)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum every gradient over the ranks in one flat all-reduce (a missing gradient counts as zero)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if dist.world_size() == 1:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    flat = dist.all_reduce_sum(flat)
    i = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[i:i + n].view_as(p))
        i += n


def train(model: torch.nn.Module, loss_fn: Callable, pool, draw_levels: Callable, spec: TrainSpec, *,
          state_dir: Optional[Path], settings: dict, device="cpu", progress: bool = True,
          desc: str = "make-guide") -> dict:
    """Train `model` (in place) on `pool` for `spec.steps` steps of `loss_fn(model, x0, cond, level, noise, const)
    -> [n]`; `draw_levels(n, gen)` gives the noise levels. Resumes from the latest state in `state_dir` (refused if
    its `settings` differ). Returns `{'model', 'ema', 'step', 'seconds', 'loss'}` (`loss`: mean of the last steps)."""
    import tqdm

    dev = torch.device(device)
    model.to(dev).train().requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    ema = PowerFunctionEMA(model, stds=spec.ema_stds)
    opt = torch.optim.AdamW(params, lr=spec.learning_rate(0), betas=spec.betas, eps=spec.eps,
                            weight_decay=spec.weight_decay)
    gen = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)                      # training-time dropout masks
    step, seconds = 0, 0.0
    latest = latest_state(state_dir) if state_dir is not None else None
    if latest is not None:
        rec = load_state(latest, net=model, opt=opt, ema=ema, gen=gen, settings=settings)
        step, seconds = int(rec["step"]), float(rec["seconds"])
    stop_after = int(os.environ.get("AUTOGUIDANCE_STOP_AFTER_STEPS", "0") or 0)
    B, world, rank = spec.batch, dist.world_size(), dist.rank()
    mine = torch.tensor_split(torch.arange(B), world)[rank]
    shape = tuple(pool.x.shape[1:])
    const = _to(pool.const, dev)
    recent: list[float] = []
    bar = tqdm.tqdm(range(step, spec.steps), initial=step, total=spec.steps, unit="step", desc=desc,
                    disable=not (progress and dist.is_main()), dynamic_ncols=True)
    autocast = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type != "cpu")
    t_last = time.perf_counter()
    for t in bar:
        for g in opt.param_groups:
            g["lr"] = spec.learning_rate(t)
        idx = torch.randint(len(pool), (B,), generator=gen)
        level = draw_levels(B, gen)
        noise = torch.randn(B, *shape, generator=gen)
        x0, cond = pool.rows(idx[mine])
        with torch.autocast(**autocast):
            per = loss_fn(model, x0.to(dev), _to(cond, dev), level[mine].to(dev), noise[mine].to(dev), const)
        loss = per.float().sum() / B
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _all_reduce_grads(params)
        for p in params:   # as EDM2: one bad batch cannot poison AdamW's moments
            torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0, out=p.grad)
        opt.step()
        ema.update(model)
        step = t + 1
        total = float(dist.all_reduce_sum(loss.detach().to(torch.float64).reshape(1))[0])
        recent = (recent + [total])[-16:]
        now = time.perf_counter()
        seconds += now - t_last
        if t % 4 == 0 or step == spec.steps:
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
        if state_dir is not None and (step == spec.steps or step == stop_after or
                                      (spec.state_every > 0 and step % spec.state_every == 0)):
            _save(Path(state_dir), settings, step, model, opt, ema, gen, seconds)
        if step == stop_after:
            sys.stdout.flush()
            os._exit(3)
        t_last = time.perf_counter()   # saving is not training time
    bar.close()
    return {"model": model, "ema": ema, "step": step, "seconds": seconds,
            "loss": sum(recent) / len(recent) if recent else None}


def _save(state_dir: Path, settings, step, model, opt, ema, gen, seconds) -> None:
    if dist.is_main():
        path = save_state(state_dir / state_name(step), settings=settings, step=step, net=model, opt=opt, ema=ema,
                          gen=gen, seconds=seconds)
        for old in state_dir.glob("iter-*"):          # the latest state is all a resume needs
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
