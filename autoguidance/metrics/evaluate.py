"""Metrics of sample sets: features of every work unit accumulated in float64 statistics (reduced over ranks),
reference statistics (built-in references, sample folders, or a saved statistics file), and the scores."""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..runs import dist
from ..runs.sources import Unit, collect_units, load_unit
from .extractors import Extractor
from .refstats import load_reference
from .running import RunningStats

__all__ = ["Accumulated", "accumulate", "builtin_reference", "reference", "score"]

_KEY_STRIDE = 1 << 24    # row key = unit index * stride + row (exact in float64)


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
        from ..data.digits import load_digits
        return load_digits("test").images
    if name.startswith("toy:"):
        from ..toy.mixture import tree_mixture
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
        if not Path(ref_stats).is_file():
            raise ValueError(f"--ref-stats {ref_stats} is not a file: give an NPZ of reference statistics")
        try:
            stats, feats, meta = load_reference(ref_stats, space=extractor.name)
        except (OSError, EOFError, KeyError, zipfile.BadZipFile, ValueError) as e:
            raise ValueError(f"--ref-stats {ref_stats} is not a readable statistics file ({type(e).__name__}: "
                             f"{e}); delete it to recompute it from --ref") from e
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
    from .frechet import frechet_distance
    from .prdc import prdc

    out = {"fd": frechet_distance(stats.mean(), stats.cov(), ref.mean(), ref.cov()), "n": stats.n, "n_ref": ref.n}
    if feats is not None and ref_feats is not None:
        out.update(prdc(ref_feats, feats, k_pr=k_pr, k_dc=k_dc))
    return out
