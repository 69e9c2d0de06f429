"""`autoguidance sites MODEL`: the module paths of a network where a perturbation can go, with types and shapes.

    autoguidance sites toy-logp-guide                       a shipped checkpoint, by name
    autoguidance sites runs/my-edm2 --filter '*.dropout'    a checkpoint folder, only paths matching a glob
    autoguidance sites runs/my-edm2 --example-shape 2,3,16,16
    autoguidance sites path/to/sd3/transformer              a diffusers model folder (its config.json is enough)

For a diffusers model (a folder whose config.json names a diffusers class), the model is built from its config
alone (no weights are read) and the command prints what to paste: the block lists with their index ranges
(`SkipLayers(blocks='transformer_blocks', layers=[0..N-1])`) and the attention modules (`IdentityAttention(
where=[...])`), followed by the full path table (no shapes).

The output shapes come from one example forward pass (batch 1 at sigma = 1, no labels) with temporary hooks that
only record shapes. The example input is `[1, 2]` for the toy nets and `[1, img_channels, img_resolution,
img_resolution]` for EDM2 nets, read from the checkpoint's config; `--example-shape` overrides it. Paths print as
`where=` takes them (`autoguidance.perturb.find_sites`).
"""
from __future__ import annotations

import argparse
import fnmatch
from typing import Optional, Sequence

import torch

__all__ = ["add_parser", "example_shape", "site_table", "sites", "paste_guide", "diffusers_from_config"]


def example_shape(model: torch.nn.Module) -> list[int]:
    """The shape of one example input `x` for `model`: from its config (EDM2: `[1, C, R, R]`) or `[1, 2]` (toy)."""
    config = getattr(model, "config", None) or {}
    if "img_channels" in config and "img_resolution" in config:
        return [1, int(config["img_channels"]), int(config["img_resolution"]), int(config["img_resolution"])]
    if getattr(model, "family", "").startswith("toy"):
        return [1, 2]
    raise ValueError(f"cannot tell the input shape of a {type(model).__name__}: pass --example-shape, e.g. "
                     "--example-shape 1,3,32,32")


def _parse_shape(text: str) -> list[int]:
    try:
        shape = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        shape = []
    if not shape or any(v < 1 for v in shape):
        raise ValueError(f"--example-shape must be positive integers separated by commas, such as 1,3,16,16; "
                         f"got {text!r}")
    return shape


def sites(model: torch.nn.Module, shape: Optional[Sequence[int]] = None) -> list[dict]:
    """`list_sites` of `model` with output shapes from one example forward at sigma = 1 (x of `shape`)."""
    from ..perturb import list_sites

    shape = list(shape) if shape is not None else example_shape(model)
    return list_sites(model, torch.zeros(shape), torch.ones(shape[0]))


def list_sites_plain(model: torch.nn.Module) -> list[dict]:
    from ..perturb import list_sites

    return list_sites(model)


def site_table(rows: list[dict], pattern: Optional[str] = None) -> str:
    """Rows as an aligned text table: path, type, output shape ('-' where the output is not one tensor)."""
    if pattern:
        rows = [r for r in rows if fnmatch.fnmatchcase(r["path"], pattern)]
    cells = [("path", "type", "output shape")] + [
        (r["path"], r["type"], "x".join(map(str, r["output_shape"])) if r["output_shape"] is not None else "-")
        for r in rows]
    wp = max(len(c[0]) for c in cells)
    wt = max(len(c[1]) for c in cells)
    return "\n".join(f"{p:<{wp}}  {t:<{wt}}  {s}".rstrip() for p, t, s in cells)


def paste_guide(model: torch.nn.Module) -> str:
    """What a user pastes to choose sites of `model`: each block list with its index range, and the attention
    modules (paths as `where=` takes them)."""
    from ..perturb import block_lists

    lines = ["# block lists: SkipLayers(blocks=..., layers=[...]) (the first named transformer_blocks is the default)"]
    for path, k in block_lists(model):
        lines.append(f"SkipLayers(blocks={path!r}, layers=[{', '.join(map(str, range(k)))}])   # layers=[0..{k - 1}]")
    attn = [n for n, m in model.named_modules() if n and type(m).__name__.endswith("Attention")
            and not isinstance(m, torch.nn.ModuleList)]
    if attn:
        lines.append("# attention modules: IdentityAttention(where=[...]) (joint attention: image-image part)")
        lines.append(f"IdentityAttention(where={attn!r})")
    return "\n".join(lines)


def diffusers_from_config(folder: str) -> Optional[torch.nn.Module]:
    """A diffusers model built from `folder/config.json` alone (random weights: for listing sites), or None when
    the folder holds no diffusers config."""
    import json
    from pathlib import Path

    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return None
    config = json.loads(cfg.read_text())
    name = config.get("_class_name")
    if not name:
        return None
    try:
        import diffusers
    except ImportError as e:
        raise ImportError("listing a diffusers model needs diffusers: pip install autoguidance[diffusers]") from e
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"{cfg} names {name!r}, which this diffusers version does not have")
    return cls.from_config(config)


def _run(args) -> int:
    from ..checkpoint import load

    dmodel = diffusers_from_config(args.model)
    if dmodel is not None:
        print(paste_guide(dmodel))
        print(site_table(list_sites_plain(dmodel), args.filter))
        return 0
    model = load(args.model)
    shape = _parse_shape(args.example_shape) if args.example_shape else None
    rows = sites(model, shape)
    if args.filter and not any(fnmatch.fnmatchcase(r["path"], args.filter) for r in rows):
        raise ValueError(f"no module path of {args.model} matches --filter {args.filter!r}; run without --filter "
                         "to see them all")
    print(site_table(rows, args.filter))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sites", help="list a network's module paths (where perturbations can go)",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="a shipped checkpoint name (see `autoguidance models`) or a checkpoint folder")
    p.add_argument("--example-shape", default=None,
                   help="shape of the example input x, e.g. 1,3,16,16 (default: from the checkpoint's config)")
    p.add_argument("--filter", default=None, help="only paths matching this glob, e.g. '*.dropout'")
    p.set_defaults(func=_run)
