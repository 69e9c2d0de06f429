"""One PNG per seed from a local diffusers pipeline folder under any guidance method (`autoguidance pipe`).

    pipeline_to_folder("sd-folder", "out", seeds=range(8), method="insitu", w=3.0, prompt="a cat")

Layout of `out`: `png/SEED.png` (one image per seed), `grid.png` (every seed's image, row-major, in seed order),
`images.json` (seed -> the run identity, the sha256 of its PNG file and of its pixels), `run.json` (the command, the
resolved config, versions, seeds, world size). A rerun keeps a seed's PNG only where it decodes to the image
recorded for it (`runs.shards.png_holds`: a missing, truncated, corrupt or other image is made again) and its record
carries the run's identity (a digest of the config: pipeline folder, prompt(s), method, steps, the guidance scales
used, ...); a
folder whose run.json records another config is refused, unless it holds no image yet (a run that failed before
its first image does not lock the folder against the corrected rerun). With a prompt file, seed s gets prompt
`s mod P`. The folder is locked while a run writes to it. Under torchrun, seed i goes to rank
i mod world size; rank 0 writes the grid and run.json at the end. Image i's noise and perturbation keys depend only
on its seed (its own generator), so the images do not depend on the batch or the process count beyond the float
rounding of the model's kernels, which may sum in another order at another batch size (a pixel can then round to
the next level of 255; at the same `--batch` reruns are byte-identical).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..runs import dist
from ..runs.files import clean_temp, file_sha256, write_json
from ..runs.lock import lock_run
from ..runs.record import check_out, check_resume, command_line, identity_of, run_record
from ..runs.shards import pixels_digest, png_holds, read_png, write_png

__all__ = ["pipeline_to_folder", "load_pipeline", "read_prompts", "NOT_A_PIPELINE"]

NOT_A_PIPELINE = ("{dir} is not a diffusers pipeline folder (no model_index.json): give a folder written by "
                  "pipe.save_pretrained(DIR), or fetch one first (huggingface-cli download REPO --local-dir DIR)")


@contextlib.contextmanager
def _loading_bars(on: bool):
    """diffusers' and transformers' own progress bars (loading components, checkpoint shards) on or off."""
    from diffusers.utils import logging as dlog

    try:
        from transformers.utils import logging as tlog
    except ImportError:  # pragma: no cover - transformers is optional for some pipelines
        tlog = None
    logs = [m for m in (dlog, tlog) if m is not None]
    before = [m.is_progress_bar_enabled() for m in logs]
    if not on:
        for m in logs:
            m.disable_progress_bar()
    try:
        yield
    finally:
        for m, was in zip(logs, before):
            if was and not on:
                m.enable_progress_bar()


def load_pipeline(folder, device="cpu", dtype: Optional[str] = None, progress: bool = True):
    """`DiffusionPipeline.from_pretrained(folder, local_files_only=True)` (never a download), on `device`.
    Components saved as None (SD3 without its T5 encoder) are passed as None, as the pipeline was built.
    `progress=False` silences the loading bars."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ValueError(NOT_A_PIPELINE.format(dir=folder))
    try:
        from diffusers import DiffusionPipeline
    except ImportError as e:
        raise ImportError("autoguidance pipe needs diffusers: pip install autoguidance[diffusers]") from e
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / 'model_index.json'} is not JSON ({e}): give a folder written by "
                         "pipe.save_pretrained(DIR)") from None
    kw = {"torch_dtype": getattr(torch, dtype)} if dtype else {}
    for name, v in (index.items() if isinstance(index, dict) else []):
        if not name.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is None and v[1] is None:
            kw[name] = None               # saved as None (e.g. text_encoder_3 of SD3 without T5)
    with _loading_bars(progress):
        pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def read_prompts(path) -> list[str]:
    """The prompts of a text file, one per line (blank lines skipped)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompts {path}: cannot read it as text ({e}); give a text file with one prompt per "
                         "line") from None
    prompts = [ln.strip() for ln in lines if ln.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompt: write one prompt per line")
    return prompts


def _folder_digest(folder: Path) -> str:
    """What identifies a pipeline folder cheaply: model_index.json and every file's relative path and size."""
    h = hashlib.sha256((folder / "model_index.json").read_bytes())
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            h.update(f"{p.relative_to(folder)}:{p.stat().st_size}\n".encode())
    return h.hexdigest()


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


def _call_options(pipe, given: dict) -> dict:
    """The pipeline call's options: those given, checked against its `__call__`, with the defaults of the scales
    it uses (`guidance_scale`, `true_cfg_scale`) resolved, so run.json records what was used."""
    name = type(pipe).__name__
    params = inspect.signature(type(pipe).__call__).parameters
    flags = {"guidance_scale": "--guidance-scale", "true_cfg_scale": "--true-cfg-scale",
             "negative_prompt": "--negative-prompt", "height": "--height", "width": "--width"}
    for k, v in given.items():
        if v is not None and k not in params:
            raise ValueError(f"{name} takes no {k}: drop {flags[k]}")
    if "true_cfg_scale" in params:       # Flux: CFG with the negative prompt is true_cfg_scale > 1
        if given.get("negative_prompt") is not None and given.get("true_cfg_scale") is None:
            raise ValueError(f"{name}'s CFG with a negative prompt is its true_cfg_scale: pass --true-cfg-scale S "
                             "(> 1) with --negative-prompt")
        if given.get("true_cfg_scale") is not None and given.get("negative_prompt") is None:
            raise ValueError(f"{name} does CFG (true_cfg_scale) only with a negative prompt: pass --negative-prompt "
                             "with --true-cfg-scale")
    out = dict(given)
    for k in ("guidance_scale", "true_cfg_scale"):
        if k in params and out.get(k) is None:
            d = params[k].default
            out[k] = float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else None
    return {k: v for k, v in out.items() if v is not None or k in ("guidance_scale", "true_cfg_scale")}


def pipeline_to_folder(folder, out, seeds: Sequence[int], *,
                       method:          str = "none",          # a key of pipeline.PIPELINE_METHODS
                       w:               Optional[float] = None,
                       p:               float = 0.1,
                       where:           Optional[str] = None,
                       perturbation:    Optional[str] = None,  # a name of methods.PERTURBATIONS, or skiplayers
                       layers:          Optional[Sequence[int]] = None,   # perturbation skiplayers: block indices
                       blocks:          Optional[str] = None,  # perturbation skiplayers: the block list's path
                       guide:           Optional[str] = None,  # a local model folder (method autoguidance)
                       interval:        Optional[tuple] = None,
                       cfg_interval:    Optional[tuple] = None,
                       prompt:          Optional[str] = None,
                       prompts:         Optional[Sequence[str]] = None,   # seed s gets prompts[s % len(prompts)]
                       negative_prompt: Optional[str] = None,
                       class_label:     Optional[int] = None,  # class-conditional pipelines (DiT)
                       guidance_scale:  Optional[float] = None,
                       true_cfg_scale:  Optional[float] = None,  # Flux: CFG with the negative prompt
                       steps:           int = 28,
                       height:          Optional[int] = None,
                       width:           Optional[int] = None,
                       batch:           int = 4,
                       device:          Optional[str] = None,
                       dtype:           Optional[str] = None,
                       progress:        bool = True,
                       args:            Optional[argparse.Namespace] = None,
                       rule=None,                             # a combination rule (autoguidance.rules); None: linear
                       w_steps:         Optional[Sequence[float]] = None,   # one w per step of the loop (not w)
                       window:          Optional[tuple] = None) -> dict:    # (start, stop): w only in those steps
    """Write one PNG per seed of this rank, then (rank 0) the grid and run.json; returns `{'done', 'skipped',
    'images', 'seconds'}` of this rank. Call `dist.init()` first under torchrun."""
    import tqdm

    from ..rng import as_seeds
    from ..rules import Linear, as_rule, rule_record
    from ..schedules import StepList, StepWindow
    from .pipeline import guided_pipeline, make_pipeline_perturbation

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ValueError(NOT_A_PIPELINE.format(dir=folder))
    out = check_out(out)
    seeds = [int(s) for s in as_seeds(list(seeds), "--seeds").tolist()]
    if batch < 1:
        raise ValueError(f"--batch must be a positive number of images per pipeline call, got {batch}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--steps must be a positive number of denoising steps, got {steps}")
    if prompt is not None and prompts is not None:
        raise ValueError("give --prompt or --prompts FILE, not both")
    prompt_list = [prompt] if prompt is not None else list(prompts) if prompts is not None else None
    if prompt_list is not None and class_label is not None:
        raise ValueError("--class-label is for class-conditional pipelines (DiT), --prompt for text ones: not both")
    if prompt_list is None and class_label is None:
        raise ValueError("--prompt (or --prompts FILE) is needed for a text-to-image pipeline (--class-label for a "
                         "class-conditional one)")
    if method == "perturbation":
        pert = make_pipeline_perturbation(perturbation or "dropout", p, where, layers, blocks)
    elif perturbation is not None or layers or blocks is not None:
        raise ValueError(f"--perturbation / --layers / --blocks belong to method perturbation, not {method}: add "
                         "--method perturbation")
    rule = as_rule(rule)
    schedule = w
    if w_steps is not None:
        if w is not None or interval is not None or window is not None:
            raise ValueError("--w-steps gives w at every step: drop --w / --interval / --window")
        schedule = StepList(w_steps)
    elif window is not None:
        if w is None or interval is not None:
            raise ValueError("--window START,STOP needs --w (the weight inside the window) and no --interval")
        schedule = StepWindow(float(w), *window)
    dev = dist.device(device)
    pipe = load_pipeline(folder, dev, dtype, progress=progress)
    call_opts = _call_options(pipe, {"guidance_scale": guidance_scale, "true_cfg_scale": true_cfg_scale,
                                     "negative_prompt": negative_prompt, "height": height, "width": width})
    config = {"pipeline": str(folder.resolve()), "pipeline_digest": _folder_digest(folder), "method": method,
              "w": w, "p": p, "where": where, "perturbation": perturbation,
              "layers": list(layers) if layers else None, "blocks": blocks, "guide": guide,
              "interval": list(interval) if interval else None,
              "cfg_interval": list(cfg_interval) if cfg_interval else None, "prompt": prompt,
              "prompts": list(prompts) if prompts is not None else None, "negative_prompt": negative_prompt,
              "class_label": class_label, "guidance_scale": call_opts.get("guidance_scale"),
              "true_cfg_scale": call_opts.get("true_cfg_scale"), "steps": steps, "height": height, "width": width,
              "dtype": dtype}
    # written only when set, so the identity of a run made without them is unchanged
    if type(rule) is not Linear:
        config["rule"] = rule_record(rule)
    if w_steps is not None:
        config["w_steps"] = [float(v) for v in w_steps]
    if window is not None:
        config["window"] = [float(v) for v in window]
    identity = identity_of(config)
    options = dict(w=schedule, interval=interval, cfg_interval=cfg_interval,
                   rule=rule if type(rule) is not Linear else None)
    if method == "insitu":
        options.update(p=p, where=where)
    elif method == "perturbation":
        options["perturbation"] = pert
    elif method == "autoguidance":
        if not guide:
            raise ValueError("method autoguidance needs --guide DIR (a local model folder of the same kind as the "
                             "pipeline's unet / transformer)")
        from .pipeline import pipeline_model

        _, model = pipeline_model(pipe)
        with _loading_bars(progress):
            options["guide"] = type(model).from_pretrained(guide, local_files_only=True).eval().requires_grad_(False)
    options = {k: v for k, v in options.items() if v is not None}
    call = {"num_inference_steps": int(steps), "output_type": "np",
            **{k: v for k, v in call_opts.items() if v is not None and k != "negative_prompt"}}
    with lock_run(out, command_line(args) if args is not None else None):
        if dist.is_main():
            for f in (out, out / "png"):
                clean_temp(f)
        if any((out / "png").glob("*.png")):   # a run that made no image holds nothing a rerun could mix with
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
            if not (isinstance(rec, dict) and rec.get("identity") == identity):
                return False
            if "pixels" in rec:                          # it decodes to the image made for this seed
                return png_holds(png, rec["pixels"])
            return png.exists() and rec.get("sha256") == file_sha256(png) and read_png(png) is not None   # older record

        todo = [s for s in mine if not done(s)]
        skipped = len(mine) - len(todo)
        t0 = time.perf_counter()
        mine_index = {}
        with guided_pipeline(pipe, method, **options) as gp:
            bar = tqdm.tqdm(total=len(mine), initial=skipped, unit="img", disable=not (progress and r == 0),
                            desc=f"{method} (rank 0 of {world})")
            try:                          # the bar's line ends before any error is printed
                for a in range(0, len(todo), batch):
                    chunk = todo[a:a + batch]
                    gp.seeds = torch.tensor(chunk, dtype=torch.int64)
                    gens = [torch.Generator(dev).manual_seed(s) for s in chunk]
                    kw = dict(call, generator=gens)
                    if negative_prompt is not None:
                        kw["negative_prompt"] = [negative_prompt] * len(chunk)
                    if class_label is not None:
                        images = pipe(class_labels=[int(class_label)] * len(chunk), **kw).images
                    else:
                        images = pipe([prompt_list[s % len(prompt_list)] for s in chunk], **kw).images
                    for s, img in zip(chunk, np.asarray(images)):
                        png = out / "png" / f"{s:06d}.png"
                        pixels = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
                        write_png(png, pixels)
                        mine_index[str(s)] = {"identity": identity, "sha256": file_sha256(png),
                                              "pixels": pixels_digest(pixels)}
                    if world == 1:
                        index.update(mine_index)
                        write_json(index_path, index)
                    else:
                        write_json(out / f"images.rank{r}.json", mine_index)
                    bar.update(len(chunk))
            finally:
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
            write_png(out / "grid.png", _grid([read_png(out / "png" / f"{s:06d}.png") for s in seeds]))
            write_json(out / "run.json", run_record(config, seeds, args, status="complete", identity=identity,
                                                    images_made=len(todo), images_skipped=skipped,
                                                    seconds_rank0=round(seconds, 3)))
        dist.barrier()
    return {"done": len(todo), "skipped": skipped, "images": len(todo), "seconds": seconds}
