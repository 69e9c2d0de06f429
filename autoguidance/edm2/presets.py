"""The papers' ImageNet configurations by name, ready to sample once you have the official EDM2 checkpoints.

    net  = autoguidance.load("ckpt/edm2-img512-s-2147483-0.070")     # folders written by `autoguidance import-edm2`
    gnet = autoguidance.load("ckpt/edm2-img512-xs-0134217-0.125")
    preset = get_preset("edm2-img512-s-autog-fid")
    D = build_preset(preset.name, net, gnet)                            # a Guided denoiser
    latents = generate(D, seeds, [4, 64, 64], labels=labels, **preset.sampling())

Every preset states its method, its guidance weight `w` in this library's convention `D_bad + w (D_good - D_bad)`
(w = 1: no guidance), the official checkpoint file of the main net and of the guide with their post-hoc EMA
lengths (sigma_rel), the sampler settings, and the paper's FID / FD_DINOv2 for exactly that configuration.

Sources: the official NVlabs/edm2 `generate_images.py` presets (checkpoint names, EMA lengths, w, with the
metric each was tuned for); Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"
(autoguidance, Table 1); Kynkaanniemi et al. 2024, "Applying guidance in a limited interval" (CFG on
sigma in (sigma_lo, sigma_hi]); "In-situ autoguidance" (2025) (dropout p = 0.1 with the paper's w' = 2.0, which
is w = 3.0 here). Naming follows the official presets: `-guid-` is CFG with the separate unconditional XS net,
`-autog-` autoguidance; `-interval-` and `-insitu` are this library's names.

Notes on faithfulness:
- The official code switches the guidance interval by step index (e.g. steps 17..22 of 32 for EDM2-XXL); a sigma
  interval matches it except at the two boundary noise levels, where the official code guides one of the two
  evaluations (Euler or Heun) at that sigma and a sigma interval guides both or neither.
- In-situ autoguidance is applied with forward hooks on the `dropout` module inside every EDM2 block's residual
  branch (`edm2_dropout_sites`); the network stays in eval mode, so EDM2's forced weight normalisation never
  rewrites the stored weights (the official in-situ recipe switches the net to train mode instead).
"""
from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from ..guidance import Guided, autoguidance, cfg, insitu, insitu_weight, no_guidance
from ..schedules import check_probability, check_weight

__all__ = ["NetSpec", "Preset", "PRESETS", "METHODS", "SAMPLER", "get_preset", "list_presets", "build_preset",
           "edm2_dropout_sites", "presets_markdown", "format_number"]

#: The methods a preset can name, with what `build_preset` makes of them.
METHODS = {
    "none":         "the net alone",
    "cfg":          "classifier-free guidance with a separate unconditional guide net (gnet)",
    "cfg-interval": "CFG applied only for sigma in (sigma_lo, sigma_hi], w = 1 elsewhere",
    "autoguidance": "guide = a smaller and/or shorter-trained net of the same task and conditioning (gnet)",
    "insitu":       "guide = the same net with dropout p in every EDM2 block's residual branch",
}

#: EDM2's sampler, used by every ImageNet result in the papers: deterministic Heun (EDM Algorithm 2, no churn).
SAMPLER = dict(sampler="heun", num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0)


@dataclass(frozen=True)
class NetSpec:
    """One network of a preset: which official checkpoint, and what it is."""

    arch:       str                     # architecture in autoguidance.nets.edm2.PRESETS, e.g. 'edm2-img512-s'
    checkpoint: Optional[str] = None    # official post-hoc EMA file name (NVlabs/edm2); None: not published
    ema:        Optional[float] = None  # EMA length sigma_rel of that reconstruction; None: not given in the sources
    kimg:       Optional[int] = None    # training length in thousands of images
    label_dim:  int = 1000              # 1000 = class-conditional ImageNet; 0 = unconditional model

    @property
    def conditional(self) -> bool:
        return self.label_dim > 0

    def training(self, main_kimg: Optional[int] = None) -> str:
        """Training length relative to the main net's, T, as the papers state it ('T', 'T/16', 'T/3.5'), or in
        thousands of images for a guide trained longer than the main net (the CFG guides)."""
        if self.kimg is None:
            return "?"
        if main_kimg is None or self.kimg == main_kimg:
            return "T"
        ratio = main_kimg / self.kimg
        return f"T/{ratio:.3g}" if ratio > 1 else f"{self.kimg} kimg"

    def describe(self, main_kimg: Optional[int] = None) -> str:
        """E.g. 'XS (T/16, EMA 0.125)'; `main_kimg` is the main net's training length (T)."""
        size = self.arch.split("-")[-1].upper() + ("-uncond" if not self.conditional else "")
        ema = f"EMA {self.ema:.3f}" if self.ema is not None else "EMA not given"
        return f"{size} ({self.training(main_kimg)}, {ema})"


@dataclass(frozen=True, kw_only=True)
class Preset:
    """A named configuration of one of the papers. `w` uses `D_bad + w (D_good - D_bad)`."""

    name:        str                                    # e.g. 'edm2-img512-s-autog-fid'
    description: str                                    # one line
    method:      str                                    # a key of METHODS
    net:         NetSpec                                # the main net (D_good)
    gnet:        Optional[NetSpec] = None               # the guide net (cfg, cfg-interval, autoguidance)
    w:           float = 1.0                            # guidance weight; 1 = no guidance
    w_prime:     Optional[float] = None                 # the in-situ paper's w' (w = w' + 1), for insitu
    p:           Optional[float] = None                 # in-situ dropout probability
    sites:       Optional[str] = None                   # in-situ sites: 'edm2-residual' (see edm2_dropout_sites)
    interval:    Optional[tuple[float, float]] = None   # (sigma_lo, sigma_hi] of cfg-interval
    tuned_for:   str = "fid"                            # metric the settings were chosen for: 'fid' | 'fd_dinov2'
    fid:         Optional[float] = None                 # the paper's FID (50k images) for this configuration
    fd_dinov2:   Optional[float] = None                 # the paper's FD_DINOv2 for this configuration
    source:      str = ""                               # where the numbers come from
    note:        str = ""                               # caveats
    sampler:     dict = field(default_factory=lambda: dict(SAMPLER))

    def __post_init__(self):
        from ..nets.edm2 import PRESETS as ARCHS

        if self.method not in METHODS:
            raise ValueError(f"preset {self.name}: unknown method {self.method!r}; expected one of {list(METHODS)}")
        check_weight(self.w, f"preset {self.name}: w")
        for spec in (self.net, self.gnet):
            if spec is not None and spec.arch not in ARCHS:
                raise ValueError(f"preset {self.name}: unknown architecture {spec.arch!r}; known: {list(ARCHS)}")
        needs_gnet = self.method in ("cfg", "cfg-interval", "autoguidance")
        if needs_gnet != (self.gnet is not None):
            raise ValueError(f"preset {self.name}: method {self.method} {'needs' if needs_gnet else 'takes no'} gnet")
        if (self.method == "cfg-interval") != (self.interval is not None):
            raise ValueError(f"preset {self.name}: an interval goes with method cfg-interval, and only with it")
        if self.method == "insitu":
            if self.p is None or self.w_prime is None or self.sites != "edm2-residual":
                raise ValueError(f"preset {self.name}: insitu needs p, w_prime and sites='edm2-residual'")
            check_probability(self.p)
            if not math.isclose(self.w, insitu_weight(self.w_prime)):
                raise ValueError(f"preset {self.name}: w must be w' + 1 = {self.w_prime + 1}, got {self.w}")
        if self.tuned_for not in ("fid", "fd_dinov2"):
            raise ValueError(f"preset {self.name}: tuned_for must be 'fid' or 'fd_dinov2', got {self.tuned_for!r}")

    @property
    def latent(self) -> bool:
        """True for the ImageNet-512 models, which denoise Stable Diffusion VAE latents (decode with
        `autoguidance.edm2.latent.StabilityVAEDecoder`); False for ImageNet-64 (RGB pixels in [-1, 1])."""
        return "img512" in self.net.arch

    def sampling(self, **overrides) -> dict:
        """Keyword arguments for `autoguidance.generate` (sampler, num_steps, sigma_min, sigma_max, rho)."""
        unknown = set(overrides) - set(SAMPLER) - {"S_churn", "S_min", "S_max", "S_noise"}
        if unknown:
            raise ValueError(f"unknown sampler setting(s) {sorted(unknown)}; known: {sorted(SAMPLER)}")
        return {**self.sampler, **overrides}

    def weight_text(self) -> str:
        if self.method == "none":
            return "-"
        if self.method == "insitu":
            return f"{self.w:.2f} (w' = {self.w_prime:.1f})"
        return f"{self.w:.2f}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["latent"] = self.latent
        return d


# -- the table -------------------------------------------------------------------------------------------------

def _official(arch: str, kimg: int, ema: float, uncond: bool = False) -> NetSpec:
    """An official post-hoc EMA reconstruction: `{arch}[-uncond]-{kimg:07d}-{ema:.3f}.pkl`."""
    name = f"{arch}{'-uncond' if uncond else ''}-{kimg:07d}-{ema:.3f}.pkl"
    return NetSpec(arch, name, ema, kimg, 0 if uncond else 1000)


_S, _XS, _M, _XXL = "edm2-img512-s", "edm2-img512-xs", "edm2-img512-m", "edm2-img512-xxl"
_OFFICIAL = "NVlabs/edm2 generate_images.py preset"
_AG = "Karras et al. 2024 (autoguidance), Table 1"
_GI = "Kynkaanniemi et al. 2024 (guidance interval), as quoted in Karras et al. 2024, Table 1"
_NO_EMA = ("The sources give w and the interval but not the EMA lengths of this run; the CFG presets' lengths "
           "(0.025 / 0.085 for S, 0.015 for XXL) are a reasonable start.")

_LIST = [
    # -- no guidance --
    Preset(name="edm2-img512-s-fid", description="EDM2-S, no guidance", method="none",
           net=_official(_S, 2147483, 0.130), fid=2.56, source=_OFFICIAL),
    Preset(name="edm2-img512-s-dino", description="EDM2-S, no guidance", method="none",
           net=_official(_S, 2147483, 0.190), tuned_for="fd_dinov2", fd_dinov2=68.64, source=_OFFICIAL),
    Preset(name="edm2-img512-xxl-fid", description="EDM2-XXL, no guidance", method="none",
           net=_official(_XXL, 939524, 0.070), fid=1.91, source=_OFFICIAL),
    Preset(name="edm2-img512-xxl-dino", description="EDM2-XXL, no guidance", method="none",
           net=_official(_XXL, 939524, 0.150), tuned_for="fd_dinov2", fd_dinov2=42.84, source=_OFFICIAL),
    # -- classifier-free guidance (separate unconditional XS net, as EDM2 does) --
    Preset(name="edm2-img512-s-guid-fid", description="EDM2-S + CFG (XS unconditional guide)", method="cfg",
           net=_official(_S, 2147483, 0.025), gnet=_official(_XS, 2147483, 0.025, uncond=True), w=1.40,
           fid=2.23, source=_OFFICIAL),
    Preset(name="edm2-img512-s-guid-dino", description="EDM2-S + CFG (XS unconditional guide)", method="cfg",
           net=_official(_S, 2147483, 0.085), gnet=_official(_XS, 2147483, 0.085, uncond=True), w=1.90,
           tuned_for="fd_dinov2", fd_dinov2=52.32, source=_OFFICIAL),
    Preset(name="edm2-img512-xxl-guid-fid", description="EDM2-XXL + CFG (XS unconditional guide)", method="cfg",
           net=_official(_XXL, 939524, 0.015), gnet=_official(_XS, 2147483, 0.015, uncond=True), w=1.20,
           fid=1.81, source=_OFFICIAL),
    Preset(name="edm2-img512-xxl-guid-dino", description="EDM2-XXL + CFG (XS unconditional guide)", method="cfg",
           net=_official(_XXL, 939524, 0.015), gnet=_official(_XS, 2147483, 0.015, uncond=True), w=1.70,
           tuned_for="fd_dinov2", fd_dinov2=33.09, source=_OFFICIAL),
    # -- CFG in a limited interval --
    Preset(name="edm2-img512-s-interval-fid", description="EDM2-S + CFG on sigma in (0.28, 2.90]",
           method="cfg-interval", net=NetSpec(_S, kimg=2147483), gnet=NetSpec(_XS, kimg=2147483, label_dim=0),
           w=2.10, interval=(0.28, 2.90), fid=1.68, source=_GI, note=_NO_EMA),
    Preset(name="edm2-img512-s-interval-dino", description="EDM2-S + CFG on sigma in (0.28, 2.90]",
           method="cfg-interval", net=NetSpec(_S, kimg=2147483), gnet=NetSpec(_XS, kimg=2147483, label_dim=0),
           w=3.20, interval=(0.28, 2.90), tuned_for="fd_dinov2", fd_dinov2=46.25, source=_GI,
           note=_NO_EMA + " The FD_DINOv2 run is quoted with the same interval as the FID run."),
    Preset(name="edm2-img512-xxl-interval-fid", description="EDM2-XXL + CFG on sigma in (0.19, 1.61]",
           method="cfg-interval", net=NetSpec(_XXL, kimg=939524), gnet=NetSpec(_XS, kimg=2147483, label_dim=0),
           w=2.00, interval=(0.19, 1.61), fid=1.40,
           source=_GI + "; the official guidance-interval code guides steps 17..22 of 32, sigma 1.61..0.19",
           note=_NO_EMA + " The paper reports FD_DINOv2 29.16 for XXL with an interval, but its w is not in "
                          "our sources, so there is no -dino preset."),
    # -- autoguidance --
    Preset(name="edm2-img512-s-autog-fid", description="EDM2-S guided by XS trained T/16", method="autoguidance",
           net=_official(_S, 2147483, 0.070), gnet=_official(_XS, 134217, 0.125), w=2.10, fid=1.34,
           source=f"{_OFFICIAL}; {_AG}"),
    Preset(name="edm2-img512-s-autog-dino", description="EDM2-S guided by XS trained T/16", method="autoguidance",
           net=_official(_S, 2147483, 0.120), gnet=_official(_XS, 134217, 0.165), w=2.45,
           tuned_for="fd_dinov2", fd_dinov2=36.67, source=f"{_OFFICIAL}; {_AG}"),
    Preset(name="edm2-img512-xxl-autog-fid", description="EDM2-XXL guided by M trained T/3.5",
           method="autoguidance", net=_official(_XXL, 939524, 0.075), gnet=_official(_M, 268435, 0.155), w=2.05,
           fid=1.25, source=f"{_OFFICIAL}; {_AG}"),
    Preset(name="edm2-img512-xxl-autog-dino", description="EDM2-XXL guided by M trained T/3.5",
           method="autoguidance", net=_official(_XXL, 939524, 0.130), gnet=_official(_M, 268435, 0.205), w=2.30,
           tuned_for="fd_dinov2", fd_dinov2=24.18, source=f"{_OFFICIAL}; {_AG}"),
    Preset(name="edm2-img512-s-uncond-autog-fid", description="unconditional EDM2-S guided by unconditional XS "
           "trained T/16", method="autoguidance", net=_official(_S, 2147483, 0.070, uncond=True),
           gnet=_official(_XS, 134217, 0.110, uncond=True), w=2.85, fid=3.86, source=f"{_OFFICIAL}; {_AG}",
           note="The unguided unconditional EDM2-S scores FID 11.67, FD_DINOv2 209.53."),
    Preset(name="edm2-img512-s-uncond-autog-dino", description="unconditional EDM2-S guided by unconditional XS "
           "trained T/16", method="autoguidance", net=_official(_S, 2147483, 0.090, uncond=True),
           gnet=_official(_XS, 134217, 0.125, uncond=True), w=2.90, tuned_for="fd_dinov2", fd_dinov2=90.39,
           source=f"{_OFFICIAL}; {_AG}"),
    Preset(name="edm2-img64-s-autog-fid", description="ImageNet-64 EDM2-S guided by XS trained T/8",
           method="autoguidance", net=_official("edm2-img64-s", 1073741, 0.045),
           gnet=_official("edm2-img64-xs", 134217, 0.110), w=1.70, fid=1.01, source=f"{_OFFICIAL}; {_AG}"),
    Preset(name="edm2-img64-s-autog-dino", description="ImageNet-64 EDM2-S guided by XS trained T/8",
           method="autoguidance", net=_official("edm2-img64-s", 1073741, 0.105),
           gnet=_official("edm2-img64-xs", 134217, 0.175), w=2.20, tuned_for="fd_dinov2", fd_dinov2=31.85,
           source=f"{_OFFICIAL}; {_AG}"),
    # -- in-situ autoguidance --
    Preset(name="edm2-img512-s-insitu", description="EDM2-S guided by itself with dropout 0.1 in every block's "
           "residual branch", method="insitu", net=NetSpec(_S, "edm2-img512-s-2147483-0.130.pkl", 0.130, 2147483),
           w=insitu_weight(2.0), w_prime=2.0, p=0.1, sites="edm2-residual", fid=2.57, fd_dinov2=90.05,
           source="In-situ autoguidance (2025), EDM2-S on ImageNet-512",
           note="EDM2-S was trained without dropout, so this is a post-hoc degradation. The paper reports one run "
                "for both metrics; its EMA length is not stated in our sources (0.130, the unguided FID optimum, "
                "is used here). Unguided: FID 2.56, FD_DINOv2 68.64."),
    Preset(name="edm2-img512-m-insitu", description="EDM2-M (trained with dropout 0.1) guided by itself with "
           "that dropout", method="insitu", net=NetSpec(_M, "edm2-img512-m-2147483-0.100.pkl", 0.100, 2147483),
           w=insitu_weight(2.0), w_prime=2.0, p=0.1, sites="edm2-residual",
           source="In-situ autoguidance (2025) settings applied to EDM2-M",
           note="No published number: the paper evaluates EDM2-S only. EDM2-M was trained with dropout 0.1 at "
                "exactly these sites, so the guide re-uses training-time dropout. Unguided M (EMA 0.100): FID "
                "2.25 (NVlabs/edm2)."),
]

#: Every preset by name.
PRESETS: dict[str, Preset] = {p.name: p for p in _LIST}


def list_presets() -> list[str]:
    """The preset names, in table order."""
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called `name`; a KeyError names close matches and where to see the list."""
    if isinstance(name, Preset):
        return name
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), list(PRESETS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown preset {name!r}.{hint} List them with `autoguidance presets` "
                       f"or autoguidance.edm2.presets.list_presets().")
    return PRESETS[name]


# -- building the guided denoiser ------------------------------------------------------------------------------

def edm2_dropout_sites(net: torch.nn.Module) -> list[str]:
    """Module paths of the `dropout` inside every EDM2 block's residual branch (between the block's second
    MP-SiLU and its second 3x3 conv, where EDM2 trains with dropout), e.g. `unet.enc.64x64_block0.dropout`.
    Every block has one, also the down/up-sampling blocks and the decoder's `_in0` / `_in1`, as in EDM2."""
    from ..nets.edm2 import EDM2Block

    sites = [f"{path}.dropout" for path, m in net.named_modules()
             if isinstance(m, EDM2Block) and isinstance(getattr(m, "dropout", None), torch.nn.Dropout)]
    if not sites:
        raise ValueError(f"{type(net).__name__} has no EDM2 blocks: the in-situ presets target EDM2 networks "
                         "(autoguidance.nets.edm2). For another network use autoguidance.insitu(net, w, p, where=...) "
                         "with paths from autoguidance.list_sites(net).")
    return sites


def _as_net(net, device, role: str):
    if net is None or isinstance(net, torch.nn.Module) or (callable(net) and not isinstance(net, (str, Path))):
        return net
    if isinstance(net, (str, Path)):
        from ..checkpoint import load
        return load(net, device=device)
    raise TypeError(f"{role} must be a network (torch.nn.Module), a denoiser callable or a checkpoint folder, "
                    f"got {type(net).__name__}")


def _check_net(preset: Preset, net, spec: NetSpec, role: str) -> None:
    if isinstance(net, torch.nn.Module):
        training = [n or "(root)" for n, m in net.named_modules() if m.training]
        if training:
            raise ValueError(f"{role} has modules in training mode ({', '.join(training[:3])}"
                             f"{', ...' if len(training) > 3 else ''}): EDM2's layers rewrite their stored weights "
                             "in training mode, so guided sampling needs the net in eval mode. Call net.eval() "
                             "(autoguidance.load returns nets in eval mode).")
    label_dim = getattr(net, "label_dim", None)
    if label_dim is not None and (label_dim > 0) != spec.conditional:
        want = "class-conditional (label_dim > 0)" if spec.conditional else "unconditional (label_dim = 0)"
        raise ValueError(f"preset {preset.name} wants {role} = {spec.describe(preset.net.kimg)}, which is {want}, "
                         f"but the given network has label_dim = {label_dim}. Check the order of net and gnet, or "
                         "the checkpoint.")
    channels = getattr(net, "img_channels", None)
    if channels is not None:
        from ..nets.edm2 import PRESETS as ARCHS
        want_ch = ARCHS[spec.arch]["img_channels"]
        if channels != want_ch:
            what = "Stable Diffusion VAE latents" if want_ch == 4 else "RGB pixels"
            raise ValueError(f"preset {preset.name} wants {role} of {spec.arch} ({want_ch} channels: {what}), "
                             f"but the given network has img_channels = {channels}")


def build_preset(name: Union[str, Preset], net, gnet=None, *, max_batch: Optional[int] = None,
                 device="cpu") -> Guided:
    """The guided denoiser of preset `name` around your networks.

    `net` is the main net (D_good), `gnet` the guide net for 'cfg', 'cfg-interval' and 'autoguidance' presets
    (the unconditional XS for CFG, the smaller / shorter-trained net for autoguidance); 'none' and 'insitu' take
    no gnet. Each is a network module or a checkpoint folder (loaded with `autoguidance.load`). Nets must be in
    eval mode. Returns a `Guided` denoiser `D(x [N, C, R, R], sigma, labels [N, label_dim] or None)`; sample it
    with `autoguidance.generate(D, seeds, shape, labels=..., **preset.sampling())`.
    """
    preset = get_preset(name)
    net = _as_net(net, device, "net")
    gnet = _as_net(gnet, device, "gnet")
    if net is None:
        raise ValueError(f"preset {preset.name} needs net = {preset.net.describe()}"
                         f"{' (' + preset.net.checkpoint + ')' if preset.net.checkpoint else ''}")
    _check_net(preset, net, preset.net, "net")
    if preset.gnet is not None:
        if gnet is None:
            raise ValueError(f"preset {preset.name} ({METHODS[preset.method]}) needs gnet = "
                             f"{preset.gnet.describe(preset.net.kimg)}"
                             f"{' (' + preset.gnet.checkpoint + ')' if preset.gnet.checkpoint else ''}; "
                             "import it with `autoguidance import-edm2` and pass it as gnet")
        _check_net(preset, gnet, preset.gnet, "gnet")
        same = ("img_resolution", "img_channels") + (("label_dim",) if preset.method == "autoguidance" else ())
        for attr in same:
            a, b = getattr(net, attr, None), getattr(gnet, attr, None)
            if a is not None and b is not None and a != b:
                raise ValueError(f"{preset.method} needs a guide of the same task"
                                 f"{' and conditioning' if attr == 'label_dim' else ''}, but net has {attr} = {a} "
                                 f"and gnet has {attr} = {b}")
    elif gnet is not None:
        raise ValueError(f"preset {preset.name} ({METHODS[preset.method]}) takes no gnet; drop it")

    if preset.method == "none":
        return no_guidance(net)
    if preset.method in ("cfg", "cfg-interval"):
        return cfg(net, preset.w, uncond=gnet, interval=preset.interval, max_batch=max_batch)
    if preset.method == "autoguidance":
        return autoguidance(net, gnet, preset.w, max_batch=max_batch)
    if not isinstance(net, torch.nn.Module):
        raise TypeError(f"preset {preset.name} hooks dropout into the network's modules: pass the EDM2 network "
                        f"module, not a {type(net).__name__}")
    return insitu(net, preset.w, preset.p, where=edm2_dropout_sites(net), module=net, max_batch=max_batch)


# -- the table and the command -------------------------------------------------------------------------------

def format_number(v: Optional[float], bold: bool = False) -> str:
    if v is None:
        return "—"
    return f"**{v:.2f}**" if bold else f"{v:.2f}"


def presets_markdown() -> str:
    """The preset table (Markdown), with the paper's numbers; the metric each preset was tuned for in bold."""
    rows = ["| preset | method | w | net | guide | interval / dropout | FID | FD_DINOv2 |",
            "|---|---|---|---|---|---|---|---|"]
    for p in PRESETS.values():
        if p.method == "cfg-interval":
            extra = f"sigma in ({p.interval[0]:g}, {p.interval[1]:.2f}]"
        elif p.method == "insitu":
            extra = f"p = {p.p:g}, every block's residual branch"
        else:
            extra = ""
        if p.gnet is not None:
            guide = p.gnet.describe(p.net.kimg)
        else:
            guide = "itself, dropout on" if p.method == "insitu" else "—"
        rows.append(f"| `{p.name}` | {p.method} | {p.weight_text()} | {p.net.describe()} | {guide} | {extra} | "
                    f"{format_number(p.fid, p.tuned_for == 'fid')} | {format_number(p.fd_dinov2, p.tuned_for == 'fd_dinov2')} |")
    return "\n".join(rows) + "\n"
