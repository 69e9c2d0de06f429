"""Networks: the toy MLPs, magnitude-preserving primitives, the EDM2 U-Net, the digits feature classifier, the
self-supervised encoder of the second feature space.

They know nothing above them. `FAMILIES` names each network family for the checkpoint loader."""
from .classifier import DigitsClassifier
from .encoder import ContrastiveEncoder
from .edm2 import EDM2Precond, EDM2UNet
from .mp import MPLinear, MPSiLU, mp_cat, mp_silu, mp_sum, normalize
from .toy import DenoiserMLP, LogDensityMLP

__all__ = ["MPLinear", "MPSiLU", "mp_cat", "mp_silu", "mp_sum", "normalize", "DenoiserMLP", "LogDensityMLP",
           "EDM2Precond", "EDM2UNet", "DigitsClassifier", "ContrastiveEncoder", "FAMILIES"]

#: family name (stored in a checkpoint's config.json) -> constructor; `autoguidance.checkpoint` reads it.
FAMILIES = {net.family: net for net in (LogDensityMLP, DenoiserMLP, EDM2Precond, DigitsClassifier, ContrastiveEncoder)}
