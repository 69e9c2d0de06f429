"""Reading what runs wrote: sample folders (`shards/*.npz` of `autoguidance sample`), single `.npz` files, folders
of `.npz` files or of `.png` images, as work units in a fixed order."""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .shards import ShardError, read_shard

__all__ = ["Unit", "collect_units", "load_unit", "PNG_UNIT"]

PNG_UNIT = 1000          # PNG files per work unit


@dataclass(frozen=True)
class Unit:
    """One piece of work: an NPZ shard, or a list of PNG files."""

    kind: str                   # 'npz' or 'png'
    paths: tuple[str, ...]


def collect_units(sources: Sequence[str]) -> list[Unit]:
    """Work units of the sources, in a fixed order (sources as given, files sorted)."""
    units: list[Unit] = []
    for src in sources:
        p = Path(src)
        if p.is_file() and p.suffix == ".npz":
            units.append(Unit("npz", (str(p),)))
            continue
        if not p.is_dir():
            raise FileNotFoundError(f"sample source {src}: not an .npz file nor a folder")
        folder = p / "shards" if (p / "shards").is_dir() else p
        npz = sorted(f for f in folder.glob("*.npz") if not f.name.startswith("."))   # hidden: temporary
        if npz:
            units.extend(Unit("npz", (str(f),)) for f in npz)
            continue
        pngs = sorted(f for f in ((p / "png").glob("*.png") if (p / "png").is_dir() else p.glob("*.png"))
                      if not f.name.startswith("."))
        if not pngs:
            raise FileNotFoundError(f"sample source {src} holds no shards/*.npz, *.npz or *.png files")
        units.extend(Unit("png", tuple(map(str, pngs[a:a + PNG_UNIT]))) for a in range(0, len(pngs), PNG_UNIT))
    if not units:
        raise FileNotFoundError("no sample sources given")
    return units


def _read_png(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            a = np.asarray(im.convert("L") if im.mode in ("L", "I", "I;16", "1") else im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:   # PIL.UnidentifiedImageError is an OSError
        raise ShardError(f"{path} is not a readable image ({e}): remove it or replace it with a PNG") from e
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def load_unit(unit: Unit) -> tuple[torch.Tensor, np.ndarray]:
    """The samples of a unit, `[n, ...]` float32 (PNGs as `[n, C, H, W]` in [-1, 1]), and their class labels
    `[n]` int64 (-1: none or unknown; PNGs and plain NPZ files carry none)."""
    if unit.kind == "npz":
        path = unit.paths[0]
        try:
            with zipfile.ZipFile(path) as zf:
                ours = "sha256.npy" in zf.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise ShardError(f"{path} is not a readable NPZ ({e}): truncated or corrupt; if it is a shard of "
                             "`autoguidance sample`, rerun sample on its folder to redo it") from e
        if ours:
            d = read_shard(path)
            return torch.from_numpy(d["samples"]), d["labels"]
        with np.load(path, allow_pickle=False) as z:   # a plain NPZ of samples (e.g. from another tool)
            key = "samples" if "samples" in z.files else z.files[0]
            x = np.asarray(z[key], dtype=np.float32)
        return torch.from_numpy(x), np.full(len(x), -1, dtype=np.int64)
    imgs = np.stack([_read_png(f) for f in unit.paths]).astype(np.float32)
    return torch.from_numpy(imgs / 127.5 - 1.0), np.full(len(imgs), -1, dtype=np.int64)
