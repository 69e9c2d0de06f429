"""Config reducers: a smaller copy of a main's architecture (fewer channels and/or blocks), and its initialisation
from the main's weights where the shapes allow.

    cfg, units = reduce_config("edm2", main.config, width=2/3)                 # the library's EDM2-style U-Nets
    cfg, units = reduce_config("SD3Transformer2DModel", dict(main.config), depth=0.5)
    report = init_from_main(guide, main, units)                                # copy / slice what fits

**What is reduced.** `width` scales the channels: EDM2 `model_channels`; a diffusers U-Net's `block_out_channels`
(multiples of its group-norm groups; the head count, or the head width, kept, whichever gives the finer grid);
a transformer's head count (the head width is kept, so rotary and attention layouts stay valid; Wan's `ffn_dim`
scales too). `depth` scales the blocks: EDM2 `num_blocks`; a U-Net's `layers_per_block` and
`transformer_layers_per_block`; a transformer's `num_layers` (Flux also `num_single_layers`). Everything that fixes
the task stays: the data's channels and resolution, the class count, the text widths, the pooled widths.

**Defaults** (`DEFAULTS`): U-Nets `width 2/3, depth 1` (the papers' XS/S channel ratio, 128/192: about 0.45x the
parameters); transformers `width 1, depth 1/2` (every other block: about 0.5x, and a block-for-block init).

**Initialisation from the main** (`init_from_main`): each guide tensor takes the main tensor of the same name, with
the block index of a shortened list (`transformer_blocks.5`) mapped to the evenly spaced main block (first and last
kept); a dimension of the same size is copied, a reduced one keeps, of each `width`-unit segment (e.g. each of the 6
adaLN chunks of `6 x inner`, the 4 MLP chunks of `4 x inner`, each skip concatenation of U-Net widths), the leading
channels: the same selection on both sides of every layer. A tensor whose sizes fit no unit keeps its fresh
initialisation, and the report counts it.
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch

__all__ = ["DEFAULTS", "TRANSFORMERS", "reduce_config", "init_from_main", "evenly_spaced", "family_of"]

#: diffusers transformer classes the reducer knows (head count x head width; blocks in ModuleLists)
TRANSFORMERS = ("SD3Transformer2DModel", "DiTTransformer2DModel", "PixArtTransformer2DModel",
                "FluxTransformer2DModel", "WanTransformer3DModel")
UNETS = ("edm2", "UNet2DConditionModel", "UNet2DModel")
#: (width, depth) defaults per family kind
DEFAULTS = {"unet": (2 / 3, 1.0), "transformer": (1.0, 0.5)}


def family_of(name: str) -> str:
    """'unet' or 'transformer' for a family / diffusers class name the reducer knows; ValueError otherwise."""
    if name in UNETS:
        return "unet"
    if name in TRANSFORMERS:
        return "transformer"
    raise ValueError(f"no config reducer for {name!r}: distill knows the library's EDM2-style nets (edm2) and the "
                     f"diffusers {', '.join(UNETS[1:] + TRANSFORMERS)}; use recipe self-synthetic or weight-decay "
                     "(a full-size copy) for other models")


def _check_fraction(v: float, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        what = "channels" if name == "width" else "blocks"
        raise ValueError(f"--{name} must be a fraction in (0, 1] of the main's {what}, "
                         f"got {v!r}")
    return float(v)


def _scale_count(n: int, depth: float) -> int:
    return max(1, int(round(n * depth)))


def _round_to(v: float, q: int) -> int:
    """`v` rounded to the nearest positive multiple of `q`."""
    return max(q, int(round(v / q)) * q)


def reduce_config(name: str, config: dict, width: Optional[float] = None, depth: Optional[float] = None
                  ) -> tuple[dict, list[tuple[int, int]]]:
    """`(guide config, units)`: the reduced constructor config of family / diffusers class `name`, and the
    `(main, guide)` channel units that `init_from_main` slices by. `width`, `depth` None take `DEFAULTS`."""
    kind = family_of(name)
    dw, dd = DEFAULTS[kind]
    width = _check_fraction(dw if width is None else width, "width")
    depth = _check_fraction(dd if depth is None else depth, "depth")
    cfg = {k: copy.deepcopy(v) for k, v in dict(config).items() if not str(k).startswith("_")}
    if name == "edm2":
        return _reduce_edm2(cfg, width, depth)
    if name in ("UNet2DConditionModel", "UNet2DModel"):
        return _reduce_unet(cfg, width, depth)
    return _reduce_transformer(name, cfg, width, depth)


def _reduce_edm2(cfg: dict, width: float, depth: float):
    mc = int(cfg["model_channels"])
    cph = int(cfg.get("channels_per_head", 64))
    mult = list(cfg.get("channel_mult", (1, 2, 3, 4)))
    attn_levels = [m for i, m in enumerate(mult)
                   if (int(cfg["img_resolution"]) >> i) in set(cfg.get("attn_resolutions", (16, 8)))]
    new = max(1, int(round(mc * width)))
    if attn_levels and new * min(attn_levels) < cph:   # every attention layer needs one head at least
        new = math.ceil(cph / min(attn_levels))
    cfg["model_channels"] = new
    cfg["num_blocks"] = _scale_count(int(cfg.get("num_blocks", 3)), depth)
    return cfg, [(mc, new)]


def _as_list(v, n: int) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


def _reduce_unet(cfg: dict, width: float, depth: float):
    chans = [int(c) for c in cfg.get("block_out_channels", (320, 640, 1280, 1280))]
    n = len(chans)
    groups = int(cfg.get("norm_num_groups") or 32)
    legacy = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)   # diffusers: heads per level
    heads = [int(h) for h in _as_list(legacy, n)]
    if any(c % h for c, h in zip(chans, heads)):
        raise ValueError(f"the U-Net's channels {chans} do not split into its {heads} attention heads")
    keep_heads = math.lcm(groups, *heads)                       # channels stay a multiple of groups and heads
    keep_dim = math.lcm(groups, *[c // h for c, h in zip(chans, heads)])
    q = min(keep_heads, keep_dim)
    if all(c % chans[0] == 0 for c in chans):                   # widths as multiples of the first: one unit
        base = _round_to(chans[0] * width, q)
        new = [c // chans[0] * base for c in chans]
        units = [(chans[0], base)]
    else:
        new = [_round_to(c * width, q) for c in chans]
        units = sorted(set(zip(chans, new)))
    new_heads = heads if keep_heads <= keep_dim else [nc // (c // h) for nc, c, h in zip(new, chans, heads)]
    cfg["block_out_channels"] = new
    cfg["attention_head_dim"] = new_heads if isinstance(legacy, (list, tuple)) or len(set(new_heads)) > 1 \
        else new_heads[0]
    if cfg.get("num_attention_heads") is not None:
        cfg["num_attention_heads"] = cfg["attention_head_dim"]
    lpb = cfg.get("layers_per_block", 2)
    cfg["layers_per_block"] = ([_scale_count(int(v), depth) for v in lpb] if isinstance(lpb, (list, tuple))
                               else _scale_count(int(lpb), depth))
    tl = cfg.get("transformer_layers_per_block", 1)
    if isinstance(tl, (list, tuple)) and tl and isinstance(tl[0], (list, tuple)):
        cfg["transformer_layers_per_block"] = [[_scale_count(int(v), depth) for v in row] for row in tl]
    elif isinstance(tl, (list, tuple)):
        cfg["transformer_layers_per_block"] = [_scale_count(int(v), depth) for v in tl]
    else:
        cfg["transformer_layers_per_block"] = _scale_count(int(tl), depth)
    if cfg.get("reverse_transformer_layers_per_block"):
        cfg["reverse_transformer_layers_per_block"] = [[_scale_count(int(v), depth) for v in row]
                                                       for row in cfg["reverse_transformer_layers_per_block"]]
    return cfg, units


def _reduce_transformer(name: str, cfg: dict, width: float, depth: float):
    heads = int(cfg["num_attention_heads"])
    dim = int(cfg["attention_head_dim"])
    new_heads = max(1, int(round(heads * width)))
    cfg["num_attention_heads"] = new_heads
    units = [(heads * dim, new_heads * dim)]
    layers = int(cfg.get("num_layers", 1))
    new_layers = _scale_count(layers, depth)
    cfg["num_layers"] = new_layers
    if name == "SD3Transformer2DModel":
        if int(cfg.get("caption_projection_dim", heads * dim)) == heads * dim:
            cfg["caption_projection_dim"] = new_heads * dim            # SD3 projects the text to the inner width
        dual = [int(i) for i in cfg.get("dual_attention_layers") or ()]
        if dual:
            cfg["dual_attention_layers"] = sorted({j for j, i in enumerate(evenly_spaced(new_layers, layers))
                                                   if i in dual})
    elif name == "PixArtTransformer2DModel":
        if cfg.get("cross_attention_dim") is not None and int(cfg["cross_attention_dim"]) == heads * dim:
            cfg["cross_attention_dim"] = new_heads * dim
    elif name == "FluxTransformer2DModel":
        cfg["num_single_layers"] = _scale_count(int(cfg.get("num_single_layers", 38)), depth)
    elif name == "WanTransformer3DModel":
        ffn = int(cfg.get("ffn_dim", 13824))
        cfg["ffn_dim"] = _round_to(ffn * new_heads / heads, 64) if new_heads != heads else ffn
        units.append((ffn, cfg["ffn_dim"]))
    return cfg, units


# -- initialisation from the main ----------------------------------------------------------------------------------

def evenly_spaced(n: int, total: int) -> list[int]:
    """`n` indices of `range(total)`, evenly spaced, first and last included (n = total: all of them)."""
    if n >= total:
        return list(range(total))
    if n == 1:
        return [0]
    return [int(round(j * (total - 1) / (n - 1))) for j in range(n)]


def _main_key(key: str, guide: torch.nn.Module, main: torch.nn.Module) -> Optional[str]:
    """The main's state-dict key for a guide key, with the indices of shortened ModuleLists mapped evenly."""
    parts = key.split(".")
    g, m = guide, main
    out = []
    for i, part in enumerate(parts[:-1]):
        if isinstance(g, torch.nn.ModuleList) and part.isdigit():
            if not isinstance(m, torch.nn.ModuleList):
                return None
            j = evenly_spaced(len(g), len(m))[int(part)]
            g, m = g[int(part)], m[j]
            out.append(str(j))
            continue
        if not hasattr(g, part) or not hasattr(m, part):
            return None
        g, m = getattr(g, part), getattr(m, part)
        if not isinstance(m, torch.nn.Module):
            return None
        out.append(part)
    out.append(parts[-1])
    return ".".join(out)


def _index(m: int, g: int, units: Sequence[tuple[int, int]]) -> Optional[torch.Tensor]:
    """Which of a main dimension's `m` entries a guide dimension of `g` keeps, or None if no unit fits."""
    if m == g:
        return torch.arange(m)
    for u, v in units:
        if u and v and m % u == 0 and g % v == 0 and m // u == g // v:
            r = m // u
            return (torch.arange(r)[:, None] * u + torch.arange(v)[None, :]).flatten()
    return None


@torch.no_grad()
def init_from_main(guide: torch.nn.Module, main: torch.nn.Module, units: Sequence[tuple[int, int]]) -> dict:
    """Copy into `guide` (in place) every tensor of `main` that fits, slicing reduced dimensions unit by unit (see
    the module docstring). Returns `{'copied', 'sliced', 'fresh'}`: tensor counts, `fresh` also by name."""
    mstate = main.state_dict()
    report = {"copied": 0, "sliced": 0, "fresh": []}
    for key, t in guide.state_dict().items():
        mk = _main_key(key, guide, main)
        src = mstate.get(mk) if mk is not None else None
        if src is None or src.ndim != t.ndim:
            report["fresh"].append(key)
            continue
        idx = [_index(a, b, units) for a, b in zip(src.shape, t.shape)]
        if any(i is None for i in idx):
            report["fresh"].append(key)
            continue
        sub = src
        for d, i in enumerate(idx):
            if len(i) != src.shape[d]:
                sub = sub.index_select(d, i.to(sub.device))
        t.copy_(sub.to(t.dtype))
        report["copied" if tuple(src.shape) == tuple(t.shape) else "sliced"] += 1
    return report
