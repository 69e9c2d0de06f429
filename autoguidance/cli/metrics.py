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
from pathlib import Path

from ..metrics.evaluate import accumulate, reference, score
from ..metrics.extractors import SPACES, check_weights, get_extractor
from ..runs import dist
from ..runs.files import write_json
from ..runs.record import check_out, run_record
from ..runs.sources import collect_units
from .options import check_positive

__all__ = ["add_parser", "add_metric_arguments", "vars_config"]


def _run(args) -> int:
    check_weights(args.space, args.inception_weights, args.dinov2_weights,   # fail before reading anything
                  trust_pickle=args.trust_pickle)
    check_positive(args.batch, "--batch", "images per feature-network call")
    if args.ref_n < 1:
        raise ValueError(f"--ref-n must be a positive number of reference samples, got {args.ref_n}")
    if args.out is not None:
        check_out(args.out)
    dist.init()
    try:
        extractor = get_extractor(args.space, inception_weights=args.inception_weights,
                                  dinov2_weights=args.dinov2_weights, trust_pickle=args.trust_pickle,
                                  batch=args.batch, device=dist.device(args.device))
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
    g.add_argument("--trust-pickle", action="store_true",
                   help="also load a pickle / TorchScript / .pt2 feature network (RUNS CODE from the file; only for "
                        "files you trust, e.g. NVlabs' inception-2015-12-05.pkl)")
    g.add_argument("--inception-weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (pytorch-fid's state dict; FID); never downloaded")
    g.add_argument("--dinov2-weights", default=None,
                   help="dinov2_vitl14_pretrain.pth (the official state dict; FD_DINOv2); never downloaded")
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
