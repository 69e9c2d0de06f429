"""What a made guide costs at sampling: per-image sampling time of autoguidance with each guide architecture that
`autoguidance make-guide` makes for the MNIST S main, against CFG and against unguided sampling, as ratios measured
side by side in ONE process.

A guide's sampling cost depends only on its architecture, never on how it was trained, so the guides are:

- `distill` at the study's width (12 of the main's 16 channels: the architecture of the shipped XS, `xs-T16-ema050`,
  which the study's distilled guides share) and at the reducer's default width 2/3 (11 channels, built from
  `reduce_config`; its weights are a fresh init: time does not depend on them);
- `self-synthetic`, `weight-decay`, `snapshot`: full-size copies of the main (`s-T16-ema050` stands for them);
- CFG both ways: the main's own unconditional pass (labels dropped; one batched call of 2N rows) and the study's
  CFG row (the separate unconditional XS at T, `xs-uncond-T-ema050`).

Timing: EDM Heun, `--steps` steps (the tables' 12), w = 2; per-thread CPU time (`time.thread_time`), one torch
thread; the methods interleaved in every round with the order rotated; the table gives the median over rounds of
each method's time per image and of its ratio to unguided and to CFG paired within a round. FLOPs ratios (counted,
not timed) beside them.

    python benchmarks/bench_guides.py                 # about 10 minutes on one core; writes the doc's cost block
    python benchmarks/bench_guides.py --quick         # smoke test

Writes `benchmarks/results/guides.json` and the `cost` block of `docs/guides.md`.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import autoguidance as ag
from autoguidance.experiments.guides_study import fill_block
from autoguidance.experiments.image_sets import MNIST14
from autoguidance.guidemaker.mains import EDM2Main
from autoguidance.guidemaker.reduce import reduce_config
from autoguidance.nets.edm2 import EDM2Precond
from autoguidance.runs.files import write_json

ROOT = Path(__file__).resolve().parent.parent
W = 2.0


def _nets():
    weights = MNIST14.weights
    main = ag.load(weights / "s-T-ema050")
    torch.manual_seed(0)
    default = EDM2Precond(**reduce_config("edm2", main.config)[0]).eval().requires_grad_(False)
    guides = {
        "autoguidance, distill XS (12 ch; = xs-T16)": ag.load(weights / "xs-T16-ema050"),
        "autoguidance, distill default width 2/3 (11 ch)": default,
        "autoguidance, full-size copy (self-synthetic / weight-decay / snapshot)": ag.load(weights / "s-T16-ema050"),
    }
    return main, guides, ag.load(weights / "xs-uncond-T-ema050")


def methods(main, guides, uncond) -> dict:
    out = {"unguided": ag.no_guidance(main),
           "CFG, the main's own unconditional pass": ag.cfg(main, W),
           "CFG, separate unconditional XS (the study's row)": ag.cfg(main, W, uncond=uncond)}
    out.update({k: ag.autoguidance(main, g, W) for k, g in guides.items()})
    return out


def flops(main, guides, uncond) -> dict:
    m = EDM2Main(MNIST14.weights / "s-T-ema050")
    f = {"main": m.flops()}
    per = {"unguided": 1.0, "CFG, the main's own unconditional pass": 2.0,
           "CFG, separate unconditional XS (the study's row)": 1.0 + m.flops(uncond.config) / f["main"]}
    per.update({k: 1.0 + m.flops(g.config) / f["main"] for k, g in guides.items()})
    return per       # model FLOPs per step, in units of one main pass


def time_one(D, n: int, steps: int, seed: int) -> float:
    labels = torch.nn.functional.one_hot(torch.arange(n) % 10, 10).float()
    t = time.thread_time()
    with torch.no_grad():
        ag.generate(D, seed * 100_000 + torch.arange(n), [1, 14, 14], labels=labels, num_steps=steps, batch=n,
                    progress=False)
    return (time.thread_time() - t) / n


def run(batches, rounds: int, steps: int) -> dict:
    torch.set_num_threads(1)
    main, guides, uncond = _nets()
    ms = methods(main, guides, uncond)
    per_flops = flops(main, guides, uncond)
    names = list(ms)
    result = {"settings": {"batches": list(batches), "rounds": rounds, "steps": steps, "w": W, "threads": 1,
                           "machine": platform.processor() or platform.machine(),
                           "load_average": os.getloadavg()}, "flops_vs_main_pass": per_flops, "batches": {}}
    for n in batches:
        for name in names:                       # warm-up
            time_one(ms[name], min(n, 8), 2, 0)
        times = {k: [] for k in names}
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                times[name].append(time_one(ms[name], n, steps, r))
        cfg = "CFG, the main's own unconditional pass"
        rows = {}
        for k in names:
            rows[k] = {"seconds_per_image": statistics.median(times[k]),
                       "vs_unguided": statistics.median(a / b for a, b in zip(times[k], times["unguided"])),
                       "vs_cfg": statistics.median(a / b for a, b in zip(times[k], times[cfg])),
                       "flops_vs_cfg": per_flops[k] / per_flops[cfg], "rounds": times[k]}
        result["batches"][str(n)] = rows
    result["settings"]["load_average_after"] = os.getloadavg()
    return result


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [f"Per-image sampling cost on the MNIST S main (EDM Heun {s['steps']} steps, w = {s['w']:g}, one torch "
             f"thread, per-thread CPU time, median over {s['rounds']} interleaved rounds of ratios paired within a "
             f"round; load average {s['load_average'][0]:.1f} before, {s['load_average_after'][0]:.1f} after; "
             "`python benchmarks/bench_guides.py`):", ""]
    head = ["method"] + [f"batch {n}: ms / image, vs unguided, vs CFG" for n in res["batches"]] + ["FLOPs vs CFG"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = next(iter(res["batches"].values()))
    for k in first:
        cells = [k]
        for rows in res["batches"].values():
            r = rows[k]
            cells.append(f"{1000 * r['seconds_per_image']:.2f}, {r['vs_unguided']:.2f}x, {r['vs_cfg']:.2f}x")
        cells.append(f"{first[k]['flops_vs_cfg']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: one small batch, one round, 2 steps")
    ap.add_argument("--batches", default="16,128", help="images per sampler call")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/guides.md's cost block")
    args = ap.parse_args()
    if args.quick:
        res = run([4], 1, 2)
    else:
        res = run([int(b) for b in args.batches.split(",")], args.rounds, args.steps)
    md = markdown(res)
    print(md)
    if not args.quick:
        write_json(ROOT / "benchmarks" / "results" / "guides.json", res)
        if not args.no_doc:
            fill_block(ROOT / "docs" / "guides.md", "cost", md)


if __name__ == "__main__":
    main()
