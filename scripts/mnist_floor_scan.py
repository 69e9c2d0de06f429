"""How many images per seed set does FD_mnist need? Real training images (drawn as `autoguidance mnist floor` draws
them) against the unguided S main (EMA 0.050, Heun 12 steps) at N = 300, 1000, 2000, seed sets 1 and 2, all
measured against the 1000-image test split. Prints the Markdown table of docs/mnist.md.

    python scripts/mnist_floor_scan.py [--store DIR]     # about 8 minutes on one core without a store

Evaluations go to the image tables' store (default /tmp/mnist-floor-scan), so the N = 1000 rows are shared with
`autoguidance mnist ... --store` runs on the same folder.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from autoguidance.experiments.image_tables import FULL, Lab, _b_none, _real_runs
from autoguidance.experiments.image_sets import MNIST14


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="/tmp/mnist-floor-scan", help="folder of finished evaluations")
    ap.add_argument("--sizes", default="300,1000,2000")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sets = (1, 2)
    print("| N per seed set | main: FD_mnist | main: precision | real: FD_mnist | real: precision |")
    print("|---|---|---|---|---|")
    for n in (int(v) for v in args.sizes.split(",")):
        lab = Lab(replace(FULL, n=n, batch=min(FULL.batch, n), eval_sets=sets), progress=False, data=MNIST14,
                  store=args.store)
        model = [lab.evaluate("none:s-T", _b_none, {"main": "s-T-ema050"}, s) for s in sets]
        real = _real_runs(lab, n)["runs"]
        cell = (lambda runs, m: ", ".join(f"{r[m]:.2f}" for r in runs))
        print(f"| {n} | {cell(model, 'fd')} | {cell(model, 'precision')} | {cell(real, 'fd')} | "
              f"{cell(real, 'precision')} |", flush=True)


if __name__ == "__main__":
    main()
