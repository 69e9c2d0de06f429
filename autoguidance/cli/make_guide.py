"""`autoguidance make-guide`: a guide for any main, by a recipe, for a budget (`autoguidance.guidemaker`).

    autoguidance make-guide --main mnist-s-T-ema050 --recipe distill --budget 0.03 --out runs/guide
    autoguidance make-guide --main mnist-s-T-ema050 --recipe weight-decay --steps 300 --data mnist14 --out runs/wd
    autoguidance make-guide --main mnist-s-T-ema050 --recipe snapshot --from mnist-s-T16-ema050 --out runs/snap
    autoguidance make-guide --main path/to/sd3-pipeline --subfolder transformer --recipe distill --steps 2000 \\
        --prompts prompts.txt --out runs/sd3-guide
    torchrun --nproc_per_node=2 -m autoguidance.cli make-guide ...         # data-parallel (gloo on CPU, NCCL on CUDA)

Then: `autoguidance sample --net MAIN --method autoguidance --gnet runs/guide ...`, `ag.load("runs/guide")`, or
(diffusers) `guided_pipeline(pipe, "autoguidance", guide=ag.load("runs/sd3-guide"))`. Rerun the same command to
resume an interrupted run; docs/guides.md says how each recipe trains and how the budget is counted.
"""
from __future__ import annotations

import argparse

__all__ = ["add_parser"]


def _floats(text: str, n: int = 0, flag: str = "") -> tuple:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} expects comma-separated numbers, got {text!r}") from None
    if n and len(vals) != n:
        raise argparse.ArgumentTypeError(f"{flag} expects {n} numbers, got {text!r}")
    return vals


def add_parser(sub) -> None:
    from ..guidemaker.recipes import RECIPES

    p = sub.add_parser("make-guide", help="make a guide for any main: snapshot, distill, self-synthetic, "
                       "weight-decay recipes for a FLOP budget; resumable, torchrun-ready",
                       description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="Recipes: " + "; ".join(f"{k}: {r.summary}" for k, r in RECIPES.items()))
    p.add_argument("--main", required=True, help="the main: a shipped name (autoguidance models), a library "
                   "checkpoint folder, or a diffusers pipeline folder (with --subfolder)")
    p.add_argument("--recipe", required=True, choices=list(RECIPES), help="how the guide is made")
    p.add_argument("--out", required=True, help="the guide folder (rerun on it to resume)")
    b = p.add_argument_group("budget (one of)")
    b.add_argument("--budget", type=float, default=None, help="a fraction of the main's training FLOPs, e.g. 0.03")
    b.add_argument("--steps", type=int, default=None, help="a number of training steps")
    b.add_argument("--main-flops", type=float, default=None, help="the main's training FLOPs, for mains whose "
                   "checkpoint records no training run (published models)")
    d = p.add_argument_group("inputs")
    d.add_argument("--data", default=None, help="a folder of images/latents (.npy/.npz/.png) or a library image set "
                   "(digits, mnist14, fashion28); default: the main's own samples")
    d.add_argument("--prompts", default=None, help="text-conditioned mains: a text file, one prompt a line")
    d.add_argument("--samples", type=int, default=None, help="data-free pool size (default: a quarter of the budget)")
    d.add_argument("--sample-steps", type=int, default=32, help="sampler steps of the data-free samples")
    r = p.add_argument_group("recipe settings")
    r.add_argument("--from", dest="snapshot", default=None, help="recipe snapshot: the earlier checkpoint of the "
                   "main's own run")
    r.add_argument("--init", default="fresh", choices=["fresh", "main"], help="distill: a fresh net, or the main's "
                   "weights sliced to the reduced shapes")
    r.add_argument("--width", type=float, default=None, help="distill: fraction of the main's channels (default: "
                   "2/3 for U-Nets, 1 for transformers)")
    r.add_argument("--depth", type=float, default=None, help="distill: fraction of the main's blocks (default: 1 for "
                   "U-Nets, 1/2 for transformers)")
    r.add_argument("--weight-decay", type=float, default=None, help="recipe weight-decay: AdamW's decoupled decay "
                   "(default 1.0)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch", type=int, default=64, help="samples per step, all ranks together")
    o.add_argument("--lr", type=float, default=None, help="constant learning rate (default: the main's own "
                   "schedule for a fresh EDM2 net, its final rate for a copy; 1e-4 for diffusers models)")
    o.add_argument("--ema-stds", type=lambda t: _floats(t, 0, "--ema-stds"), default=(0.05, 0.15),
                   help="power-function EMA relative stds kept")
    o.add_argument("--ema", type=float, default=None, help="the EMA written as the guide at --out (default: the "
                   "first of --ema-stds; the others go to --out/emaXXX)")
    o.add_argument("--seed", type=int, default=0, help="seeds the init, batches, noise levels, noise, samples")
    o.add_argument("--state-every", type=int, default=0, help="also save the training state every N steps")
    m = p.add_argument_group("the main")
    m.add_argument("--subfolder", default=None, help="diffusers pipeline folders: unet or transformer")
    m.add_argument("--noise", type=lambda t: _floats(t, 2, "--noise"), default=None,
                   help="EDM2 mains without a training record: P_MEAN,P_STD of ln sigma")
    m.add_argument("--t-dist", default=None, help="diffusers mains: training timesteps, 'uniform' or "
                   "'logit-normal:M,S' (flow; default logit-normal:0,1; VP: uniform)")
    m.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ..guidemaker import make_guide
    from ..runs import dist
    from .common import command_line_of_argv

    dist.init()
    try:
        rec = make_guide(args.main, args.recipe, args.out, budget=args.budget, steps=args.steps,
                         progress=not args.no_progress, device=args.device, command=command_line_of_argv(),
                         data=args.data, prompts=args.prompts, snapshot=args.snapshot, init=args.init,
                         width=args.width, depth=args.depth, batch=args.batch, lr=args.lr,
                         weight_decay=args.weight_decay, ema_stds=args.ema_stds, ema=args.ema, samples=args.samples,
                         sample_steps=args.sample_steps, main_flops=args.main_flops, noise=args.noise,
                         t_dist=args.t_dist, subfolder=args.subfolder, seed=args.seed, state_every=args.state_every)
        if dist.is_main():
            spent = rec["budget"]["spent_flops"]
            frac = rec["budget"].get("spent_fraction_of_main")
            steps = (rec.get("trained") or {}).get("steps")
            print(f"guide ({rec['recipe']}) in {args.out}: " + (f"{steps} steps, " if steps is not None else "")
                  + f"{spent:.3g} FLOPs" + (f" ({100 * frac:.2f}% of the main's training)" if frac else ""))
    finally:
        dist.shutdown()
    return 0
