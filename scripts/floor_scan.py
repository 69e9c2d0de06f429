"""How many images per seed set does an image set's metric need? Real training images (drawn as `autoguidance <set>
floor` draws them) against the unguided S main (EMA 0.050, Heun 12 steps) at several N, seed sets 1 and 2, in every
feature space of the set (MNIST: FD_mnist; Fashion-MNIST: FD_cls, FD_ssl and pixels). Prints a Markdown table.

    python scripts/floor_scan.py --set mnist --sizes 300,1000,2000      # docs/mnist.md (about 8 minutes on one core)
    python scripts/floor_scan.py --set fashion --sizes 250,500,1000     # docs/fashion.md

Evaluations go to the image tables' store (`--store`, default /tmp/<set>-floor-scan); with the store of the set's
tables (e.g. docs/fashion/.evaluations) the rows at the tables' N are shared with them.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from autoguidance.experiments.image_sets import IMAGE_SETS
from autoguidance.experiments.image_tables import FULL, Lab, _b_none, _real_runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", default="mnist", choices=sorted(k for k in IMAGE_SETS if k != "digits"))
    ap.add_argument("--store", default=None, help="folder of finished evaluations (default /tmp/<set>-floor-scan)")
    ap.add_argument("--sizes", default="300,1000,2000")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = IMAGE_SETS[args.set]
    full = replace(FULL, **dict(data.full))
    sets = (1, 2)
    spaces = [("", data.fd_name)] + [(p, f"FD_{p}") for p, _ in data.spaces[1:]]
    head = ["N per seed set"] + [f"{who}: {name}" for _, name in spaces for who in ("main", "real")] + \
        ["main: precision", "real: precision"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for n in (int(v) for v in args.sizes.split(",")):
        lab = Lab(replace(full, n=n, batch=min(full.batch, n), eval_sets=sets), progress=False, data=data,
                  store=args.store or f"/tmp/{args.set}-floor-scan")
        model = [lab.evaluate("none:s-T", _b_none, {"main": "s-T-ema050"}, s) for s in sets]
        real = _real_runs(lab, n)["runs"]
        cell = (lambda runs, m: ", ".join(f"{r[m]:.2f}" if r[m] >= 1 or m.endswith("precision") else f"{r[m]:.3f}"
                                          for r in runs))
        cells = [cell(runs, f"{p}_fd" if p else "fd") for p, _ in spaces for runs in (model, real)]
        print(f"| {n} | " + " | ".join(cells) + f" | {cell(model, 'precision')} | {cell(real, 'precision')} |",
              flush=True)


if __name__ == "__main__":
    main()
