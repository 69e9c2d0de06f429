"""How far each made guide's prediction lies from the main's: RMS of D_main - D_guide on 512 held-out MNIST test
images noised at a few sigmas (the same noise for every guide), beside the trained XS T/16 guide. A guide whose
prediction stays next to the main's gives autoguidance little to push along at the w the study tunes.

    .venv/bin/python scripts/measure_guide_distance.py --guides runs/guides     # the folder of `guides train`
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import autoguidance as ag
from autoguidance.data import load_mnist

GUIDES = ("distill-main-free-030", "distill-fresh-free-030", "self-synthetic-free-030", "weight-decay-free-030",
          "weight-decay-free-100", "weight-decay-data-030", "weight-decay-data-100")
SIGMAS = (0.05, 0.3, 1.0, 3.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--guides", type=Path, default=Path("runs/guides"), help="OUT of `autoguidance guides train`")
    p.add_argument("--ema", default="ema150", help="the guides' EMA subfolder (the study's: ema150)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    d = load_mnist("test", resolution=14)
    x0, y = d.images[:512], d.labels[:512]
    noise = torch.randn_like(x0)
    main_net = ag.load("mnist-s-T-ema050")
    nets = {"trained XS T/16 (xs-T16-ema150)": ag.load("mnist-xs-T16-ema150")}
    for name in GUIDES:
        folder = a.guides / "guides" / name / a.ema
        if not (folder / "config.json").exists():
            raise SystemExit(f"error: no guide {folder}: make the study's guides with "
                             f"`autoguidance guides train --out {a.guides}`")
        nets[name] = ag.load(folder)
    print("RMS of D_main - D_guide (x0 units, images in [-1, 1])\n")
    print("| guide | " + " | ".join(f"sigma {s:g}" for s in SIGMAS) + " |")
    print("|---|" + "---|" * len(SIGMAS))
    with torch.no_grad():
        ref = {s: main_net(x0 + s * noise, torch.full((len(x0),), s), y) for s in SIGMAS}
        for name, g in nets.items():
            rms = [((ref[s] - g(x0 + s * noise, torch.full((len(x0),), s), y)) ** 2).mean().sqrt().item()
                   for s in SIGMAS]
            print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in rms) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
