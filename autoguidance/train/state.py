"""Training states as safetensors + JSON (never pickle), for exact resume: every tensor of a run (the net, the
optimiser's moments, the power-function EMAs, the RNG states) in `state.safetensors`, everything else (step,
seconds, the run's settings, the optimiser's param groups) in `state.json`, written last, so a state folder with a
`state.json` is complete.

    save_state(path, settings={...}, step=t, net=net, opt=opt, ema=ema, gen=gen, seconds=s)
    meta = load_state(path, net=net, opt=opt, ema=ema, gen=gen, settings={...})   # refuses other settings

`train_edm2` (`train/edm.py`) and `make-guide` (`autoguidance.guidemaker`) write this one format; `settings` is the
JSON-able record of what determines the run (EDM2's `config`); a resume with other settings is refused, naming the
keys that differ. `extra` tensors (e.g. a second net) ride along under their own prefix.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..runs.files import atomic_path, write_json
from .ema import PowerFunctionEMA

__all__ = ["STATE_FORMAT", "save_state", "load_state", "read_state_meta", "latest_state", "state_name", "settings_diff"]

STATE_FORMAT = "autoguidance-train-state"


def state_name(step: int) -> str:
    """The folder name of the state after `step` iterations: 'iter-000128'."""
    return f"iter-{int(step):06d}"


def latest_state(state_dir) -> Optional[Path]:
    """The complete state folder (one with a state.json) of the highest step in `state_dir`, or None."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        return None
    done = sorted(p for p in state_dir.glob("iter-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def save_state(path, *, settings: dict, step: int, net: torch.nn.Module, opt: torch.optim.Optimizer,
               ema: PowerFunctionEMA, gen: torch.Generator, seconds: float,
               extra: Optional[dict] = None) -> Path:
    """Write the complete training state to folder `path` (`state.safetensors` + `state.json`), atomically.
    `settings` is stored as the record's `config`; `extra` adds JSON fields to the record."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in net.state_dict().items():
        tensors[f"net.{k}"] = v
    for s, m in ema.averages.items():
        for k, v in m.state_dict().items():
            tensors[f"ema.{s!r}.{k}"] = v
    opt_state = opt.state_dict()
    opt_keys: dict[str, list[str]] = {}
    for idx, st in opt_state["state"].items():
        opt_keys[str(idx)] = sorted(st)
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = torch.as_tensor(v)
    tensors["rng.generator"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"format": STATE_FORMAT, "version": 1, "step": step, "seconds": seconds, "config": settings,
            "ema_steps": ema.steps, "opt_param_groups": opt_state["param_groups"], "opt_keys": opt_keys,
            **(extra or {})}
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / "state.safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    write_json(path / "state.json", meta)  # written last: a state folder with a state.json is complete
    return path


def read_state_meta(path) -> dict:
    """The JSON record of a state folder; FileNotFoundError / ValueError (one line) when it is not one."""
    path = Path(path)
    if not (path / "state.json").exists() or not (path / "state.safetensors").exists():
        raise FileNotFoundError(f"{path} is not a training state folder (needs state.json and state.safetensors, "
                                "as written by `autoguidance train` into --state-dir or by make-guide)")
    meta = json.loads((path / "state.json").read_text())
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}/state.json is not an {STATE_FORMAT} record")
    return meta


def settings_diff(saved: dict, now: dict, ignore: Sequence[str] = ()) -> dict:
    """`{key: (saved, now)}` for the settings that differ (JSON-normalised; `ignore` keys left out)."""
    mine = {k: v for k, v in json.loads(json.dumps(now)).items() if k not in ignore}
    theirs = {k: v for k, v in dict(saved).items() if k not in ignore}
    return {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}


def load_state(path, *, net: torch.nn.Module, opt: torch.optim.Optimizer, ema: PowerFunctionEMA,
               gen: torch.Generator, settings: Optional[dict] = None, ignore: Sequence[str] = ()) -> dict:
    """Restore a state written by `save_state` into the given objects (and the global torch RNG); returns its JSON
    record. With `settings`, refuses a state from a run with other settings (the `ignore` keys aside)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_state_meta(path)
    if settings is not None:
        diff = settings_diff(meta["config"], settings, ignore)
        if diff:
            raise ValueError(f"cannot resume from {path}: its run used other settings {{name: (saved, now)}}: {diff}. "
                             "Resume with the same arguments as the interrupted run")
    t = load_file(str(path / "state.safetensors"))
    net.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("net.")}, strict=True)
    ema.load_state_dict({"steps": meta["ema_steps"], "stds": list(ema.stds),
                         "averages": {str(s): {k[len(f"ema.{s!r}."):]: v for k, v in t.items()
                                               if k.startswith(f"ema.{s!r}.")} for s in ema.stds}})
    opt.load_state_dict({"state": {int(i): {k: t[f"opt.{i}.{k}"] for k in keys}
                                   for i, keys in meta["opt_keys"].items()},
                         "param_groups": meta["opt_param_groups"]})
    gen.set_state(t["rng.generator"])
    torch.set_rng_state(t["rng.torch"])
    return meta
