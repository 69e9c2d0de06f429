"""One PNG per seed from a local diffusers pipeline folder under any guidance method (`autoguidance pipe`).

    pipeline_to_folder("sd-folder", "out", seeds=range(8), method="insitu", w=3.0, prompt="a cat")

Layout of `out`: `png/SEED.png` (one image per seed), `grid.png` (every seed's image, row-major, in seed order),
`images.json` (seed -> the run identity and the sha256 of its PNG), `run.json` (the command, the resolved config,
versions, seeds, world size). A rerun skips seeds whose PNG exists, hashes as recorded and carries the run's
identity (a digest of the config: pipeline folder, prompt, method, steps, ...); a folder whose run.json records
another config is refused. The folder is locked while a run writes to it. Under torchrun, seed i goes to rank
i mod world size; rank 0 writes the grid and run.json at the end. Image i depends only on its seed (its own
generator and perturbation keys), so the images do not depend on the batch or the process count.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..runs import dist
from ..runs.files import clean_temp, write_json
from ..runs.lock import lock_run
from ..runs.record import check_out, check_resume, command_line, identity_of, run_record
from ..runs.shards import write_png

__all__ = ["pipeline_to_folder", "load_pipeline", "NOT_A_PIPELINE"]

NOT_A_PIPELINE = ("{dir} is not a diffusers pipeline folder (no model_index.json): give a folder written by "
                  "pipe.save_pretrained(DIR), or fetch one first (huggingface-cli download REPO --local-dir DIR)")


def load_pipeline(folder, device="cpu", dtype: Optional[str] = None):
    """`DiffusionPipeline.from_pretrained(folder, local_files_only=True)` (never a download), on `device`."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ValueError(NOT_A_PIPELINE.format(dir=folder))
    try:
        from diffusers import DiffusionPipeline
    except ImportError as e:
        raise ImportError("autoguidance pipe needs diffusers: pip install autoguidance[diffusers]") from e
    kw = {"torch_dtype": getattr(torch, dtype)} if dtype else {}
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _folder_digest(folder: Path) -> str:
    """What identifies a pipeline folder cheaply: model_index.json and every file's relative path and size."""
    h = hashlib.sha256((folder / "model_index.json").read_bytes())
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            h.update(f"{p.relative_to(folder)}:{p.stat().st_size}\n".encode())
    return h.hexdigest()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _grid(images: list) -> np.ndarray:
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w, c = images[0].shape
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    return grid


def pipeline_to_folder(folder, out, seeds: Sequence[int], *,
                       method:          str = "none",          # a key of pipeline.PIPELINE_METHODS
                       w:               Optional[float] = None,
                       p:               float = 0.1,
                       where:           Optional[str] = None,
                       perturbation:    Optional[str] = None,  # a name of methods.PERTURBATIONS (method perturbation)
                       guide:           Optional[str] = None,  # a local model folder (method autoguidance)
                       interval:        Optional[tuple] = None,
                       cfg_interval:    Optional[tuple] = None,
                       prompt:          Optional[str] = None,
                       negative_prompt: Optional[str] = None,
                       class_label:     Optional[int] = None,  # class-conditional pipelines (DiT)
                       guidance_scale:  Optional[float] = None,
                       steps:           int = 28,
                       height:          Optional[int] = None,
                       width:           Optional[int] = None,
                       batch:           int = 4,
                       device:          Optional[str] = None,
                       dtype:           Optional[str] = None,
                       progress:        bool = True,
                       args:            Optional[argparse.Namespace] = None) -> dict:
    """Write one PNG per seed of this rank, then (rank 0) the grid and run.json; returns `{'done', 'skipped',
    'images', 'seconds'}` of this rank. Call `dist.init()` first under torchrun."""
    import tqdm

    from ..methods import make_perturbation
    from .pipeline import guided_pipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ValueError(NOT_A_PIPELINE.format(dir=folder))
    out = check_out(out)
    seeds = [int(s) for s in seeds]
    if batch < 1:
        raise ValueError(f"--batch must be a positive number of images per pipeline call, got {batch}")
    config = {"pipeline": str(folder.resolve()), "pipeline_digest": _folder_digest(folder), "method": method,
              "w": w, "p": p, "where": where, "perturbation": perturbation, "guide": guide,
              "interval": list(interval) if interval else None,
              "cfg_interval": list(cfg_interval) if cfg_interval else None, "prompt": prompt,
              "negative_prompt": negative_prompt, "class_label": class_label, "guidance_scale": guidance_scale,
              "steps": steps, "height": height, "width": width, "dtype": dtype}
    identity = identity_of(config)
    dev = dist.device(device)
    pipe = load_pipeline(folder, dev, dtype)
    options = dict(w=w, interval=interval, cfg_interval=cfg_interval)
    if method == "insitu":
        options.update(p=p, where=where)
    elif method == "perturbation":
        options["perturbation"] = make_perturbation(perturbation or "dropout", p, where)
    elif method == "autoguidance":
        if not guide:
            raise ValueError("method autoguidance needs --guide DIR (a local model folder of the same kind as the "
                             "pipeline's unet / transformer)")
        from .pipeline import pipeline_model

        _, model = pipeline_model(pipe)
        options["guide"] = type(model).from_pretrained(guide, local_files_only=True).eval().requires_grad_(False)
    options = {k: v for k, v in options.items() if v is not None}
    call = {"num_inference_steps": int(steps), "output_type": "np"}
    for k, v in (("guidance_scale", guidance_scale), ("height", height), ("width", width),
                 ("negative_prompt", negative_prompt)):
        if v is not None:
            call[k] = v
    with lock_run(out, command_line(args) if args is not None else None):
        if dist.is_main():
            for f in (out, out / "png"):
                clean_temp(f)
        check_resume(out, config, seeds)
        dist.barrier()
        if dist.is_main():
            write_json(out / "run.json", run_record(config, seeds, args, status="running", identity=identity))
        dist.barrier()
        r, world = dist.rank(), dist.world_size()
        mine = [s for i, s in enumerate(seeds) if i % world == r]
        index_path = out / "images.json"
        try:
            index = json.loads(index_path.read_text()) if index_path.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            index = {}
        index = index if isinstance(index, dict) else {}
        for part in sorted(out.glob("images.rank*.json")):    # left by a killed multi-process run
            try:
                index.update(json.loads(part.read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                pass
        dist.barrier()
        if dist.is_main():
            for part in out.glob("images.rank*.json"):
                part.unlink()
            write_json(index_path, index)

        def done(s):
            png = out / "png" / f"{s:06d}.png"
            rec = index.get(str(s))
            return png.exists() and isinstance(rec, dict) and rec.get("identity") == identity \
                and rec.get("sha256") == _sha(png)

        todo = [s for s in mine if not done(s)]
        skipped = len(mine) - len(todo)
        bar = tqdm.tqdm(total=len(mine), initial=skipped, unit="img", disable=not (progress and r == 0),
                        desc=f"{method} (rank 0 of {world})")
        t0 = time.perf_counter()
        mine_index = {}
        with guided_pipeline(pipe, method, **options) as gp:
            for a in range(0, len(todo), batch):
                chunk = todo[a:a + batch]
                gp.seeds = torch.tensor(chunk, dtype=torch.int64)
                gens = [torch.Generator(dev).manual_seed(s) for s in chunk]
                kw = dict(call, generator=gens)
                if class_label is not None:
                    images = pipe(class_labels=[int(class_label)] * len(chunk), **kw).images
                else:
                    if prompt is None:
                        raise ValueError("--prompt is needed for a text-to-image pipeline (--class-label for a "
                                         "class-conditional one)")
                    images = pipe([prompt] * len(chunk), **kw).images
                for s, img in zip(chunk, np.asarray(images)):
                    png = out / "png" / f"{s:06d}.png"
                    write_png(png, np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8))
                    mine_index[str(s)] = {"identity": identity, "sha256": _sha(png)}
                if world == 1:
                    index.update(mine_index)
                    write_json(index_path, index)
                else:
                    write_json(out / f"images.rank{r}.json", mine_index)
                bar.update(len(chunk))
        bar.close()
        seconds = time.perf_counter() - t0
        dist.barrier()
        if dist.is_main():
            for q in range(1, world):
                part = out / f"images.rank{q}.json"
                if part.exists():
                    index.update(json.loads(part.read_text()))
                    part.unlink()
            index.update(mine_index)
            write_json(index_path, index)
            from PIL import Image

            imgs = [np.asarray(Image.open(out / "png" / f"{s:06d}.png").convert("RGB")) for s in seeds]
            write_png(out / "grid.png", _grid(imgs))
            write_json(out / "run.json", run_record(config, seeds, args, status="complete", identity=identity,
                                                    images_made=len(todo), images_skipped=skipped,
                                                    seconds_rank0=round(seconds, 3)))
        dist.barrier()
    return {"done": len(todo), "skipped": skipped, "images": len(todo), "seconds": seconds}
