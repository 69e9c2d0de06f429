"""Adapters that put other libraries' models behind the denoiser contract `D(x, sigma, labels) -> x0_hat`.

    from autoguidance.adapters.diffusers import DiffusersDenoiser, InSituGuidedUNet   # needs autoguidance[diffusers]
    from autoguidance.adapters import guided_pipeline       # any method inside a diffusers pipeline's own loop
    from autoguidance.adapters.guider import AutoguidanceGuider   # the same for modular pipelines (a diffusers guider)

`DiffusersDenoiser` wraps U-Nets and transformers (DiT, SD3, Flux, PixArt / Sana, video DiTs) with a VP or a
flow-matching scheduler; conditioning goes in as a mapping of the model's keyword arguments. k-diffusion's model
wrappers (`DiscreteEpsDDPMDenoiser`, ...) need no adapter: guidance passes a conditioning mapping to a net whose
forward takes `**kwargs` as keyword arguments, and guided denoisers run in k-diffusion's samplers as they are.

Adapters import their library only when used, so `import autoguidance` never needs them. Importing this package
tells the perturbations (`autoguidance.perturb`) where each library's module rules live (skip paths, attention;
peft's adapter layers, whose own modules default sites leave out): they are loaded the first time a perturbation
meets a module of that library. The core never imports an adapter.
"""
from ..perturb import register_rule_provider

__all__ = ["DiffusersDenoiser", "InSituGuidedUNet", "flow_times", "guided_pipeline", "GuidedPipeline",
           "AutoguidanceGuider"]
_DIFFUSERS_NAMES = {"DiffusersDenoiser", "InSituGuidedUNet", "flow_times"}
_PIPELINE_NAMES = {"guided_pipeline", "GuidedPipeline"}
_GUIDER_NAMES = {"AutoguidanceGuider"}


def _diffusers_rules() -> None:
    from .diffusers.families import register_rules
    register_rules()


def _peft_rules() -> None:
    from .peft_layers import register_rules
    register_rules()


register_rule_provider("diffusers.", _diffusers_rules)
register_rule_provider("peft.", _peft_rules)


def __getattr__(name: str):
    """`autoguidance.adapters.DiffusersDenoiser` etc., imported (with diffusers) on first use."""
    if name in _DIFFUSERS_NAMES:
        from . import diffusers
        return getattr(diffusers, name)
    if name in _PIPELINE_NAMES:
        from . import pipeline
        return getattr(pipeline, name)
    if name in _GUIDER_NAMES:
        from . import guider
        return getattr(guider, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
