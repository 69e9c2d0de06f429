"""Import official NVlabs/edm2 networks into this library's checkpoint format (safetensors + JSON config).

    autoguidance import-edm2 net.safetensors --config net.json --out ckpt/s-fid     # a state dict + its settings
    autoguidance import-edm2 net.pt --config edm2-img512-s --out ckpt/s-fid        # settings of a named size
    autoguidance import-edm2 net.pkl --trust-pickle --edm2-repo ~/src/edm2 --out ckpt/s-fid

then `autoguidance.load("ckpt/s-fid")` returns the EDM2 denoiser (`autoguidance.nets.edm2.EDM2Precond`), whose
state-dict layout is the official one.

Sources, safest first:
- a **safetensors** file of the official state dict (tensors only, nothing executes);
- a **`.pt`** file written by `torch.save(net.state_dict(), ...)`, read with `torch.load(weights_only=True)`,
  which refuses anything but tensors and plain containers;
- an official **`.pkl`** network file. Unpickling it executes code: EDM2's `torch_utils.persistence` stores each
  network class's source code inside the pickle and runs it on load. It is refused unless you pass
  `--trust-pickle` and `--edm2-repo PATH` (your own checkout of NVlabs/edm2, put on `sys.path` for that one load
  only). Without the flag the file is never opened.

`--config` holds the constructor settings, named as the official `training.networks_edm2.Precond` takes them
(`img_resolution`, `img_channels`, `label_dim`, `model_channels`, `channel_mult`, `num_blocks`,
`attn_resolutions`, `dropout`, `channels_per_head`, ..., `use_fp16`, `sigma_data`, `logvar_channels`); a pickled
network supplies its own (`init_kwargs`).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import pickle
import sys
from pathlib import Path
from typing import Optional, Union

import torch

__all__ = ["import_edm2", "read_state_dict", "read_config", "load_trusted_pickle", "PickleRefused",
           "PICKLE_SUFFIXES"]

PICKLE_SUFFIXES = (".pkl", ".pickle")
_WHY = ("Unpickling an official EDM2 network file runs code stored inside it (EDM2's torch_utils.persistence saves "
        "each network class's source and executes it on load), so autoguidance never opens it unless you say so.")
_INSTEAD = (
    "Either\n"
    "  (a) convert it yourself with your checkout of NVlabs/edm2, then import the tensors:\n"
    "        python -c \"import pickle, json, torch; net = pickle.load(open('{name}', 'rb'))['ema']; "
    "torch.save(net.state_dict(), 'net.pt'); json.dump(dict(net.init_kwargs), open('net.json', 'w'))\"\n"
    "        autoguidance import-edm2 net.pt --config net.json --out DIR\n"
    "  (b) or, if you trust the file and its origin, let autoguidance unpickle it with your checkout's code:\n"
    "        autoguidance import-edm2 {name} --trust-pickle --edm2-repo PATH/TO/edm2 --out DIR")


def _refusal(src: Path, what: str) -> str:
    return f"{src} {what}. {_WHY} {_INSTEAD.format(name=src.name)}"


class PickleRefused(ValueError):
    """A pickle was given without `trust_pickle=True`; the message says why and what to do instead."""


def _constructor_keys() -> list[str]:
    from ..nets.edm2 import EDM2Precond
    return [k for k in inspect.signature(EDM2Precond.__init__).parameters if k != "self"]


def _plain(v):
    """JSON-friendly copy of a constructor value (tuples -> lists, numpy / torch scalars -> Python numbers)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:
        return v.item()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise ValueError(f"constructor setting of type {type(v).__name__} cannot be stored as JSON: {v!r}")


def _check_config(cfg: dict, where: str) -> dict:
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: the config must be a JSON object of constructor settings, got "
                         f"{type(cfg).__name__}")
    cfg = {k: _plain(v) for k, v in cfg.items()}
    cfg.pop("class_name", None)  # EDM2's network_kwargs name the class; it is always Precond here
    known = _constructor_keys()
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown} for the EDM2 preconditioned network; known: "
                         f"{', '.join(known)}")
    missing = [k for k in ("img_resolution", "img_channels", "label_dim") if k not in cfg]
    if missing:
        raise ValueError(f"{where}: missing required setting(s) {missing} (e.g. img_resolution 64, img_channels 4, "
                         "label_dim 1000 for the ImageNet-512 latent models; label_dim 0 = unconditional)")
    return cfg


def _raw_config(config: Union[str, Path, dict]) -> dict:
    from ..nets.edm2 import PRESETS as ARCHS, preset_config

    if isinstance(config, dict):
        return dict(config)
    path = Path(config)
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {path} is not valid JSON ({e})") from e
        if not isinstance(cfg, dict):
            raise ValueError(f"--config {path} must hold a JSON object of constructor settings, got "
                             f"{type(cfg).__name__}")
        return cfg
    if str(config) in ARCHS:
        return preset_config(str(config))
    raise FileNotFoundError(f"--config {config!r} is neither a JSON file nor an EDM2 architecture name "
                            f"({', '.join(ARCHS)})")


def read_config(config: Union[str, Path, dict]) -> dict:
    """Constructor settings from a dict, a JSON file, or the name of an architecture in
    `autoguidance.nets.edm2.PRESETS` (e.g. 'edm2-img512-s'); validated against `EDM2Precond`'s signature."""
    return _check_config(_raw_config(config), f"--config {config}" if not isinstance(config, dict) else "config")


def _unwrap_state(obj, src: Path) -> dict:
    """A flat {name: tensor} state dict, also when saved under 'ema' / 'state_dict' / 'net' / 'model'."""
    if isinstance(obj, dict) and obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("ema", "state_dict", "net", "model"):
            if isinstance(obj.get(key), dict):
                return _unwrap_state(obj[key], src)
        raise ValueError(f"{src} holds a dict with keys {sorted(map(str, obj))[:8]}, not a state dict of tensors; "
                         "save net.state_dict() (or a dict with it under 'ema' or 'state_dict')")
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{src} holds a {type(obj).__name__}, not a state dict of tensors")
    return dict(obj)


def read_state_dict(src: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Tensors of an official state dict from a `.safetensors` file or a `.pt` file (`weights_only=True`).
    Pickles (`.pkl`) are refused with `PickleRefused`: use `load_trusted_pickle`."""
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"no such file: {src}")
    if src.suffix.lower() in PICKLE_SUFFIXES:
        raise PickleRefused(_refusal(src, "is a Python pickle"))
    with open(src, "rb") as f:
        head = f.read(16)
    if src.suffix.lower() == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(src))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{src} cannot be read as safetensors ({e}); the file is corrupt or not safetensors") \
                from e
    try:
        obj = torch.load(str(src), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PickleRefused(_refusal(src, f"holds more than tensors, so torch.load(weights_only=True) refused it "
                                          f"({first}); it is probably a pickled network object")) from e
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{src} cannot be read by torch.load ({e}); give a safetensors or torch.save file") from e
    return _unwrap_state(obj, src)


def _looks_like_edm2_checkout(repo: Path) -> bool:
    return (repo / "torch_utils").is_dir() and (repo / "dnnlib").is_dir() and (repo / "training").is_dir()


def load_trusted_pickle(src: Union[str, Path], edm2_repo: Union[str, Path]) -> tuple[dict, Optional[dict], dict]:
    """Unpickle an official EDM2 network file with the code of the user's own NVlabs/edm2 checkout.

    THIS EXECUTES CODE FROM THE FILE: call it only for files you trust. `edm2_repo` goes on `sys.path` for this
    load only, and the modules imported from it are unloaded afterwards. Returns `(state_dict, init_kwargs or
    None, info)` of the pickle's 'ema' network (or of the pickle itself when it is a network)."""
    src, repo = Path(src), Path(edm2_repo).expanduser().resolve()
    if not src.is_file():
        raise FileNotFoundError(f"no such file: {src}")
    if not repo.is_dir() or not _looks_like_edm2_checkout(repo):
        raise FileNotFoundError(f"--edm2-repo {repo} is not a checkout of NVlabs/edm2 (it needs dnnlib/, torch_utils/ "
                                "and training/): clone the official repository and pass its folder")
    before = set(sys.modules)
    sys.path.insert(0, str(repo))
    try:
        with open(src, "rb") as f:
            data = pickle.load(f)  # noqa: S301 - explicitly trusted by the caller (--trust-pickle)
        net = data.get("ema") if isinstance(data, dict) else data
        if not isinstance(net, torch.nn.Module):
            keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{src} holds no network under 'ema' (found {keys}); expected an EDM2 network pickle")
        state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        try:
            kwargs = net.init_kwargs
        except (AttributeError, AssertionError):
            kwargs = None
        init_args = getattr(net, "_init_args", None)
        if init_args:
            raise ValueError(f"{src}: the network was built with positional arguments {init_args!r}; "
                             "give its settings with --config")
        kwargs = dict(kwargs) if kwargs is not None else None
        info = {"class": f"{type(net).__module__}.{type(net).__qualname__}"}
        encoder = data.get("encoder") if isinstance(data, dict) else None
        if encoder is not None:
            info["encoder"] = type(encoder).__name__
    finally:
        try:
            sys.path.remove(str(repo))
        except ValueError:
            pass
        for name in set(sys.modules) - before:
            mod = sys.modules.get(name)
            file = getattr(mod, "__file__", None) or ""
            if name.startswith("_imported_module_") or (file and Path(file).resolve().is_relative_to(repo)):
                del sys.modules[name]
    return state, kwargs, info


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_edm2(src: Union[str, Path], out: Union[str, Path], *, config: Union[str, Path, dict, None] = None,
                trust_pickle: bool = False, edm2_repo: Union[str, Path, None] = None, overwrite: bool = False,
                meta: Optional[dict] = None) -> Path:
    """Write the official EDM2 network in `src` to the checkpoint folder `out` (model.safetensors + config.json).

    `config`: constructor settings (dict, JSON file or architecture name); required for state-dict files,
    optional for a trusted pickle (its `init_kwargs`; values given here override them). A `.pkl` is refused
    unless `trust_pickle=True` and `edm2_repo` is your checkout of NVlabs/edm2. The state dict must match the
    settings exactly (strict load). Returns `out`; `autoguidance.load(out)` gives the denoiser."""
    from ..checkpoint import save
    from ..nets.edm2 import EDM2Precond

    src, out = Path(src), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ValueError(f"--out {out} exists and is not empty; choose another folder or pass --force")
        if out.is_dir() and not (out / "config.json").is_file():
            raise ValueError(f"--out {out} is a non-empty folder that is not an autoguidance checkpoint; "
                                  "refusing to replace it even with --force")
    info: dict = {}
    if src.suffix.lower() in PICKLE_SUFFIXES:
        if not trust_pickle:
            raise PickleRefused(_refusal(src, "is a Python pickle"))
        if edm2_repo is None:
            raise ValueError("--trust-pickle needs --edm2-repo PATH: your own checkout of NVlabs/edm2, whose "
                             "dnnlib and torch_utils the pickle imports")
        if not src.is_file():
            raise FileNotFoundError(f"no such file: {src}")
        state, kwargs, info = load_trusted_pickle(src, edm2_repo)
        if kwargs is None and config is None:
            raise ValueError(f"{src}: the network records no constructor settings (init_kwargs); give them with "
                             "--config")
        cfg = read_config({**(kwargs or {}), **(_raw_config(config) if config is not None else {})})
        fmt = "pickle (trusted)"
    else:
        if trust_pickle or edm2_repo is not None:
            raise ValueError("--trust-pickle and --edm2-repo apply to .pkl files only; this source is read without "
                             "executing anything")
        if config is None:
            raise ValueError(f"{src} holds tensors only: give the network's constructor settings with --config "
                             "(a JSON file, or an architecture name such as edm2-img512-s)")
        state = read_state_dict(src)
        cfg = read_config(config)
        fmt = "safetensors" if src.suffix.lower() == ".safetensors" else "torch (weights_only)"

    try:
        model = EDM2Precond(**cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the settings {cfg} do not build an EDM2 network: {e}") from e
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    shapes = sorted(k for k in set(ours) & set(state) if tuple(ours[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} of another shape (e.g. {k}: file {list(state[k].shape)}, settings "
                         f"{list(ours[k].shape)})")
        raise ValueError(f"the tensors of {src} do not fit the settings {cfg}: {'; '.join(parts)}. Check --config "
                         "(model_channels, channel_mult, num_blocks, attn_resolutions, label_dim: 0 for an "
                         "unconditional net)")
    model.load_state_dict(state, strict=True)
    record = {"imported_from": "NVlabs/edm2 network", "source": src.name, "source_sha256": _sha256(src),
              "source_format": fmt, **info, **(meta or {})}
    return save(model, out, meta=record)
