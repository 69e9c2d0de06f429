"""Checkpoints: a folder with `model.safetensors` (tensors only) and `config.json` (family, constructor
settings, provenance). Loading never executes code from the checkpoint: tensors come from safetensors, the
network is built by this library's own constructor for the named family.

    autoguidance.load("toy-logp-main")       # a shipped checkpoint, by name (see `shipped()`)
    autoguidance.load("runs/my-model")       # a folder written by `save` or `autoguidance toy train`
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from .nets import FAMILIES as _BUILTIN_FAMILIES
from .runs.files import atomic_path, current_umask, file_sha256, write_json

__all__ = ["save", "save_into", "load", "is_diffusers_folder", "load_config", "shipped", "register_family", "digest", "add_checksum",
           "WEIGHTS_DIR", "CheckpointError"]

FORMAT = "autoguidance-checkpoint"
VERSION = 1
WEIGHTS_DIR = Path(__file__).parent / "weights"
_FAMILIES: dict[str, Callable[..., torch.nn.Module]] = dict(_BUILTIN_FAMILIES)


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match its config."""


def register_family(name: str, constructor: Callable[..., torch.nn.Module]) -> None:
    """Make `load` able to build networks of family `name` from their JSON config."""
    _FAMILIES[name] = constructor


def _constructor(family: str):
    if family not in _FAMILIES:
        raise CheckpointError(f"unknown network family {family!r}; known: {sorted(_FAMILIES)}. "
                              "Register it with autoguidance.checkpoint.register_family(name, constructor)")
    return _FAMILIES[family]


def shipped() -> dict[str, dict]:
    """The manifest of checkpoints shipped in the package: name -> record (path, command, notes)."""
    manifest = WEIGHTS_DIR / "manifest.json"
    if not manifest.exists():
        return {}
    return json.loads(manifest.read_text())["checkpoints"]


def _resolve(name_or_path) -> Path:
    p = Path(name_or_path)
    if p.is_dir():
        return p
    names = shipped()
    if str(name_or_path) in names:
        return WEIGHTS_DIR / names[str(name_or_path)]["path"]
    close = difflib.get_close_matches(str(name_or_path), list(names), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise FileNotFoundError(f"no checkpoint {str(name_or_path)!r}: not a folder, nor a shipped name.{hint} "
                            f"Shipped: {', '.join(sorted(names)) or '(none)'}. A checkpoint folder holds "
                            "model.safetensors and config.json.")


_DIGESTS: dict = {}


def digest(name_or_path) -> str:
    """A checkpoint's identity: sha256 over its config.json and model.safetensors bytes (a diffusers model
    folder: config.json and its .safetensors files; cached per process by path, size and modification time).
    Runs record it, so a changed checkpoint never reuses old results."""
    path = _resolve(name_or_path)
    files = [path / "config.json", path / "model.safetensors"]
    if is_diffusers_folder(path):   # a diffusers model folder: its config and every safetensors file
        files = [path / "config.json", *sorted(path.glob("*.safetensors"))]
    key = tuple((str(f.resolve()), *(lambda st: (st.st_size, st.st_mtime_ns))(f.stat())) if f.exists() else
                (str(f), None) for f in files)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        for f in files:
            h.update((file_sha256(f) if f.is_file() else "-").encode())
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def add_checksum(name_or_path) -> bool:
    """Record the sha256 of a checkpoint's model.safetensors in its config.json (`"sha256"`), leaving the tensor
    file untouched; returns False if it was already there and right. (scripts/add_checkpoint_checksums.py)"""
    path = _resolve(name_or_path)
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    sha = file_sha256(path / "model.safetensors")
    if cfg.get("sha256") == sha:
        return False
    cfg["sha256"] = sha
    write_json(cfg_file, cfg)
    return True


def _family_config(model: torch.nn.Module) -> tuple[str, dict]:
    family = getattr(model, "family", None)
    config = getattr(model, "config", None)
    if family is None or config is None:
        raise TypeError("save() needs a network with .family and .config attributes (the library's nets have them)")
    return family, config


def _write_files(model: torch.nn.Module, folder: Path, meta: dict | None) -> None:
    """`model.safetensors`, then `config.json` (with the weights' sha256) into `folder`, each file atomically."""
    from safetensors.torch import save_file

    family, config = _family_config(model)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(tensors, str(tmp))
    write_json(folder / "config.json", {"format": FORMAT, "version": VERSION, "family": family, "config": config,
                                        "meta": meta or {}, "sha256": file_sha256(folder / "model.safetensors")})


def save(model: torch.nn.Module, path, meta: dict | None = None) -> Path:
    """Write `model` (which must have `.family` and `.config`) to the folder `path`, atomically: the folder is
    built beside and renamed into place (an existing folder of that name is replaced)."""
    _family_config(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; give the folder the permissions mkdir would
    try:
        _write_files(model, tmp, meta)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def save_into(model: torch.nn.Module, folder, meta: dict | None = None) -> Path:
    """Write `model` as a checkpoint into the existing folder `folder`, keeping its other files (a run's record,
    its states, its lock): `model.safetensors`, then `config.json` last, each replaced atomically. A reader sees
    the old checkpoint or the new one's tensors with a config naming their sha256 (checked on load)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_files(model, folder, meta)
    return folder


def load_config(name_or_path) -> dict:
    path = _resolve(name_or_path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path} has no config.json: not an autoguidance checkpoint folder")
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} is not a file: not an autoguidance checkpoint folder")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e}); the checkpoint is corrupt, save it again") from e
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or "family" not in cfg \
            or not isinstance(cfg.get("config"), dict):
        raise CheckpointError(f"{cfg_file} is not an {FORMAT} config (needs 'format', 'family', 'config')")
    return cfg


def is_diffusers_folder(path) -> bool:
    """True for a diffusers model folder (`save_pretrained`): a config.json naming a `_class_name`."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return isinstance(json.loads(cfg.read_text()).get("_class_name"), str)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def _load_diffusers(path: Path, device) -> torch.nn.Module:
    """A diffusers model folder (e.g. a guide `autoguidance make-guide` wrote for a diffusers main) through its
    class's `from_pretrained`, from safetensors only (no pickle) and local files only."""
    name = json.loads((path / "config.json").read_text())["_class_name"]
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(f"{path} is a diffusers model folder ({name}): loading it needs diffusers "
                          "(pip install autoguidance[diffusers])") from e
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise CheckpointError(f"{path / 'config.json'} names {name!r}, which this diffusers version does not have")
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(f"{path} holds no .safetensors weights: only safetensors are loaded (a .bin file is a "
                              "pickle); save the model with save_pretrained(safe_serialization=True)")
    model = cls.from_pretrained(str(path), use_safetensors=True, local_files_only=True)
    return model.to(device).eval().requires_grad_(False)


def load(name_or_path, device="cpu") -> torch.nn.Module:
    """Build the network of a shipped or saved checkpoint and load its weights. Returns an eval-mode denoiser
    module with gradients off. Raises FileNotFoundError / CheckpointError with the fix when anything is off.
    A diffusers model folder (config.json with `_class_name`) loads through diffusers (safetensors only) and comes
    back as that diffusers model, eval mode, gradients off (e.g. the `guide=` of `guided_pipeline`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _resolve(name_or_path)
    if is_diffusers_folder(path):
        return _load_diffusers(path, device)
    cfg = load_config(path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path} has config.json but no model.safetensors file")
    if cfg.get("sha256") is not None and file_sha256(weights) != cfg["sha256"]:
        raise CheckpointError(f"{weights}: sha256 differs from the one in config.json: the tensor data is corrupt or truncated; "
                              "restore or save the checkpoint again")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} cannot be read ({e}); the file is corrupt or truncated, save it again") from e
    try:
        model = _constructor(cfg["family"])(**cfg["config"])
    except CheckpointError:
        raise
    except Exception as e:  # a constructor rejecting the settings (width -1, unknown keys, wrong types)
        raise CheckpointError(f"{path / 'config.json'}: cannot build a {cfg['family']} network from its config "
                              f"({type(e).__name__}: {e}); the config is corrupt, save the checkpoint again") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights} does not match its config.json ({cfg['family']} {cfg['config']}): {e}") from e
    model.checkpoint_meta = cfg.get("meta", {})
    return model.to(device).eval().requires_grad_(False)
