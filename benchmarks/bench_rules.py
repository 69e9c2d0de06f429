"""What a combination rule costs on top of the linear combination, on the shipped digits U-Net.

One process, one torch thread, per-thread CPU time, two measurements side by side:

1. **the rule's own cost**: the combination step of `Guided` (`_combine`: spaces, the rule, state, back to x0) on
   the two passes' outputs of one call, repeated `--reps` times, as a share of one linear guided call (timed in the
   same loop). This is what a rule adds to a call, free of the network's run-to-run noise.
2. **end to end**: whole EDM Heun runs (`--steps` steps, 2 steps - 1 guided calls) with each rule, interleaved with
   the order rotated every round; the ratio `rule / linear` is paired within a round, median over rounds. On a
   loaded machine its noise (a few %) is larger than the rules' cost.

Autoguidance of the S main (`digits-s-T-ema050`) by the XS guide at T/16 (`digits-xs-T16-ema050`), w = 3,
`--batch` rows. CFG-Zero* runs with `zero_init_steps=0` here, so it computes the same passes as the others (its
zero-init steps compute none, which only saves time).

    PYTHONPATH=. python benchmarks/bench_rules.py             # a few minutes on one core
    PYTHONPATH=. python benchmarks/bench_rules.py --quick     # smoke test

Writes `benchmarks/results/rules.json` and the cost section of `docs/rules.md` (between its bench_rules markers).
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
from autoguidance.rules import APG, FDG, MAMBO, TCFG, CFGZeroStar, Linear, Rescale
from autoguidance.runs.files import write_json, write_text

ROOT = Path(__file__).resolve().parent.parent
MAIN, GUIDE = "digits-s-T-ema050", "digits-xs-T16-ema050"
W = 3.0
RULES = {
    "linear": Linear(),
    "rescale": Rescale(0.7),
    "apg": APG(eta=0.0, norm_threshold=15.0, momentum=-0.5),
    "apg (eps)": APG(eta=0.0, norm_threshold=15.0, momentum=-0.5, space="eps"),
    "cfg-zero": CFGZeroStar(zero_init_steps=0),
    "tcfg": TCFG(),
    "fdg": FDG(scales=(1.0, 0.5)),
    "mambo": MAMBO(),
}
START, END = "<!-- bench_rules: start -->", "<!-- bench_rules: end -->"


def _timed(fn) -> float:
    t = time.thread_time()
    with torch.no_grad():
        fn()
    return time.thread_time() - t


def measure(batch: int, steps: int, rounds: int, reps: int) -> dict:
    main, guide = ag.load(MAIN), ag.load(GUIDE)
    sigmas = ag.sigmas_karras(steps)
    x0 = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    labels = torch.nn.functional.one_hot(torch.arange(batch) % 10, 10).float()
    seeds = list(range(batch))
    runs = {}
    for name, rule in RULES.items():
        D = ag.autoguidance(main, guide, W, rule=rule)
        runs[name] = (lambda D=D: ag.sample_heun(D, x0.clone(), sigmas, labels=labels, seeds=seeds, progress=False))
    keys = list(runs)
    share = own_cost(main, guide, x0, labels, reps)
    for k in keys:                                      # warm-up
        _timed(runs[k])
    times = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            times[k].append(_timed(runs[k]))
    calls = 2 * steps - 1
    ratios = {k: statistics.median(a / b for a, b in zip(times[k], times["linear"])) for k in keys}
    return {"batch": batch, "steps": steps, "rounds": rounds, "calls_per_run": calls, "reps": reps, **share,
            "ms_per_call": {k: 1e3 * statistics.median(v) / calls for k, v in times.items()},
            "ratio_to_linear": ratios, "all_seconds": times}


def own_cost(main, guide, x, labels, reps: int) -> dict:
    """`{'combine_ms': {rule: ms}, 'call_ms': ms, 'share': {rule: combine / linear call}}` at sigma = 3, inside a
    sampler context (APG's momentum state exists)."""
    from autoguidance.rng import SamplingRun, noise_context

    sigma = torch.full((len(x),), 3.0)
    xs = x / x.std() * 3.0
    seeds = torch.arange(len(x))
    outs = None
    comb, call_t = {}, []
    with torch.no_grad(), noise_context(seeds, 0, SamplingRun(), sigma):
        for name, rule in RULES.items():
            D = ag.autoguidance(main, guide, W, rule=rule)
            outs = [main(xs, sigma, labels), guide(xs, sigma, labels)]
            jobs = [(D.main, None), (D.guides[0].pass_, None)]
            active = [(0, W - 1)]
            for _ in range(10):
                D._combine(xs, sigma, None, active, jobs, outs)
            t = time.thread_time()
            for _ in range(reps):
                D._combine(xs, sigma, None, active, jobs, outs)
            comb[name] = 1e3 * (time.thread_time() - t) / reps
            lin = ag.autoguidance(main, guide, W)
            t = time.thread_time()
            for _ in range(max(3, reps // 50)):
                lin(xs, sigma, labels)
            call_t.append(1e3 * (time.thread_time() - t) / max(3, reps // 50))
    call = statistics.median(call_t)
    return {"combine_ms": comb, "call_ms": call, "share": {k: v / call for k, v in comb.items()}}


def render(rec: dict) -> str:
    lines = [START, "",
             f"Cost of a rule (benchmarks/bench_rules.py, {rec['date']}, {rec['machine']}, load average "
             f"{rec['load_start']} at the start, {rec['load_end']} at the end): autoguidance of the digits U-Net S by "
             f"the XS guide at T/16, w = {W:g}, {rec['batch']} rows, EDM Heun {rec['steps']} steps "
             f"({rec['calls_per_run']} guided calls), one torch thread, per-thread CPU time, median over "
             f"{rec['rounds']} interleaved rounds of the ratio to the linear rule in the same round.", "",
             f"The rule's own cost is its combination step on one call's outputs ({rec['reps']} repetitions) as a "
             f"share of a linear guided call ({rec['call_ms']:.1f} ms, timed in the same loop).", "",
             "| rule | combination (ms) | share of a guided call | end to end: ms per call | end to end: ratio to "
             "linear |", "|---|---:|---:|---:|---:|"]
    for k, v in rec["ratio_to_linear"].items():
        lines.append(f"| `{RULES[k].describe()}` | {rec['combine_ms'][k]:.3f} | {100 * rec['share'][k]:.2f}% | "
                     f"{rec['ms_per_call'][k]:.2f} | {v:.3f} |")
    worst = max((v, k) for k, v in rec["share"].items())
    noise = max(abs(v - 1) for v in rec["ratio_to_linear"].values())
    lines += ["", f"The most expensive rule, {worst[1]}, costs {100 * worst[0]:.2f}% of a guided call. The end-to-end "
              f"ratios scatter by up to {100 * noise:.1f}% around 1 in this run (load average above).", "", END]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=500, help="repetitions of the combination step per rule")
    ap.add_argument("--quick", action="store_true", help="smoke test: 8 rows, 3 steps, 2 rounds; writes nothing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.batch, args.steps, args.rounds, args.reps = 8, 3, 2, 20
    load0 = os.getloadavg()[0]
    rec = measure(args.batch, args.steps, args.rounds, args.reps)
    rec.update(date=time.strftime("%Y-%m-%d"), machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
               torch=torch.__version__, load_start=round(load0, 2), load_end=round(os.getloadavg()[0], 2))
    for k, v in rec["ratio_to_linear"].items():
        print(f"{k:10s} combination {rec['combine_ms'][k]:.3f} ms = {100 * rec['share'][k]:.2f}% of a call; end to "
              f"end {rec['ms_per_call'][k]:7.2f} ms/call, ratio {v:.3f}")
    if args.quick:
        return 0
    write_json(ROOT / "benchmarks" / "results" / "rules.json", rec)
    doc = ROOT / "docs" / "rules.md"
    text = doc.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{doc} has no {START} ... {END} section to write the table into")
    head, rest = text.split(START, 1)
    write_text(doc, head + render(rec) + rest.split(END, 1)[1].lstrip("\n"))
    print(f"wrote benchmarks/results/rules.json and the cost section of {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
