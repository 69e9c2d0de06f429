"""`autoguidance metrics`: Frechet distance, precision/recall and density/coverage of sample folders or shards.

    autoguidance metrics runs/digits-ag --space digits --ref digits-test
    autoguidance metrics runs/toy-ag --space raw --ref toy:A --ref-stats toy-A.npz      # saves, then reuses
    torchrun --nproc_per_node=8 -m autoguidance.cli metrics runs/img64 --space inception \\
        --inception-weights ~/weights/inception.pt --ref-stats ~/refs/img64-inception.npz --out runs/img64/eval

Sources: sample folders written by `autoguidance sample` (their `shards/*.npz`), single `.npz` shards, folders of
`.npz` files, or folders of `.png` images (read as [-1, 1]). In the digits space, shards of class-conditional
samples also get `accuracy`: the fraction the feature classifier assigns their conditioning label. The work units (one shard, or 1000 PNGs) go
round-robin to ranks; each rank accumulates `RunningStats` (float64 sums) that are all-reduced, so FD is the
same for any process count up to float64 rounding. Precision/recall (k = 3) and density/coverage (k = 5) need
every feature: they are all-gathered, put back in file order, and computed on every rank (rank 0 reports).

References (`--ref`): `digits-test` (the digits test split, 500 images), `toy:A` / `toy:B` / `toy:AB` (exact
samples of the 2D toy's ground truth, `--ref-n` of them, seed `--ref-seed`), or a samples source as above.
`--ref-stats FILE` loads saved reference statistics (NPZ, no pickle) if the file exists, and otherwise computes
them from `--ref` and saves them there (with the features, for precision/recall).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import dist
from .io import write_json
from .metrics.extractors import SPACES, Extractor, check_weights, get_extractor
from .metrics.running import RunningStats

__all__ = ["Unit", "Accumulated", "collect_units", "load_unit", "accumulate", "builtin_reference", "reference", "score",
           "add_parser", "PNG_UNIT"]

PNG_UNIT = 1000          # PNG files per work unit
_KEY_STRIDE = 1 << 24    # row key = unit index * stride + row (exact in float64)


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
        npz = sorted(folder.glob("*.npz"))
        if npz:
            units.extend(Unit("npz", (str(f),)) for f in npz)
            continue
        pngs = sorted((p / "png").glob("*.png")) if (p / "png").is_dir() else sorted(p.glob("*.png"))
        if not pngs:
            raise FileNotFoundError(f"sample source {src} holds no shards/*.npz, *.npz or *.png files")
        units.extend(Unit("png", tuple(map(str, pngs[a:a + PNG_UNIT]))) for a in range(0, len(pngs), PNG_UNIT))
    if not units:
        raise FileNotFoundError("no sample sources given")
    return units


def _read_png(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("L") if im.mode in ("L", "I", "I;16", "1") else im.convert("RGB"))
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def load_unit(unit: Unit) -> tuple[torch.Tensor, np.ndarray]:
    """The samples of a unit, `[n, ...]` float32 (PNGs as `[n, C, H, W]` in [-1, 1]), and their class labels
    `[n]` int64 (-1: none or unknown; PNGs and plain NPZ files carry none)."""
    if unit.kind == "npz":
        import zipfile

        from .sample_cli import ShardError, read_shard

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


def _feature_dim(extractor: Extractor, example: torch.Tensor) -> int:
    return int(extractor(example[:1]).shape[1])


@dataclass
class Accumulated:
    """What `accumulate` returns: statistics (reduced over ranks), the features if kept, classifier counts."""

    stats: RunningStats
    features: Optional[torch.Tensor]   # [N, dim] float64 in unit order, or None
    correct: int = 0                   # labelled samples the feature classifier assigns their label (digits)
    labelled: int = 0                  # samples with a label

    def accuracy(self) -> dict:
        return {"accuracy": self.correct / self.labelled} if self.labelled else {}


def accumulate(units: Sequence[Unit], extractor: Extractor, keep_features: bool = True) -> Accumulated:
    """Statistics of all units' features, reduced over ranks (unit j is read by rank j mod world size), and, with
    `keep_features`, every feature `[N, dim]` float64 in unit order (gathered to every rank)."""
    r, world = dist.rank(), dist.world_size()
    dim = _feature_dim(extractor, load_unit(units[0])[0])
    stats = RunningStats(dim)
    rows, counts = [], torch.zeros(2, dtype=torch.float64)
    for j, u in enumerate(units):
        if j % world != r:
            continue
        x, labels = load_unit(u)
        f = extractor(x)
        stats.update(f)
        counts += torch.tensor(extractor.correct(f, labels), dtype=torch.float64)
        if keep_features:
            key = torch.arange(len(f), dtype=torch.float64)[:, None] + j * _KEY_STRIDE
            rows.append(torch.cat([key, f], 1))
    stats = stats.all_reduce()
    counts = dist.all_reduce_sum(counts)
    feats = None
    if keep_features:
        local = torch.cat(rows) if rows else torch.zeros(0, dim + 1, dtype=torch.float64)
        every = dist.all_gather_rows(local)
        feats = every[torch.argsort(every[:, 0], stable=True)][:, 1:].contiguous()
    return Accumulated(stats, feats, int(counts[0]), int(counts[1]))


def builtin_reference(name: str, n: int = 10000, seed: int = 0) -> Optional[torch.Tensor]:
    """Reference samples of a built-in name (`digits-test`, `toy:A`, `toy:B`, `toy:AB`), or None for a path."""
    if name == "digits-test":
        from .data.digits import load_digits
        return load_digits("test").images
    if name.startswith("toy:"):
        from .toy.mixture import tree_mixture
        classes = name[4:]
        if classes not in ("A", "B", "AB"):
            raise ValueError(f"--ref {name}: the toy's class sets are toy:A, toy:B and toy:AB")
        return tree_mixture(classes).sample(n, 0.0, generator=torch.Generator().manual_seed(seed))
    return None


def reference(ref: Optional[str], extractor: Extractor, *, ref_stats: Optional[str] = None, ref_n: int = 10000,
              ref_seed: int = 0, keep_features: bool = True) -> tuple[RunningStats, Optional[torch.Tensor]]:
    """Reference statistics (and features): loaded from `ref_stats` if that file exists, else computed from
    `ref` (then saved to `ref_stats` by rank 0 when a path is given)."""
    if ref_stats and Path(ref_stats).exists():
        stats, feats, meta = RunningStats.load(ref_stats)
        if meta.get("space") not in (None, extractor.name):
            raise ValueError(f"--ref-stats {ref_stats} holds '{meta.get('space')}' features, not "
                             f"'{extractor.name}': use the matching --space or another file")
        if keep_features and feats is None:
            raise ValueError(f"--ref-stats {ref_stats} has no features, which precision/recall need: pass "
                             "--no-prdc, or recompute the file")
        return stats, (torch.from_numpy(feats).to(torch.float64) if feats is not None else None)
    if not ref:
        raise ValueError("no reference: pass --ref (digits-test, toy:A, or a samples folder) or an existing "
                         "--ref-stats FILE")
    samples = builtin_reference(ref, ref_n, ref_seed)
    if samples is not None:
        feats = extractor(samples)
        stats = RunningStats(feats.shape[1]).update(feats)
    else:
        acc = accumulate(collect_units([ref]), extractor, keep_features=True)
        stats, feats = acc.stats, acc.features
    if ref_stats and dist.is_main():
        stats.save(ref_stats, feats.numpy() if feats is not None else None, space=extractor.name, source=ref)
    dist.barrier()
    return stats, (feats if keep_features else None)


def score(stats: RunningStats, feats: Optional[torch.Tensor], ref: RunningStats, ref_feats: Optional[torch.Tensor],
          k_pr: int = 3, k_dc: int = 5) -> dict:
    """`{'fd', 'n', 'n_ref'}` plus `precision, recall, density, coverage` when both feature sets are given."""
    from .metrics.frechet import frechet_distance
    from .metrics.prdc import prdc

    out = {"fd": frechet_distance(stats.mean(), stats.cov(), ref.mean(), ref.cov()), "n": stats.n, "n_ref": ref.n}
    if feats is not None and ref_feats is not None:
        out.update(prdc(ref_feats, feats, k_pr=k_pr, k_dc=k_dc))
    return out


def _run(args) -> int:
    check_weights(args.space, args.inception_weights, args.dinov2_weights)   # fail before reading anything
    dist.init()
    try:
        extractor = get_extractor(args.space, inception_weights=args.inception_weights,
                                  dinov2_weights=args.dinov2_weights, batch=args.batch,
                                  device=dist.device(args.device))
        ref, ref_feats = reference(args.ref, extractor, ref_stats=args.ref_stats, ref_n=args.ref_n,
                                   ref_seed=args.ref_seed, keep_features=not args.no_prdc)
        result = {"space": args.space, "sources": list(args.sources), "ref": args.ref or args.ref_stats}
        if args.sources:
            acc = accumulate(collect_units(args.sources), extractor, keep_features=not args.no_prdc)
            result.update(score(acc.stats, acc.features, ref, ref_feats))
            result.update(acc.accuracy())
        if dist.is_main():
            print(json.dumps(result))
            if args.out:
                from .sample_cli import run_record
                out = Path(args.out)
                write_json(out / "metrics.json", result)
                write_json(out / "run.json", run_record(vars_config(args), args=args))
    finally:
        dist.shutdown()
    return 0


def vars_config(args) -> dict:
    """The parsed flags as a JSON-able dict (without the handler)."""
    keep = (str, int, float, bool, list, type(None))
    return {k: v for k, v in vars(args).items() if k not in ("func", "_parser") and isinstance(v, keep)}


def add_metric_arguments(p) -> None:
    """Feature space and reference flags, shared with `sweep`."""
    g = p.add_argument_group("features and reference")
    g.add_argument("--space", default="digits", choices=list(SPACES), help="feature space")
    g.add_argument("--inception-weights", default=None, help="local TorchScript Inception-v3 (FID); never downloaded")
    g.add_argument("--dinov2-weights", default=None, help="local TorchScript DINOv2 ViT-L/14; never downloaded")
    g.add_argument("--ref", default=None, help="digits-test, toy:A|B|AB, or a samples folder / shard")
    g.add_argument("--ref-stats", default=None, help="NPZ of reference statistics: loaded if it exists, else saved")
    g.add_argument("--ref-n", type=int, default=10000, help="samples of a toy:* reference")
    g.add_argument("--ref-seed", type=int, default=0, help="seed of a toy:* reference")
    g.add_argument("--no-prdc", action="store_true", help="FD only (no precision/recall/density/coverage)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("metrics", help="FD, precision/recall, density/coverage of samples (torchrun-ready)",
                              description=__doc__.split("\n\n")[0], epilog="See docs/evaluation.md.",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="*", help="sample folders, .npz shards, or PNG folders (none: only --ref-stats)")
    add_metric_arguments(p)
    p.add_argument("--batch", type=int, default=256, help="images per feature-network call")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--out", default=None, help="folder for metrics.json and run.json")
    p.set_defaults(func=_run, _parser=p)
