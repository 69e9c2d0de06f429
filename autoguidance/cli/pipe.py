"""`autoguidance pipe`: one PNG per seed from a LOCAL diffusers pipeline folder, under any guidance method.

    autoguidance pipe sd-folder --prompt "a cat" --method insitu --w 3 --seeds 0-7 --out runs/cat
    autoguidance pipe sd-folder --prompt "a cat" --guidance-scale 5 --method insitu --w 2 --out runs/cat-cfg
    autoguidance pipe sd3-folder --prompts prompts.txt --method perturbation --perturbation skiplayers --layers 7,8,9 \
        --w 2.5 --seeds 0-15 --out runs/slg
    autoguidance pipe sd-folder --prompt "a cat" --guidance-scale 7 --rule apg --eta 0 --norm-threshold 15 \
        --momentum -0.5 --out runs/apg
    torchrun --nproc_per_node=2 -m autoguidance.cli pipe sd-folder --prompt "a cat" --seeds 0-63 --out runs/x

Writes OUT/png/SEED.png, OUT/grid.png, OUT/images.json and OUT/run.json; a rerun skips the seeds already made by
the same settings; the folder is locked while a run writes to it; under torchrun seed i goes to rank i mod world.
The pipeline is loaded with `DiffusionPipeline.from_pretrained(DIR, local_files_only=True)`: nothing is downloaded.
With `--guidance-scale > 1` (Flux: `--negative-prompt` and `--true-cfg-scale > 1`) the pipeline's own CFG is
taken over by the library and composed with the method in one batched model call. The combination rule flags are
`autoguidance sample`'s (`autoguidance rules` lists them); a rule acts on the model's own output unless
--rule-space says otherwise. See docs/pipelines.md.
"""
from __future__ import annotations

import argparse

from ..runs import dist
from ..runs.seeds import parse_seeds
from .options import (add_rule_arguments, add_step_arguments, parse_floats, rule_fields_from_args,
                      step_fields_from_args)

__all__ = ["add_parser"]

METHOD_CHOICES = ["none", "cfg", "insitu", "perturbation", "autoguidance"]


def _run(args) -> int:
    from ..adapters.pipeline_run import pipeline_to_folder, read_prompts

    seeds = parse_seeds(args.seeds)
    if args.steps < 1:
        raise ValueError(f"--steps must be a positive number of denoising steps, got {args.steps}")
    interval = parse_floats(args.interval, 2, "--interval") if args.interval else None
    cfg_interval = parse_floats(args.cfg_interval, 2, "--cfg-interval") if args.cfg_interval else None
    layers = _layers(args.layers) if args.layers else None
    prompts = read_prompts(args.prompts) if args.prompts else None
    rule = _rule(args)
    steps = step_fields_from_args(args)
    dist.init()
    try:
        s = pipeline_to_folder(args.dir, args.out, seeds, method=args.method, w=args.w, p=args.p, where=args.where,
                               perturbation=args.perturbation, layers=layers, blocks=args.blocks, guide=args.guide,
                               interval=interval, cfg_interval=cfg_interval, prompt=args.prompt, prompts=prompts,
                               negative_prompt=args.negative_prompt, class_label=args.class_label,
                               guidance_scale=args.guidance_scale, true_cfg_scale=args.true_cfg_scale,
                               steps=args.steps, height=args.height, width=args.width, batch=args.batch,
                               device=args.device, dtype=args.dtype, progress=not args.no_progress, args=args,
                               rule=rule, w_steps=steps.get("w_steps"), window=steps.get("window"))
        if dist.is_main():
            print(f"rank 0: {s['done']} images made, {s['skipped']} already done, in {s['seconds']:.1f} s; output "
                  f"in {args.out}")
    finally:
        dist.shutdown()
    return 0


def _rule(args):
    """The combination rule of the rule flags (None: linear); a flag the rule does not take is refused."""
    from ..methods import rule_from_keys

    keys = rule_fields_from_args(args)
    name = keys.pop("rule", None)
    if name is None and not keys:
        return None
    return rule_from_keys(name or "linear", keys)


def _layers(text: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        out = []
    if not out:
        raise ValueError(f"--layers must be block indices separated by commas (e.g. 7,8,9), got {text!r}")
    return out


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("pipe", help="guided images (one PNG per seed, a grid, run.json) from a local "
                              "diffusers pipeline folder; resumable; torchrun for many processes",
                              description=__doc__.split("\n\n")[0], epilog="See docs/pipelines.md.",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="a local diffusers pipeline folder (pipe.save_pretrained(DIR)); never downloaded")
    m = p.add_argument_group("method")
    m.add_argument("--method", default="none", choices=METHOD_CHOICES, help="guide pass (default none: only the "
                   "pipeline's own CFG, done by the library)")
    m.add_argument("--w", type=float, default=None, help="guidance weight of the method (1 = no guidance)")
    m.add_argument("--p", type=float, default=0.1, help="dropout probability (insitu) / perturbation strength")
    m.add_argument("--where", default=None, help="perturbation sites: a glob or comma-separated module paths")
    m.add_argument("--perturbation", default=None, help="method perturbation: dropout, blockdrop, inputnoise, "
                   "identityattention, ... (autoguidance sample --help lists them), or skiplayers (with --layers)")
    m.add_argument("--layers", default=None, help="perturbation skiplayers: the block indices to skip, e.g. 7,8,9")
    m.add_argument("--blocks", default=None, help="perturbation skiplayers: the path of the block list (default: "
                   "the model's transformer_blocks; autoguidance sites DIR lists them)")
    m.add_argument("--guide", default=None, help="method autoguidance: a local folder of a guide model of the "
                   "same class as the pipeline's unet / transformer")
    m.add_argument("--interval", default=None, help="LO,HI: the method's w only for sigma in (LO, HI]")
    m.add_argument("--cfg-interval", default=None, help="LO,HI: the pipeline's CFG only for sigma in (LO, HI]")
    add_step_arguments(m, "step of the pipeline's loop")
    add_rule_arguments(p, space_default="the model's own output, as diffusers' guiders")
    c = p.add_argument_group("pipeline call")
    c.add_argument("--prompt", default=None, help="the prompt (text-to-image pipelines)")
    c.add_argument("--prompts", default=None, metavar="FILE", help="a text file of prompts, one per line: seed s gets "
                   "prompt s mod (number of prompts)")
    c.add_argument("--negative-prompt", default=None, help="the pipeline's negative prompt (its CFG pass)")
    c.add_argument("--class-label", type=int, default=None, help="class index (class-conditional pipelines: DiT)")
    c.add_argument("--guidance-scale", type=float, default=None, help="the pipeline's CFG scale (default: its own; "
                   "Flux-dev: its distilled guidance)")
    c.add_argument("--true-cfg-scale", type=float, default=None, help="Flux: the CFG scale with --negative-prompt")
    c.add_argument("--steps", type=int, default=28, help="num_inference_steps")
    c.add_argument("--height", type=int, default=None)
    c.add_argument("--width", type=int, default=None)
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, help="output folder (rerun on it to resume)")
    o.add_argument("--seeds", default="0-7", help="seeds, e.g. 0-7 or 0,5,10-19 (one image each)")
    o.add_argument("--batch", type=int, default=4, help="images per pipeline call")
    o.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    o.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="load the pipeline in this dtype (default: as saved)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars (also none while loading)")
    p.set_defaults(func=_run, _parser=p)
