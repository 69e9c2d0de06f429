"""`autoguidance presets [NAME] [--json | --markdown]`: the papers' EDM2 configurations with their numbers."""
from __future__ import annotations

import json

from ..edm2.presets import METHODS, Preset, format_number, get_preset, list_presets, presets_markdown

__all__ = ["add_parser"]


def _show(p: Preset) -> str:
    lines = [f"{p.name}: {p.description}",
             f"  method      {p.method} ({METHODS[p.method]})",
             f"  w           {p.weight_text()}   (D_bad + w (D_good - D_bad); w = 1: no guidance)"]
    if p.interval:
        lines.append(f"  interval    sigma in ({p.interval[0]:g}, {p.interval[1]:g}]")
    if p.method == "insitu":
        lines.append(f"  dropout     p = {p.p:g} at every EDM2 block's residual-branch dropout")
    for role, spec in (("net", p.net), ("gnet", p.gnet)):
        if spec is not None:
            lines.append(f"  {role:<11s} {spec.describe(p.net.kimg)}  {spec.checkpoint or '(no official file named)'}")
    s = p.sampler
    lines.append(f"  sampler     {s['sampler']}, {s['num_steps']} steps, sigma {s['sigma_min']:g}..{s['sigma_max']:g}, "
                 f"rho {s['rho']:g}{'; decode with the SD VAE (latent)' if p.latent else ''}")
    lines.append(f"  paper       FID {format_number(p.fid)}, FD_DINOv2 {format_number(p.fd_dinov2)} (tuned for {p.tuned_for})")
    lines.append(f"  source      {p.source}")
    if p.note:
        lines.append(f"  note        {p.note}")
    return "\n".join(lines)


def _cmd_presets(args) -> int:
    if args.markdown:
        print(presets_markdown(), end="")
        return 0
    names = [args.name] if args.name else list_presets()
    try:
        chosen = [get_preset(n) for n in names]
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    if args.json:
        print(json.dumps({p.name: p.to_dict() for p in chosen}, indent=2))
    elif args.name:
        print(_show(chosen[0]))
    else:
        for p in chosen:
            print(f"{p.name:34s} {p.method:13s} w={p.weight_text():18s} FID {format_number(p.fid):>5s}  "
                  f"FD_DINOv2 {format_number(p.fd_dinov2):>6s}  {p.description}")
    return 0


def add_parser(subparsers) -> None:
    """Add `autoguidance presets [NAME] [--json | --markdown]`."""
    p = subparsers.add_parser("presets", help="list the papers' EDM2 configurations (guide, w, EMA, FID)",
                              description="The papers' ImageNet configurations by name, with the paper's FID and "
                                          "FD_DINOv2 beside each. Weights use D_bad + w (D_good - D_bad).")
    p.add_argument("name", nargs="?", help="show one preset in full")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="machine-readable output")
    fmt.add_argument("--markdown", action="store_true", help="the table of docs/presets.md")
    p.set_defaults(func=_cmd_presets)
