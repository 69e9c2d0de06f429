"""Reading the feature networks' official weight files safely: a state dict read with `torch.load(weights_only=True)`
(no code runs), and a one-line description of how a state dict differs from the expected keys and shapes."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

__all__ = ["read_state_dict", "state_mismatch"]


def read_state_dict(path: Union[str, Path], flag: str, needs: str) -> dict:
    """The state dict in `path`; a file that is not one (truncated, a pickle with objects, not a torch file) is
    a one-line ValueError naming `flag` and what it `needs` ('pass FILE from WHERE')."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:   # truncated archive, a pickle with objects, not a torch file at all
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(f"{flag} {path} cannot be read as a state dict ({first}): {needs}") from e


def state_mismatch(state: dict, want: dict) -> Optional[str]:
    """None if `state` has exactly the keys of `want` (key -> shape) with those shapes, else what differs first."""
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    bad = sorted(k for k in set(want) & set(state) if tuple(state[k].shape) != tuple(want[k]))
    if missing:
        return f"{len(missing)} keys missing (e.g. {missing[0]})"
    if extra:
        return f"{len(extra)} unexpected keys (e.g. {extra[0]})"
    if bad:
        return f"shape of {bad[0]} is {tuple(state[bad[0]].shape)}, not {tuple(want[bad[0]])}"
    return None
