"""Per-family rules for perturbations on diffusers modules: one module per model family, each with a
`register()` that teaches `autoguidance.perturb` that family's modules (identity attention, skip paths, block
inputs, ...). A new family is one new module here: `register_rules()` runs every module of this package, in name
order, once. The rules arrive through perturb's lazy rule provider (`autoguidance.adapters` registers
"diffusers." -> `register_rules`), so diffusers is imported only when a diffusers model is used."""
from __future__ import annotations

import importlib
import pkgutil

__all__ = ["register_rules", "INSTALL_HINT", "FAMILIES"]

INSTALL_HINT = "pip install autoguidance[diffusers]"
#: the family modules of this package, in the order their rules are registered
FAMILIES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


def _require_diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(f"the diffusers adapter needs the diffusers package: {INSTALL_HINT}") from e
    return diffusers


_REGISTERED = False


def register_rules() -> None:
    """Register every family's rules with perturb (idempotent); needs diffusers."""
    global _REGISTERED
    if _REGISTERED:
        return
    _require_diffusers()
    _REGISTERED = True
    for name in FAMILIES:
        module = importlib.import_module(f"{__name__}.{name}")
        if not callable(getattr(module, "register", None)):
            raise TypeError(f"{module.__name__} has no register(): a family module must define register() that "
                            "registers its module rules with autoguidance.perturb")
        module.register()
