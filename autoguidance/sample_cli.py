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
ones. A rerun may add seeds after the recorded ones (same config); anything else is refused. Labels: seed s
gets class `classes[s % len(classes)]`.

Test hook: `AUTOGUIDANCE_STOP_AFTER_SHARDS=N` makes each process exit hard (`os._exit(3)`, no cleanup) right after
writing its N-th shard, to simulate a kill mid-run.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shlex
import struct
import sys
import time
import zipfile
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import dist
from .io import atomic_path, write_json, write_text
from .methods import MethodSpec, add_method_arguments, build_method, label_dim, load_model, parse_floats, \
    sample_shape, spec_from_args

__all__ = ["parse_seeds", "format_seeds", "parse_classes", "shard_blocks", "write_shard", "read_shard",
           "verify_shard", "write_png", "to_uint8", "run_record", "sample_to_folder", "add_parser", "ShardError"]

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_MEMBERS = ("samples", "seeds", "labels")


class ShardError(ValueError):
    """A shard file is missing, truncated, corrupt, or holds other seeds than expected."""


# -- seeds, classes, shards ---------------------------------------------------------------------------------------

def parse_seeds(text: str) -> list[int]:
    """'0-999' (inclusive), '0,5,10-19', or a single seed -> a list of ints, in the given order."""
    out: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            a, sep, b = part.partition("-") if not part.startswith("-") else (part, "", "")
            if sep:
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError:
        out = []
    if not out:
        raise ValueError(f"--seeds must be seeds or inclusive ranges separated by commas (e.g. 0-999 or 0,7,100-199), "
                         f"got {text!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"--seeds {text!r} names some seed twice; each image needs its own seed")
    return out


def format_seeds(seeds: Sequence[int]) -> str:
    """Inverse of `parse_seeds` with ranges compressed: [0, 1, 2, 5] -> '0-2,5'."""
    parts, i = [], 0
    seeds = list(seeds)
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(f"{seeds[i]}-{seeds[j]}" if j > i else f"{seeds[i]}")
        i = j + 1
    return ",".join(parts)


def parse_classes(text: Optional[str], dim: int) -> Optional[list[int]]:
    """'all' (or None) -> every class of a conditional net, None for an unconditional one; 'none' -> None
    (a conditional net sampled without labels); '3' or '0,2,4' -> list."""
    if text == "none":
        return None
    if text is None or text == "all":
        return list(range(dim)) if dim > 0 else None
    if dim == 0:
        raise ValueError(f"--classes {text} given, but the net is unconditional (label_dim 0); drop --classes")
    try:
        cls = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        cls = []
    if not cls or any(not 0 <= c < dim for c in cls):
        raise ValueError(f"--classes must be 'all', 'none' or class indices in [0, {dim - 1}] separated by commas, "
                         f"got {text!r}")
    return cls


def labels_for(seeds: Sequence[int], classes: Optional[list[int]]) -> np.ndarray:
    """Class of each seed, `classes[s % len(classes)]`, or -1 (unconditional): `[n]` int64."""
    if not classes:
        return np.full(len(seeds), -1, dtype=np.int64)
    return np.array([classes[s % len(classes)] for s in seeds], dtype=np.int64)


def shard_blocks(seeds: Sequence[int], shard_size: int) -> list[list[int]]:
    """Consecutive blocks of `shard_size` seeds (the last may be shorter): shard i = seeds[i*size:(i+1)*size]."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    return [list(seeds[a:a + shard_size]) for a in range(0, len(seeds), shard_size)]


def shard_path(out: Path, index: int) -> Path:
    return Path(out) / "shards" / f"shard-{index:06d}.npz"


# -- shard files ----------------------------------------------------------------------------------------------------

def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _zip_member(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    info.create_system = 3
    zf.writestr(info, data)


def write_shard(path, samples: np.ndarray, seeds: np.ndarray, labels: np.ndarray) -> Path:
    """Write an NPZ shard atomically and deterministically (same arrays -> same bytes): members `samples`,
    `seeds`, `labels` and `sha256` (hex digest of the three members' .npy bytes, in that order)."""
    blobs = {"samples": _npy_bytes(np.asarray(samples, dtype=np.float32)),
             "seeds": _npy_bytes(np.asarray(seeds, dtype=np.int64)),
             "labels": _npy_bytes(np.asarray(labels, dtype=np.int64))}
    digest = hashlib.sha256(b"".join(blobs[k] for k in _MEMBERS)).hexdigest()
    blobs["sha256"] = _npy_bytes(np.array(digest))
    path = Path(path)
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for name in (*_MEMBERS, "sha256"):
                _zip_member(zf, f"{name}.npy", blobs[name])
    return path


def read_shard(path) -> dict[str, np.ndarray]:
    """`{'samples', 'seeds', 'labels'}` of a shard, verified: every member's CRC, the sha256 over the members,
    and consistent lengths. Raises `ShardError` saying what is wrong (delete the file or rerun `sample`)."""
    path = Path(path)
    if not path.exists():
        raise ShardError(f"{path}: no such shard")
    try:
        with zipfile.ZipFile(path) as zf:
            raw = {n: zf.read(f"{n}.npy") for n in (*_MEMBERS, "sha256")}   # read() checks each CRC-32
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, zlib.error) as e:
        raise ShardError(f"{path} is truncated or corrupt ({e}); rerun `autoguidance sample` on its folder to "
                         "redo it") from e
    try:
        arrays = {n: np.load(io.BytesIO(raw[n]), allow_pickle=False) for n in raw}
    except ValueError as e:
        raise ShardError(f"{path} holds an unreadable array ({e}); rerun sample to redo it") from e
    if str(arrays["sha256"].reshape(-1)[0]) != hashlib.sha256(b"".join(raw[n] for n in _MEMBERS)).hexdigest():
        raise ShardError(f"{path}: sha256 mismatch, the shard is corrupt; rerun sample to redo it")
    n = len(arrays["seeds"])
    if len(arrays["samples"]) != n or len(arrays["labels"]) != n:
        raise ShardError(f"{path}: {len(arrays['samples'])} samples, {n} seeds, {len(arrays['labels'])} labels")
    return {k: arrays[k] for k in _MEMBERS}


def verify_shard(path, seeds: Sequence[int], labels: np.ndarray, shape: Sequence[int]) -> bool:
    """True if `path` is a sound shard of exactly these seeds, labels and sample shape."""
    try:
        d = read_shard(path)
    except ShardError:
        return False
    return (np.array_equal(d["seeds"], np.asarray(seeds, dtype=np.int64)) and np.array_equal(d["labels"], labels)
            and list(d["samples"].shape[1:]) == list(shape))


# -- PNG ------------------------------------------------------------------------------------------------------------

def to_uint8(samples: np.ndarray) -> np.ndarray:
    """`[N, C, H, W]` in [-1, 1] -> `[N, H, W, C]` uint8, `floor(x * 127.5 + 128)` clamped to [0, 255] (as EDM2)."""
    x = np.asarray(samples, dtype=np.float32)
    return np.clip(np.floor(x * 127.5 + 128.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def write_png(path, img: np.ndarray) -> None:
    """A deterministic 8-bit PNG (grayscale `[H, W, 1]` or RGB `[H, W, 3]` uint8), written atomically."""
    h, w, c = img.shape
    color = {1: 0, 3: 2}.get(c)
    if color is None or img.dtype != np.uint8:
        raise ValueError(f"PNG export takes uint8 images with 1 or 3 channels, got {img.dtype} with {c} channels")

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + img[y].tobytes() for y in range(h))
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _export_png(out: Path, samples: np.ndarray, seeds: Sequence[int]) -> None:
    for img, s in zip(to_uint8(samples), seeds):
        write_png(out / "png" / f"{s:06d}.png", img)


def _png_missing(out: Path, seeds: Sequence[int]) -> bool:
    return any(not (out / "png" / f"{s:06d}.png").exists() for s in seeds)


# -- run records ----------------------------------------------------------------------------------------------------

def command_line(args: argparse.Namespace) -> str:
    """The `autoguidance CMD ...` command that reruns a parsed command: every option that is set, with its value
    (from the parser that made `args`, which the subcommands store as `args._parser`)."""
    parser = getattr(args, "_parser", None)
    if parser is None:
        return "autoguidance " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    words = [parser.prog.split()[-1]]
    for a in parser._actions:
        v = getattr(args, a.dest, None)
        if a.dest in ("help", "func", "_parser") or v is None or v is False:
            continue
        if not a.option_strings:
            words.extend(map(str, v) if isinstance(v, list) else [str(v)])
        elif v is True:
            words.append(a.option_strings[-1])
        else:
            words.extend([a.option_strings[-1], str(v)])
    return "autoguidance " + " ".join(shlex.quote(w) for w in words)


def run_record(config: dict, seeds: Optional[Sequence[int]] = None, args: Optional[argparse.Namespace] = None,
               **extra) -> dict:
    """What made an output folder: the command (rebuilt from the parsed flags, so it reruns the same run), the
    process's argv, the resolved config, versions, seeds, world size."""
    import autoguidance

    rec = {"command": command_line(args) if args is not None else None, "argv": list(sys.argv),
           "config": config, "autoguidance_version": autoguidance.__version__, "torch_version": torch.__version__,
           "numpy_version": np.__version__, "python": sys.version.split()[0], "world_size": dist.world_size(),
           "launcher": "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ else None,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if seeds is not None:
        rec["seeds"] = format_seeds(seeds)
        rec["num_seeds"] = len(seeds)
    rec.update(extra)
    return rec


def check_resume(out: Path, config: dict, seeds: Sequence[int]) -> None:
    """Refuse to add to a folder whose run.json records another config (its shards would mix two runs), or seeds
    that the new seeds do not extend (shard i would be overwritten with other seeds)."""
    rec_file = Path(out) / "run.json"
    if not rec_file.exists():
        return
    try:
        rec = json.loads(rec_file.read_text())
    except json.JSONDecodeError:
        return  # a damaged record is rewritten; the shards verify themselves
    old = rec.get("config")
    if old is not None and old != config:
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        raise ValueError(f"{out} holds a run with another config (differs in: {', '.join(diff)}): use a new --out, "
                         "or delete the folder to start over")
    if rec.get("seeds"):
        before = parse_seeds(rec["seeds"])
        if list(seeds[:len(before)]) != before:
            raise ValueError(f"{out} holds seeds {rec['seeds']}; --seeds {format_seeds(seeds)} does not extend them, "
                             "so its shards would be overwritten with other seeds: use a new --out, or seeds that "
                             f"start with {rec['seeds']}")


# -- the engine ---------------------------------------------------------------------------------------------------

def sample_to_folder(spec: MethodSpec, seeds: Sequence[int], out, *,
                     classes:    Optional[str] = "all",  # 'all', or class indices '0,3'
                     shard_size: int = 1000,             # seeds per shard
                     batch:      Optional[int] = None,   # images per sampler call (default min(shard, 256))
                     png:        bool = False,           # also write png/SEED.png
                     shape:      Optional[Sequence[int]] = None,  # one sample's shape (default: from the net)
                     device:     Optional[str] = None,   # 'cpu' / 'cuda' (default: cuda:LOCAL_RANK if available)
                     progress:   bool = True,            # progress bar on rank 0
                     args:       Optional[argparse.Namespace] = None) -> dict:
    """Sample one image per seed into `out` (see the module docstring), this rank's shards only; returns a summary
    `{'shards', 'done', 'skipped', 'images', 'seconds'}` of this rank, plus `total_images` (all ranks) and
    `seconds_max` (the slowest rank's sampling time). Call `dist.init()` first under torchrun."""
    import tqdm

    from .sampling import generate

    out = Path(out)
    dev = dist.device(device)
    cache: dict = {}

    def load(ref):
        if ref not in cache:
            cache[ref] = load_model(ref, dev)
        return cache[ref]

    D = build_method(spec, load=load, device=dev)
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
        if verify_shard(path, block, labels, shape):
            if png and _png_missing(out, block):
                _export_png(out, read_shard(path)["samples"], block)
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
            _export_png(out, samples, block)
        write_shard(path, samples, np.asarray(block, dtype=np.int64), labels)  # last: the shard commits the block
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
    shape = list(parse_floats(args.shape, None, "--shape")) if args.shape else None
    if shape is not None and any(v != int(v) or v < 1 for v in shape):
        raise ValueError(f"--shape must be positive integers separated by commas (e.g. 3,64,64), got {args.shape!r}")
    shape = [int(v) for v in shape] if shape is not None else None
    dist.init()
    try:
        s = sample_to_folder(spec, seeds, args.out, classes=args.classes, shard_size=args.shard_size,
                             batch=args.batch, png=args.png, shape=shape, device=args.device,
                             progress=not args.no_progress, args=args)
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
