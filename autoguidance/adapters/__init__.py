"""Adapters that put other libraries' models behind the denoiser contract `D(x, sigma, labels) -> x0_hat`.

    from autoguidance.adapters.diffusers import DiffusersDenoiser, InSituGuidedUNet   # needs autoguidance[diffusers]

Adapters import their library only when used, so `import autoguidance` never needs them.
"""

__all__: list[str] = []
