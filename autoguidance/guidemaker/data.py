"""The inputs a recipe trains on: the user's images or latents when given, else the main's own samples.

    pool = load_data("path/to/folder", main)        # or a library dataset name: digits, mnist14, fashion28
    pool = sample_pool(main, n, steps, ...)         # data-free: the main's own samples, per-image seeds

A **data folder** holds `*.npy` / `*.npz` arrays `[N, C, H, W]` in the main's input space (images in [-1, 1] for
the library's pixel nets; latents as the pipeline makes them, VAE scaling included, for latent models), an `.npz`
under the key `images`, `latents` or `x`, with optional integer `labels` `[N]`; or `*.png` images (8-bit, grey or
RGB, for pixel nets; `[0, 255] -> [-1, 1]`), class `k` in a subfolder named `k`. Shapes must equal the main's:
nothing is resized or guessed. Files are read in sorted order.

**Conditioning rows** ride with the inputs: class labels (one-hot for the library's nets, `class_labels` indices for
diffusers models), text conditioning from `--prompts` (prompt `i mod P` for sample `i`), or none. Unlabelled data for a
class-conditional main gets uniformly drawn classes only where the recipe matches the main's predictions (distill);
recipes that train on the data's own loss refuse it.

A pool of the main's samples is made once per guide folder (`OUT/inputs/`, safetensors, with the settings that
made it), split over the ranks by seed and gathered, so a resumed or re-launched run reads it back.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..denoiser import take_rows
from ..runs import dist
from ..runs.files import atomic_path, write_json

__all__ = ["Pool", "load_data", "read_prompts", "sample_pool", "conditioning_for", "DATASET_NAMES"]

DATASET_NAMES = ("digits", "mnist14", "fashion28")


@dataclass
class Pool:
    """Training inputs `x [N, *shape]` with aligned conditioning rows `cond` (None, a tensor, or a mapping of
    batch-first tensors) and the model's non-batch keyword arguments `const`."""

    x: torch.Tensor
    cond: Any = None
    const: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)     # what the inputs are (recorded in the guide's record)
    labelled: bool = True                          # the rows' classes are the data's own (False: drawn)

    def __len__(self) -> int:
        return len(self.x)

    def rows(self, idx: torch.Tensor):
        return self.x[idx], (take_rows(self.cond, idx) if self.cond is not None else None)


def read_prompts(path) -> list[str]:
    """Non-empty lines of a text file (one prompt a line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file (one prompt a line)")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompt (one prompt a line)")
    return prompts


def _arrays(folder: Path) -> tuple[list[np.ndarray], list[Optional[np.ndarray]]]:
    xs, ys = [], []
    for f in sorted(folder.iterdir()):
        if f.suffix == ".npy":
            xs.append(np.load(f, allow_pickle=False))
            ys.append(None)
        elif f.suffix == ".npz":
            with np.load(f, allow_pickle=False) as z:
                key = next((k for k in ("images", "latents", "x") if k in z.files), None)
                if key is None:
                    raise ValueError(f"{f} holds none of the arrays images, latents, x (it has {', '.join(z.files)})")
                xs.append(z[key])
                ys.append(z["labels"] if "labels" in z.files else None)
    return xs, ys


def _pngs(folder: Path, channels: int) -> tuple[list[np.ndarray], list[int]]:
    from PIL import Image

    files = sorted(folder.rglob("*.png"))
    xs, ys = [], []
    for f in files:
        rel = f.relative_to(folder).parts
        img = Image.open(f)
        img = img.convert("L" if channels == 1 else "RGB")
        a = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        xs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        ys.append(int(rel[0]) if len(rel) > 1 and rel[0].isdigit() else -1)
    return xs, ys


def load_data(source, main, *, prompts: Optional[list] = None, need_labels: bool = False,
              gen: Optional[torch.Generator] = None) -> Pool:
    """The pool of a data folder or library dataset name for `main` (see the module docstring)."""
    from .mains_diffusers import DiffusersMain

    name = str(source)
    labels = None
    if name in DATASET_NAMES and not Path(name).exists():
        if main.kind != "edm2":
            raise ValueError(f"--data {name} is a library image set for the library's pixel nets; a diffusers main "
                             "takes a folder of latents")
        from ..train.edm import load_dataset

        d = load_dataset(name)
        x, labels = d.images, d.classes
        src = {"kind": "data", "dataset": name, "n": len(x)}
    else:
        folder = Path(name)
        if not folder.is_dir():
            raise FileNotFoundError(f"--data {folder}: no such folder (images or latents as .npy/.npz/.png), nor a "
                                    f"library image set ({', '.join(DATASET_NAMES)})")
        xs, ys = _arrays(folder)
        if not xs:
            if isinstance(main, DiffusersMain):
                raise ValueError(f"--data {folder} has no .npy/.npz latents: a latent model trains on latents [N, C, "
                                 "H, W] as its pipeline makes them (PNG images would need its VAE)")
            pngs, classes = _pngs(folder, main.sample_shape()[0])
            if not pngs:
                raise ValueError(f"--data {folder} holds no .npy, .npz or .png files")
            shapes = {a.shape for a in pngs}
            if len(shapes) > 1:
                raise ValueError(f"--data {folder}: the PNG images have different sizes {sorted(shapes)}")
            xs = [np.stack(pngs)]
            ys = [np.asarray(classes)] if all(c >= 0 for c in classes) else [None]
        if any(a.ndim < 2 for a in xs) or len({a.shape[1:] for a in xs}) > 1:
            raise ValueError(f"--data {folder}: every array must be [N, ...] with the same sample shape, got "
                             f"{sorted({a.shape for a in xs})}")
        x = torch.from_numpy(np.concatenate(xs).astype(np.float32))
        if all(y is not None for y in ys):
            labels = torch.from_numpy(np.concatenate([np.asarray(y).reshape(-1) for y in ys]).astype(np.int64))
        src = {"kind": "data", "folder": str(folder.resolve()), "n": len(x)}
    want = None
    try:
        want = main.sample_shape()
    except ValueError:
        pass   # packed / video latents: the data's shape is the shape
    if want is not None and list(x.shape[1:]) != list(want):
        raise ValueError(f"--data {name}: samples of shape {list(x.shape[1:])}, the main takes {want}: give data at "
                         "the main's resolution and channels (nothing is resized)")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"--data {name} holds non-finite values")
    cond, const, labelled = _data_cond(main, len(x), labels, prompts, need_labels, gen, name)
    return Pool(x, cond, const, src, labelled)


def _data_cond(main, n: int, labels, prompts, need_labels: bool, gen, name: str) -> tuple:
    """`(cond rows, const, labelled)` for `n` data samples with `labels` `[n]` or None (see the module docstring)."""
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    kind = "class" if main.kind == "edm2" and int(main.net.config["label_dim"]) else (
        "none" if main.kind == "edm2" else main.conditioning_kind())
    if kind == "none":
        return None, {}, True
    if kind == "class":
        if labels is None:
            if need_labels:
                raise ValueError(f"--data {name} has no labels, and this recipe trains the class-conditional main's "
                                 "own loss on it: add labels [N] to the .npz, or PNGs in class subfolders 0..K-1")
            return main.draw_cond(n, gen), {}, False
        if main.kind != "edm2":
            return {"class_labels": labels}, {}, True
        dim = int(main.net.config["label_dim"])
        if labels.min() < 0 or labels.max() >= dim:
            raise ValueError(f"--data {name}: labels must be classes 0..{dim - 1}, got {int(labels.min())}.."
                             f"{int(labels.max())}")
        return torch.nn.functional.one_hot(labels, dim).to(torch.float32), {}, True
    if prompts is None:
        raise ValueError(f"a text-conditioned {main.family()} main needs --prompts FILE (one prompt a line) for its "
                         "conditioning")
    if need_labels:
        raise ValueError("this recipe trains the main's own loss on the data, which needs each latent's caption; "
                         "--data latents carry none: drop --data (the recipe then trains on the main's samples from "
                         "--prompts)")
    rows, const = main.prompt_conditioning(prompts)
    pick = torch.randint(len(prompts), (n,), generator=gen)
    return take_rows(rows, pick), const, False


def conditioning_for(main, n: int, prompts, gen):
    """Conditioning rows and constants of `n` data-free samples."""
    if main.kind != "edm2" and main.conditioning_kind() == "text":
        if prompts is None:
            raise ValueError(f"a text-conditioned {main.family()} main needs --prompts FILE (one prompt a line)")
        rows, const = main.prompt_conditioning(prompts)
        return take_rows(rows, torch.arange(n) % len(prompts)), const
    return main.draw_cond(n, gen), {}


def _flatten(prefix: str, obj, out: dict) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}", v, out)
    elif isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().contiguous().cpu()


def _unflatten(tensors: dict, prefix: str):
    if prefix in tensors:
        return tensors[prefix]
    out: dict = {}
    for k, v in tensors.items():
        if not k.startswith(prefix + "."):
            continue
        node = out
        parts = k[len(prefix) + 1:].split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out or None


def sample_pool(main, n: int, *, steps: int, seed: int, folder: Optional[Path], prompts=None, device="cpu",
                identity: Optional[dict] = None) -> Pool:
    """`n` samples of `main` from seeds `seed * 10^6 + [0, n)` (`steps` sampler steps), with their conditioning;
    read back from `folder` (`inputs.safetensors` + `inputs.json`) when it holds the same pool."""
    from safetensors.torch import load_file, save_file

    record = {"kind": "samples", "n": int(n), "steps": int(steps), "seed": int(seed), "sampler": main.sampler_name(),
              "main": main.digest, **(identity or {})}
    if folder is not None and (folder / "inputs.json").is_file():
        try:
            if json.loads((folder / "inputs.json").read_text()) == record:
                t = load_file(str(folder / "inputs.safetensors"))
                return Pool(t["x"], _unflatten(t, "cond"), _unflatten(t, "const") or {}, record, True)
        except (OSError, ValueError):
            pass       # a damaged pool is drawn again
    gen = torch.Generator().manual_seed(seed)
    cond, const = conditioning_for(main, n, prompts, gen)
    seeds = seed * 1_000_000 + torch.arange(n, dtype=torch.int64)
    mine = torch.arange(dist.rank(), n, dist.world_size())
    x_mine = main.sample(seeds[mine], take_rows(cond, mine) if cond is not None else None, const, steps=steps,
                         device=device).to("cpu", torch.float32)
    order = dist.all_gather_rows(mine)
    x_all = dist.all_gather_rows(x_mine)
    x = torch.empty_like(x_all)
    x[order] = x_all
    if folder is not None and dist.is_main():
        tensors = {"x": x}
        _flatten("cond", cond, tensors)
        _flatten("const", const, tensors)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "inputs.safetensors") as tmp:
            save_file(tensors, str(tmp))
        write_json(folder / "inputs.json", record)
    dist.barrier()
    return Pool(x, cond, const, record, True)
