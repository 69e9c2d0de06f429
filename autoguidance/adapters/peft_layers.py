"""peft's adapter layers (LoRA and the other tuners: `peft.tuners.tuners_utils.BaseTunerLayer`) for perturbation
sites: a tuner layer wraps the model's own layer (`base_layer`) and adds the adapter's modules beside it (LoRA:
`lora_dropout`, `lora_A`, `lora_B`). Those are not the model's, so default sites leave them out (loading a LoRA does
not change a guide's sites); `where=` names them to include them. Registered with `autoguidance.perturb` the first
time a perturbation meets a peft module (`autoguidance.adapters` registers "peft." -> `register_rules`)."""
from __future__ import annotations

from ..perturb import register_adapter_layer

__all__ = ["register_rules"]


def register_rules() -> None:
    """Mark peft's tuner layers as adapter layers (their `base_layer` is the model's own)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    register_adapter_layer(BaseTunerLayer, lambda layer: getattr(layer, "base_layer", None))
