"""autoguidance: guide a diffusion model with a bad version of itself.

Autoguidance (Karras et al. 2024), in-situ autoguidance (2025), classifier-free guidance and guidance intervals
for any PyTorch denoiser `D(x, sigma, labels=None) -> x0_hat` (EDM convention), in one weight convention:

    D_w = D_bad + w (D_good - D_bad)          (w = 1: no guidance; the in-situ paper's w' is w - 1)
"""
from . import adapters  # noqa: F401  (registers the adapters' module rules with perturb, lazily)
from ._version import __version__
from .checkpoint import load, save, shipped
from .denoiser import Denoiser, EDMPrecond
from .guidemaker import make_guide
from .guidance import (Guided, Guide, Pass, autoguidance, cfg, cfg_autoguidance, insitu, insitu_weight,
                       no_guidance, perturbation_guidance)
from .perturb import (BlockDrop, Dropout, IdentityAttention, InputNoise, NoisierLevel, SkipLayers, SmoothedAttention,
                      TokenShuffle, WeightNoise, list_sites)
from . import rules
from .rules import APG, FDG, MAMBO, TCFG, CFGZeroStar, Linear, Rescale
from .sampling import generate, sample_dpmpp_2m, sample_euler, sample_flow_euler, sample_heun, sigmas_karras
from .schedules import Constant, Interval, Ramp, StepList, StepWindow


__all__ = ["load", "save", "shipped", "Denoiser", "EDMPrecond", "Guided", "Guide", "Pass", "autoguidance", "cfg",
           "cfg_autoguidance", "insitu", "insitu_weight", "no_guidance", "perturbation_guidance", "Dropout",
           "BlockDrop", "InputNoise", "WeightNoise", "IdentityAttention", "SkipLayers", "SmoothedAttention",
           "TokenShuffle", "NoisierLevel", "list_sites", "generate", "sample_euler", "sample_heun", "sample_dpmpp_2m",
           "sample_flow_euler", "sigmas_karras", "Constant", "Interval", "Ramp", "StepList", "StepWindow", "rules",
           "Linear", "Rescale", "APG", "CFGZeroStar", "TCFG", "FDG", "MAMBO", "make_guide", "__version__"]
