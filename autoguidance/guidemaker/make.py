"""`make_guide`: a guide for a main by a recipe, for a budget, into a folder that `--gnet`, `ag.load` and
`guided_pipeline(pipe, "autoguidance", guide=...)` take; resumable, torchrun-ready, locked.

    import autoguidance as ag
    rec = ag.make_guide("mnist-s-T-ema050", "distill", "runs/guide", budget=0.03)              # 3% of its FLOPs
    rec = ag.make_guide("path/to/sd-pipeline", "distill", "runs/sd-guide", steps=2000, prompts="prompts.txt")

Layout of the output folder `OUT`:

    config.json, model.safetensors            the guide (library nets: an autoguidance checkpoint; its EMA `ema`)
    config.json, diffusion_pytorch_model.safetensors   (diffusers mains: a model folder from_pretrained reads)
    ema150/ ...                               the guide at each other EMA length kept (same format)
    guide.json                                the record: recipe, budget asked and spent (FLOPs), data source, the
                                              main's digest and signature, the optimisation, the command; status
    inputs.json, inputs.safetensors           the main's samples a data-free recipe trains on (made once)
    state/iter-XXXXXXXX/                      the latest training state (resume)

A rerun with the same settings resumes from the latest state (to the same result as an uninterrupted run) or, when
the guide is complete, returns its record; other settings are refused, naming them. A second run on a folder in use
is refused at once (`OUT/.lock`). Under torchrun every rank computes its share of each step (`loop.py`); rank 0
writes.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from .._version import __version__
from ..runs import dist
from ..runs.files import clean_temp, write_json
from ..runs.lock import lock_run
from .budget import TRAIN_FACTOR, Budget, plan, sampler_calls
from .data import conditioning_for, load_data, read_prompts, sample_pool
from .loop import TrainSpec, train
from .mains import EDM2Main, Main
from .mains_diffusers import DiffusersMain
from .recipes import get_recipe

__all__ = ["GuideOptions", "make_guide", "open_main", "RECORD_FORMAT", "read_record", "ema_folder"]

RECORD_FORMAT = "autoguidance-guide"


@dataclass(frozen=True)
class GuideOptions:
    """Everything besides the main and the output folder that decides a made guide (recorded; a resume must match)."""

    recipe:       str                          # a key of recipes.RECIPES
    budget:       Optional[Budget] = None      # fraction of the main's training FLOPs, or steps (None: snapshot)
    data:         Optional[str] = None         # a folder of images / latents, or a library image set
    prompts:      Optional[str] = None         # a text file, one prompt a line (text-conditioned mains)
    snapshot:     Optional[str] = None         # recipe snapshot: the earlier checkpoint of the main's run
    init:         str = "fresh"                # distill: 'fresh' or 'main' (the main's weights, sliced)
    width:        Optional[float] = None       # distill: channel fraction (None: reduce.DEFAULTS)
    depth:        Optional[float] = None       # distill: block fraction (None: reduce.DEFAULTS)
    batch:        int = 64                     # samples per step, all ranks together
    lr:           Optional[float] = None       # constant learning rate (None: the main's own, see mains.py)
    weight_decay: Optional[float] = None       # recipe weight-decay (None: its default)
    ema_stds:     tuple = (0.050, 0.150)       # power-function EMA lengths kept
    ema:          Optional[float] = None       # the EMA written as the guide at OUT (None: the first)
    samples:      Optional[int] = None         # data-free pool size (None: a quarter of the budget)
    sample_steps: int = 32                     # sampler steps of the data-free samples
    main_flops:   Optional[float] = None       # the main's training FLOPs, for mains without a record
    noise:        Optional[tuple] = None       # EDM2 mains without a record: (P_mean, P_std)
    t_dist:       Optional[str] = None         # diffusers mains: 'uniform' or 'logit-normal:M,S'
    subfolder:    Optional[str] = None         # diffusers pipeline folders: 'unet' / 'transformer'
    seed:         int = 0
    state_every:  int = 0                      # also save the training state every N steps

    def __post_init__(self):
        object.__setattr__(self, "ema_stds", tuple(float(s) for s in self.ema_stds))
        if self.noise is not None:
            object.__setattr__(self, "noise", tuple(float(v) for v in self.noise))
        if isinstance(self.batch, bool) or int(self.batch) != self.batch or self.batch < 1:
            raise ValueError(f"--batch must be a positive number of samples per step, got {self.batch!r}")
        if isinstance(self.sample_steps, bool) or int(self.sample_steps) != self.sample_steps or self.sample_steps < 1:
            raise ValueError(f"--sample-steps must be a positive number of sampler steps, got {self.sample_steps!r}")
        if self.ema is not None and float(self.ema) not in self.ema_stds:
            raise ValueError(f"--ema {self.ema} is not one of --ema-stds {','.join(f'{s:g}' for s in self.ema_stds)}")
        if self.main_flops is not None and not self.main_flops > 0:
            raise ValueError(f"--main-flops must be > 0, got {self.main_flops}")
        if self.state_every < 0:
            raise ValueError(f"--state-every must be >= 0, got {self.state_every}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["budget"] = self.budget.to_dict() if self.budget is not None else None
        return json.loads(json.dumps(d))


def open_main(ref: str, *, subfolder: Optional[str] = None, device="cpu", noise=None, t_dist=None) -> Main:
    """The main named by `ref`: a shipped name or library checkpoint folder (EDM2Main), or a diffusers pipeline
    folder with `subfolder` 'unet' / 'transformer' (default: the one it has)."""
    from ..checkpoint import is_diffusers_folder

    p = Path(str(ref))
    if p.is_dir() and ((p / "model_index.json").is_file() or is_diffusers_folder(p)):
        if noise is not None:
            raise ValueError("--noise is the EDM2 noise distribution of a library net; a diffusers main draws its "
                             "training timesteps (--t-dist)")
        return DiffusersMain(p, subfolder=subfolder, device=device, t_dist=t_dist)
    if subfolder is not None or t_dist is not None:
        raise ValueError(f"--subfolder / --t-dist are for diffusers pipeline folders; {ref} is a library checkpoint")
    return EDM2Main(ref, device=device, noise=noise)


def read_record(out) -> Optional[dict]:
    """The `guide.json` record of a guide folder, or None."""
    f = Path(out) / "guide.json"
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) and rec.get("format") == RECORD_FORMAT else None


def ema_folder(folder, ema_std: float, rec: Optional[dict] = None) -> Path:
    """The checkpoint folder of a made guide's EMA of relative std `ema_std` (the guide's folder itself for the EMA
    it was written at, a subfolder for the others); ValueError naming the EMAs it has when it lacks that one."""
    folder = Path(folder)
    rec = rec if rec is not None else read_record(folder)
    if rec is None:
        raise ValueError(f"{folder} is not a made guide (no guide.json): make it with `autoguidance make-guide`")
    have = {round(float(std) * 1000): sub for std, sub in (rec.get("emas") or {}).items()}
    key = round(float(ema_std) * 1000)
    if key not in have:
        raise ValueError(f"guide {folder} has no EMA of relative std {ema_std:g} (it has "
                         f"{', '.join(f'{k / 1000:g}' for k in sorted(have)) or 'none'}): make it with --ema-stds "
                         f"including it")
    return folder if have[key] == "." else folder / have[key]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    h.update(path.read_bytes())
    return h.hexdigest()


def _data_identity(data: Optional[str]) -> Optional[dict]:
    """What identifies the data cheaply: a library set's name, or a folder's files (relative path and size)."""
    if data is None:
        return None
    p = Path(data)
    if not p.is_dir():
        return {"name": data}
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        if f.is_file() and not f.name.startswith("."):
            h.update(f"{f.relative_to(p)}:{f.stat().st_size}\n".encode())
    return {"folder": str(p.resolve()), "files": h.hexdigest()}


def _settings_diff(there: dict, now: dict) -> dict:
    """`{name: (there, now)}` of the settings that differ, options by their own names."""
    flat = lambda d: {**{k: v for k, v in d.items() if k != "options"}, **(d.get("options") or {})}  # noqa: E731
    a, b = flat(there), flat(now)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _ema_name(std: float) -> str:
    return f"ema{round(std * 1000):03d}"


def _count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_guide(main: str, recipe: str, out, *,
               budget:   Optional[float] = None,   # fraction of the main's training FLOPs (e.g. 0.03)
               steps:    Optional[int] = None,     # or a step count
               progress: bool = True,              # tqdm bar (rank 0) with ETA and the loss
               device:   Optional[str] = None,     # 'cpu' / 'cuda' (default: cuda:LOCAL_RANK when available)
               command:  Optional[str] = None,     # recorded (the CLI passes its command line)
               **options) -> dict:
    """Make a guide for `main` (a shipped name, a library checkpoint folder, or a diffusers pipeline folder) by
    `recipe` into folder `out` (see the module docstring); `options` are the fields of `GuideOptions`. Returns the
    guide's record (`guide.json`). Call `dist.init()` first under torchrun."""
    b = None if budget is None and steps is None else Budget(fraction=budget, steps=steps)
    opts = GuideOptions(recipe=recipe, budget=b, **options)
    r = get_recipe(opts.recipe)
    r.check(opts)
    if r.trains and opts.budget is None:
        raise ValueError(f"recipe {opts.recipe} needs a budget: --budget FRACTION (of the main's training FLOPs) "
                         "or --steps N")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder: give a folder path")
    dev = dist.device(device)
    m = open_main(main, subfolder=opts.subfolder, device=dev, noise=opts.noise, t_dist=opts.t_dist)
    options_id = opts.to_dict()
    if opts.snapshot is not None:   # a snapshot is its weights, wherever the folder lies
        from ..checkpoint import digest
        options_id["snapshot"] = digest(opts.snapshot)
    settings = {"main": m.digest, "options": options_id, "data": _data_identity(opts.data),
                "prompts": _file_digest(Path(opts.prompts)) if opts.prompts else None}
    command = command or equivalent_command(main, opts, out)
    with lock_run(out, command):
        if dist.is_main():
            clean_temp(out)
        dist.barrier()
        old = read_record(out)
        if old is not None and old.get("settings") != json.loads(json.dumps(settings)):
            diff = _settings_diff(old.get("settings") or {}, json.loads(json.dumps(settings)))
            raise ValueError(f"{out} holds a guide made with other settings {{name: (there, now)}}: {diff}; use "
                             "another --out, or the same arguments to resume it")
        if old is not None and old.get("status") == "complete":
            return old
        t0 = time.perf_counter()
        if not r.trains:
            record = _make_snapshot(m, r, opts, out, settings, command)
        else:
            record = _make_trained(m, r, opts, out, settings, command, dev, progress)
        record["seconds_this_run"] = round(time.perf_counter() - t0, 2)
        if dist.is_main():
            write_json(out / "guide.json", record)
        dist.barrier()
    return record


#: GuideOptions fields and their make-guide flags (the equivalent command of a Python call)
_FLAGS = {"data": "--data", "prompts": "--prompts", "snapshot": "--from", "init": "--init", "width": "--width",
          "depth": "--depth", "batch": "--batch", "lr": "--lr", "weight_decay": "--weight-decay",
          "ema_stds": "--ema-stds", "ema": "--ema", "samples": "--samples", "sample_steps": "--sample-steps",
          "main_flops": "--main-flops", "noise": "--noise", "t_dist": "--t-dist", "subfolder": "--subfolder",
          "seed": "--seed", "state_every": "--state-every"}


def equivalent_command(main: str, opts: GuideOptions, out) -> str:
    """The `autoguidance make-guide` command line that makes the same guide as a Python call with `opts` (every
    option that differs from the command's default)."""
    import shlex

    defaults = GuideOptions(recipe=opts.recipe)                            # the command's defaults are these
    words = ["autoguidance", "make-guide", "--main", str(main), "--recipe", opts.recipe, "--out", str(out)]
    if opts.budget is not None:
        words += (["--budget", f"{opts.budget.fraction:g}"] if opts.budget.fraction is not None
                  else ["--steps", str(opts.budget.steps)])
    for field, flag in _FLAGS.items():
        v = getattr(opts, field)
        if v == getattr(defaults, field):
            continue
        words += [flag, ",".join(f"{x:g}" for x in v) if isinstance(v, tuple) else f"{v:g}" if isinstance(v, float)
                  else str(v)]
    return shlex.join(words)


def _base_record(m, opts, settings, command) -> dict:
    return {"format": RECORD_FORMAT, "version": 1, "status": "running", "recipe": opts.recipe,
            "settings": json.loads(json.dumps(settings)), "main": m.describe(), "made_for": m.signature(),
            "command": command, "library_version": __version__,
            "torch_version": torch.__version__, "world_size": dist.world_size()}


def _make_snapshot(m, r, opts, out: Path, settings, command) -> dict:
    checked = r.validate(m, opts.snapshot)
    record = _base_record(m, opts, settings, command)
    record.update(status="complete", snapshot={k: v for k, v in checked.items() if k not in ("net",)},
                  budget={"asked": None, "spent_flops": 0.0, "note": "nothing trained: the snapshot's cost is part "
                          "of the main's run"}, data=None)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        r.copy(m, checked, out, record)
    return record


def _make_trained(m, r, opts, out: Path, settings, command, dev, progress) -> dict:
    prompts = read_prompts(opts.prompts) if opts.prompts else None
    prep = r.prepare(m, opts)
    use_data = prep.uses_data and opts.data is not None
    gen = torch.Generator().manual_seed(opts.seed)
    pool = None
    if use_data:
        pool = load_data(opts.data, m, prompts=prompts, need_labels=prep.needs_labels, gen=gen)
    if m.kind == "diffusers":   # FLOP counts need one sample's inputs
        if pool is not None:
            m.set_example(pool.x, pool.cond, pool.const)
        else:
            cond, const = conditioning_for(m, 1, prompts, torch.Generator().manual_seed(opts.seed))
            m.set_example(torch.zeros(1, *m.sample_shape()), cond, const)
    f_main = m.flops()
    f_guide = f_main if prep.config == m.config() else m.flops(prep.config)
    per_sample = TRAIN_FACTOR * f_guide + prep.main_calls_per_sample * f_main
    per_input = sampler_calls(m.sampler_name(), opts.sample_steps) * f_main
    main_flops = opts.main_flops if opts.main_flops is not None else m.training_flops()
    p = plan(opts.budget, batch=opts.batch, flops_per_sample=per_sample, flops_per_input=per_input,
             main_flops=main_flops, data_free=not use_data, samples=opts.samples)
    record = _base_record(m, opts, settings, command)
    if pool is None:
        t_in = time.perf_counter()
        pool = sample_pool(m, p.samples, steps=opts.sample_steps, seed=opts.seed, folder=out, prompts=prompts,
                           device=dev)
        record["inputs_seconds"] = round(time.perf_counter() - t_in, 2)
    defaults = m.optimizer_defaults(prep.fresh)
    lr = opts.lr if opts.lr is not None else defaults["lr"]
    spec = TrainSpec(steps=p.steps, batch=opts.batch, seed=opts.seed, lr=lr,
                     schedule=None if lr is not None else defaults["schedule"], betas=defaults["betas"],
                     eps=defaults["eps"], weight_decay=prep.weight_decay, ema_stds=opts.ema_stds,
                     state_every=opts.state_every)
    record.update(data=pool.source | {"labelled": pool.labelled}, plan=p.to_dict(), train=spec.to_dict(),
                  recipe_notes=prep.notes,
                  guide={"config": json.loads(json.dumps(prep.config)), "parameters": _count_parameters(prep.model),
                         "main_parameters": _count_parameters(m.net), "flops_per_call": f_guide,
                         "main_flops_per_call": f_main})
    if dist.is_main():
        write_json(out / "guide.json", record)
    res = train(prep.model, prep.loss, pool, m.draw_levels, spec, state_dir=out / "state",
                settings=json.loads(json.dumps(settings)), device=dev, progress=progress,
                desc=f"make-guide {opts.recipe}")
    ema_std = float(opts.ema) if opts.ema is not None else spec.ema_stds[0]
    spent = p.input_flops + float(res["step"]) * opts.batch * per_sample
    record.update(status="complete", budget={
        "asked": opts.budget.to_dict(), "spent_flops": spent, "main_flops": main_flops,
        "spent_fraction_of_main": spent / main_flops if main_flops else None,
        "counting": "training 3 x forward FLOPs of the guide per sample + the main's target passes; data-free "
                    "inputs: samples x sampler calls x the main's forward FLOPs (FlopCounterMode, batch 1)"},
        trained={"steps": res["step"], "seconds": round(res["seconds"], 2), "final_loss": res["loss"]},
        emas={f"{s:g}": ("." if s == ema_std else _ema_name(s)) for s in spec.ema_stds}, ema=ema_std)
    if dist.is_main():
        for s, avg in res["ema"].averages.items():
            folder = out if s == ema_std else out / _ema_name(s)
            folder.mkdir(parents=True, exist_ok=True)
            m.save_guide(avg.eval().requires_grad_(False), folder, dict(record, ema=s))
    dist.barrier()
    return record
