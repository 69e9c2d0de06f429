"""`autoguidance sample`: many guided samples, split over processes, resumable, with a record of how they were made.

    autoguidance sample --net toy-denoiser-main --method autoguidance --gnet toy-denoiser-guide --w 3 \\
        --sigma-max 5 --seeds 0-9999 --out runs/toy-ag
    torchrun --nproc_per_node=4 -m autoguidance.cli sample --config ag.toml --seeds 0-49999 --png --out runs/x

Layout of `--out`:

    run.json                  the command, the resolved config, library and torch versions, seeds, world size
    config.toml               the resolved MethodSpec (rerun with --config)
    shards/shard-000000.npz   `samples [n, *shape]` float32, `seeds [n]` int64, `labels [n]` int64 (-1: none),
                              `sha256` (of the three members' bytes); one block of `--shard-size` consecutive seeds
    png/000123.png            with --png, one image per seed (image-shaped samples only; [-1, 1] -> [0, 255])

Shards are assigned round-robin to ranks (shard i to rank i mod world size) and each is computed whole by one
rank with the same batches, from per-image seeds, so the files are byte-identical whatever the process count
(NPZ members carry a fixed date and no compression). Each shard is written atomically; a rerun skips shards
that verify (CRC of every member, sha256, expected seeds and labels) and redoes missing, truncated or corrupt
ones; with --png it also decodes every PNG of a kept shard and rewrites (atomically) each one that is missing, does
not decode, or is not exactly its sample's image. A rerun may add seeds after the recorded ones (same config); anything else is refused. Labels: seed s
gets class `classes[s % len(classes)]`.

Each shard also stores the run's identity (a digest of the method spec, the nets' checkpoint digests, the
sampler settings, the shard's seeds and labels, and the sample shape), so a rerun reuses only shards made by the
same settings, also when run.json is damaged or deleted; other shards (and shards of older versions, which carry
no identity) are recomputed. The folder is locked (`OUT/.lock`) while a run writes to it: a second run on it is
refused at once, naming the first. Temporary files of a killed run are hidden (`.tmp-*`), never read as data,
and removed by the next run.

Test hook: `AUTOGUIDANCE_STOP_AFTER_SHARDS=N` makes each process exit hard (`os._exit(3)`, no cleanup) right after
writing its N-th shard, to simulate a kill mid-run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch

from ..methods import MethodSpec, build_method, label_dim, load_model, model_digest, sample_shape
from ..runs import dist
from ..runs.files import clean_temp, write_json, write_text
from ..runs.lock import lock_run
from ..runs.record import check_out, check_resume, command_line, identity_of, run_record
from ..runs.seeds import labels_for, parse_classes, parse_seeds, shard_blocks
from ..runs.shards import (export_png, pngs_to_redo, read_shard, shard_identity, shard_path, verify_shard,
                           write_shard)
from .options import add_method_arguments, check_positive, parse_floats, spec_from_args

__all__ = ["sample_to_folder", "add_parser"]


# -- the engine ---------------------------------------------------------------------------------------------------

def sample_to_folder(spec: MethodSpec, seeds: Sequence[int], out, *,
                     classes:    Optional[str] = "all",  # 'all', or class indices '0,3'
                     shard_size: int = 1000,             # seeds per shard
                     batch:      Optional[int] = None,   # images per sampler call (default min(shard, 256))
                     png:        bool = False,           # also write png/SEED.png
                     shape:      Optional[Sequence[int]] = None,  # one sample's shape (default: from the net)
                     device:     Optional[str] = None,   # 'cpu' / 'cuda' (default: cuda:LOCAL_RANK if available)
                     progress:   bool = True,            # progress bar on rank 0
                     trust_code: bool = False,           # allow nets given as module:function (runs their code)
                     args:       Optional[argparse.Namespace] = None) -> dict:
    """Sample one image per seed into `out` (see the module docstring), this rank's shards only; returns a summary
    `{'shards', 'done', 'skipped', 'images', 'seconds'}` of this rank, plus `total_images` (all ranks) and
    `seconds_max` (the slowest rank's sampling time). Call `dist.init()` first under torchrun."""
    out = check_out(out)
    if batch is not None and (isinstance(batch, bool) or batch < 1):
        raise ValueError(f"--batch must be a positive number of images per sampler call, got {batch}")
    dev = dist.device(device)
    cache: dict = {}

    def load(ref):
        if ref not in cache:
            cache[ref] = load_model(ref, dev, trust_code=trust_code)
        return cache[ref]

    D = build_method(spec, load=load, device=dev, trust_code=trust_code)
    net = load(spec.net)
    shape = list(shape) if shape is not None else sample_shape(net)
    dim = label_dim(net)
    cls = parse_classes(classes, dim)
    if png and not (len(shape) == 3 and shape[0] in (1, 3)):
        raise ValueError(f"--png needs image samples [1 or 3, H, W]; these have shape {shape} (NPZ shards only)")
    blocks = shard_blocks(seeds, shard_size)
    batch = batch or min(shard_size, 256)
    config = {"spec": spec.to_dict(), "shape": shape, "classes": cls, "label_dim": dim, "shard_size": shard_size}
    output = {"png": png, "batch": batch}   # recorded, but free to change on resume (results do not depend on them)
    nets = sorted({r for r in (spec.net, spec.gnet, spec.uncond) if r})
    identity = identity_of({**config, "sampling": spec.sampling(), "nets": {r: model_digest(r) for r in nets}})
    with lock_run(out, command_line(args) if args is not None else None):
        if dist.is_main():
            for folder in (out, out / "shards", out / "png"):
                clean_temp(folder)
        return _sample_locked(D, spec, seeds, out, shape, cls, dim, blocks, batch, png, config, output, identity,
                              dev, progress, args)


def _sample_locked(D, spec, seeds, out, shape, cls, dim, blocks, batch, png, config, output, identity, dev,
                   progress, args) -> dict:
    import tqdm

    from ..sampling import generate

    check_resume(out, config, list(seeds))
    dist.barrier()
    if dist.is_main():
        write_json(out / "run.json", run_record(config, seeds, args, status="running", num_shards=len(blocks),
                                                **output))
        write_text(out / "config.toml", spec.to_toml())
    dist.barrier()

    r, world = dist.rank(), dist.world_size()
    mine = [i for i in range(len(blocks)) if i % world == r]
    stop_after = int(os.environ.get("AUTOGUIDANCE_STOP_AFTER_SHARDS", "0") or 0)
    done = skipped = images = 0
    t0 = time.perf_counter()
    bar = tqdm.tqdm(total=sum(len(blocks[i]) for i in mine), unit="img", disable=not (progress and r == 0),
                    desc=f"sampling (rank 0 of {world})")
    for i in mine:
        block = blocks[i]
        labels = labels_for(block, cls)
        path = shard_path(out, i)
        sid = shard_identity(identity, block, labels, shape)
        if verify_shard(path, block, labels, shape, identity=sid):
            if png:                                  # keep only PNGs that decode to the shard's images
                kept = read_shard(path)["samples"]
                redo = pngs_to_redo(out, kept, block)
                if redo:
                    export_png(out, kept[redo], [block[j] for j in redo])
            skipped += 1
            bar.update(len(block))
            continue
        onehot = (torch.nn.functional.one_hot(torch.from_numpy(labels), dim).to(torch.float32).to(dev)
                  if cls else None)
        with torch.no_grad():
            x = generate(D, torch.tensor(block, dtype=torch.int64), shape, labels=onehot, batch=batch, device=dev,
                         progress=False, **spec.sampling())
        samples = x.detach().cpu().to(torch.float32).numpy()
        if png:
            export_png(out, samples, block)
        write_shard(path, samples, np.asarray(block, dtype=np.int64), labels, identity=sid)  # last: commits the block
        done += 1
        images += len(block)
        bar.update(len(block))
        if stop_after and done >= stop_after:
            sys.stdout.flush()
            os._exit(3)
    bar.close()
    seconds = time.perf_counter() - t0
    summary = {"shards": len(mine), "done": done, "skipped": skipped, "images": images, "seconds": seconds}
    totals = dist.all_reduce_sum(torch.tensor([done, skipped, images], dtype=torch.float64))
    slowest = float(dist.all_gather_rows(torch.tensor([seconds], dtype=torch.float64)).max())
    summary.update(total_images=int(totals[2]), seconds_max=slowest)
    if dist.is_main():
        write_json(out / "run.json", run_record(config, seeds, args, status="complete", num_shards=len(blocks),
                                                shards_done=int(totals[0]), shards_skipped=int(totals[1]),
                                                images_sampled=int(totals[2]), seconds_slowest_rank=round(slowest, 3),
                                                **output))
    dist.barrier()
    return summary


def _run(args) -> int:
    spec = spec_from_args(args)
    if not spec.net:
        raise ValueError("no model: pass --net (a shipped name, a checkpoint folder, or module:function), "
                         "or set net in --config")
    seeds = parse_seeds(args.seeds)
    check_positive(args.shard_size, "--shard-size", "seeds per shard")
    if args.batch is not None:
        check_positive(args.batch, "--batch", "images per sampler call")
    check_out(args.out)
    shape = list(parse_floats(args.shape, None, "--shape")) if args.shape else None
    if shape is not None and any(v != int(v) or v < 1 for v in shape):
        raise ValueError(f"--shape must be positive integers separated by commas (e.g. 3,64,64), got {args.shape!r}")
    shape = [int(v) for v in shape] if shape is not None else None
    dist.init()
    try:
        s = sample_to_folder(spec, seeds, args.out, classes=args.classes, shard_size=args.shard_size,
                             batch=args.batch, png=args.png, shape=shape, device=args.device,
                             progress=not args.no_progress, trust_code=args.trust_code, args=args)
        if dist.is_main():
            rate = s["images"] / s["seconds"] if s["images"] and s["seconds"] > 0 else 0.0
            print(f"rank 0: {s['done']} shards sampled, {s['skipped']} already done, {s['images']} images in "
                  f"{s['seconds']:.1f} s ({rate:.1f} img/s); output in {args.out}")
    finally:
        dist.shutdown()
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sample", help="sample many images (one per seed) into NPZ shards / PNGs; "
                              "resumable; torchrun for many processes",
                              description=__doc__.split("\n\n")[0], epilog="See docs/evaluation.md.",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_method_arguments(p)
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, help="output folder (rerun on it to resume)")
    o.add_argument("--seeds", default="0-99", help="seeds, e.g. 0-49999 or 0,5,10-19 (one image each)")
    o.add_argument("--classes", default="all", help="'all', 'none' (no labels), or class indices 0,3,7: seed s gets "
                   "classes[s %% len]")
    o.add_argument("--shard-size", type=int, default=1000, help="seeds per NPZ shard (the unit of resume)")
    o.add_argument("--batch", type=int, default=None, help="images per sampler call (default min(shard, 256))")
    o.add_argument("--png", action="store_true", help="also write png/SEED.png (image samples in [-1, 1])")
    o.add_argument("--shape", default=None, help="one sample's shape, e.g. 3,64,64 (default: from the net)")
    o.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run, _parser=p)
