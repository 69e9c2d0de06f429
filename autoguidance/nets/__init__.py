"""Networks: the toy MLPs and magnitude-preserving primitives (EDM2)."""
from .edm2 import EDM2Precond, EDM2UNet
from .mp import MPLinear, MPSiLU, mp_cat, mp_silu, mp_sum, normalize
from .toy import DenoiserMLP, LogDensityMLP

__all__ = ["MPLinear", "MPSiLU", "mp_cat", "mp_silu", "mp_sum", "normalize", "DenoiserMLP", "LogDensityMLP",
           "EDM2Precond", "EDM2UNet", "register_builtin_families"]


def register_builtin_families() -> None:
    """Register the library's own network families with the checkpoint loader."""
    from ..checkpoint import register_family
    register_family(LogDensityMLP.family, LogDensityMLP)
    register_family(DenoiserMLP.family, DenoiserMLP)
    register_family(EDM2Precond.family, EDM2Precond)
    from ..metrics.features import DigitsClassifier  # the feature network of the digits metrics
    register_family(DigitsClassifier.family, DigitsClassifier)
