"""Cost of in-situ guidance: wall time per sample against unguided sampling, and peak memory against two-model
autoguidance (issue 3, item 7).

Methods, all at w = 3 (the in-situ paper's w' = 2) on every step:

    unguided              the net alone: 1 forward call of N rows per step
    insitu-batched        in-situ guidance, dropout p = 0.1 at the net's nn.Dropout sites: ONE call of 2N rows
    insitu-2calls         the same with max_batch = N: two sequential calls of N rows (exact, then degraded)
    autoguidance-2models  two-model autoguidance: the net, then a second net of the same architecture
    net-2N                reference, no guidance: the net alone on 2N rows in one call, timed per N samples (the
                          network work of the batched in-situ call without its dropout masks)

Models: the toy denoiser MLP (width 64, 4 layers, x of shape [2]), a small EDM2 U-Net (16 x 16 x 3,
model_channels 64, channel_mult [1, 2, 2], 2 blocks per level, attention at 8 x 8; 6.75M parameters) and the same
U-Net at EDM2-XS width (model_channels 128; 27.0M parameters; batches 16 and 64 only), all freshly initialised with
the output gains set to 1 (the speed does not depend on training).

Time: EDM Euler sampling for a few steps at batch sizes 1 ... 256; the methods run round-robin (order rotated
every round) in one process, so machine noise hits all alike; reported is the median over rounds, per sample,
and its ratio to unguided. Memory: each (method, batch) runs in a fresh subprocess that builds its nets, notes
its resident set size (RSS), resets the kernel's peak-RSS counter (/proc/self/clear_refs), runs one guided
denoiser call, and reports the peak RSS (VmHWM); the cost of a method is its peak minus the unguided peak.
(tracemalloc does not see torch's allocations, and torch has no CPU allocator statistics.)

    python benchmarks/bench_insitu.py [--quick] [--threads 1] [--json ...] [--doc docs/benchmarks.md]
    python benchmarks/bench_insitu.py --render benchmarks/results/insitu.json     # rewrite the doc only
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import autoguidance as ag
from autoguidance.runs.files import write_json, write_text
from autoguidance.nets.edm2 import EDM2Precond
from autoguidance.nets.toy import DenoiserMLP

ROOT = Path(__file__).resolve().parent.parent
W = 3.0          # guidance weight, D_bad + w (D_good - D_bad): the in-situ paper's w' = 2.0
P = 0.1          # dropout probability of the degraded pass (in-situ autoguidance)
UNET = dict(img_resolution=16, img_channels=3, label_dim=0, model_channels=64, channel_mult=[1, 2, 2],
            num_blocks=2, attn_resolutions=[8])
UNET_WIDE = dict(UNET, model_channels=128)
MODELS = {
    #          shape of one sample, sampler steps, sigma_max, batch sizes timed
    "toy":       dict(shape=[2], steps=8, sigma_max=5.0, batches=[1, 4, 16, 64, 256]),
    "unet":      dict(shape=[3, 16, 16], steps=2, sigma_max=80.0, batches=[1, 4, 16, 64, 256]),
    "unet-wide": dict(shape=[3, 16, 16], steps=2, sigma_max=80.0, batches=[16, 64]),
}
METHODS = ["unguided", "insitu-batched", "insitu-2calls", "autoguidance-2models"]
TIMED = METHODS + ["net-2N"]


def build(model: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = DenoiserMLP(width=64, num_layers=4) if model == "toy" else EDM2Precond(**(UNET_WIDE if model == "unet-wide"
                                                                                    else UNET))
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(1.0)   # gains start at 0 (F = 0); a trained net has them non-zero
    return net.eval().requires_grad_(False)


def denoiser(method: str, net, guide, batch: int):
    if method in ("unguided", "net-2N"):
        return ag.no_guidance(net)
    if method == "insitu-batched":
        return ag.insitu(net, W, P)
    if method == "insitu-2calls":
        return ag.insitu(net, W, P, max_batch=batch)
    if method == "autoguidance-2models":
        return ag.autoguidance(net, guide, W)
    raise ValueError(f"unknown method {method!r}; expected one of {TIMED}")


def sample(D, model: str, batch: int) -> None:
    """EDM Euler sampling of `batch` images (net-2N: called with 2N)."""
    spec = MODELS[model]
    sigmas = ag.sigmas_karras(spec["steps"], sigma_max=spec["sigma_max"])
    x = torch.randn(batch, *spec["shape"]) * sigmas[0]
    with torch.no_grad():
        ag.sample_euler(D, x, sigmas, seeds=range(batch), progress=False)


def time_model(model: str, batches: list[int], rounds: int) -> list[dict]:
    net, guide = build(model, 0), build(model, 1)
    rows = []
    for batch in batches:
        Ds = {m: denoiser(m, net, guide, batch) for m in TIMED}
        rows_of = {m: 2 * batch if m == "net-2N" else batch for m in TIMED}
        times = {m: [] for m in TIMED}
        calls = {}
        for m in TIMED:   # warm-up (first-call allocations, thread pools), counting the forward calls per step
            counted = []
            handles = [n.register_forward_pre_hook(lambda mod, a: counted.append(len(a[0]))) for n in (net, guide)]
            try:
                sample(Ds[m], model, rows_of[m])
            finally:
                for h in handles:
                    h.remove()
            calls[m] = len(counted) // MODELS[model]["steps"]
            if calls[m] != CALLS_PER_STEP[m]:
                raise RuntimeError(f"{m} made {calls[m]} forward calls per step, expected {CALLS_PER_STEP[m]}")
        n_rounds = rounds if batch <= 64 else max(1, rounds - 2)   # batch 256 is slow and steadier
        for r in range(n_rounds):
            order = TIMED[r % len(TIMED):] + TIMED[:r % len(TIMED)]
            for m in order:
                t0 = time.perf_counter()
                sample(Ds[m], model, rows_of[m])
                times[m].append(time.perf_counter() - t0)
        per_sample = {m: statistics.median(times[m]) / batch for m in TIMED}
        fastest = {m: min(times[m]) / batch for m in TIMED}
        rows.append(dict(model=model, batch=batch, rounds=n_rounds, steps=MODELS[model]["steps"],
                         ms_per_sample={m: 1e3 * v for m, v in per_sample.items()},
                         ratio={m: per_sample[m] / per_sample["unguided"] for m in TIMED},
                         ratio_of_fastest={m: fastest[m] / fastest["unguided"] for m in TIMED},
                         seconds=times, forward_calls_per_step=calls))
        print(f"{model:9s} batch {batch:4d}: " + "  ".join(
            f"{m} {1e3 * per_sample[m]:8.3f} ms ({per_sample[m] / per_sample['unguided']:.2f}x)" for m in TIMED),
            flush=True)
    return rows


# -- memory, in fresh subprocesses -------------------------------------------------------------------------------

def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024   # kB


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0), so the peak of the run is
    not hidden under the peak of `import torch`. Without it, fall back to getrusage's lifetime peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_probe(model: str, method: str, batch: int) -> dict:
    """Runs in a fresh process: build the nets the method needs, run one guided D call, report RSS before the
    call (`setup_mb`: interpreter, torch, weights) and the peak RSS during it (`peak_mb`)."""
    net = build(model, 0)
    guide = build(model, 1) if method == "autoguidance-2models" else None
    D = denoiser(method, net, guide, batch)
    x = torch.randn(batch, *MODELS[model]["shape"])
    with torch.no_grad():
        D(x[:1], torch.ones(1))   # first-call setup (thread pools, kernels) is not the method's cost
    setup = _status_mb("VmRSS")
    exact = _reset_peak()
    with torch.no_grad():
        D(x, torch.full((batch,), 1.0))
    peak = _status_mb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    weights = sum(p.numel() * p.element_size() for n in (net, guide) if n is not None for p in n.parameters())
    return dict(model=model, method=method, batch=batch, setup_mb=setup, peak_mb=peak, peak_exact=exact,
                weights_mb=weights / 2**20)


def measure_memory(model: str, batches: list[int], repeats: int = 3) -> list[dict]:
    """Peak RSS per (method, batch): the median of `repeats` fresh processes (the allocator's reuse of freed
    memory makes single readings vary by tens of MB)."""
    rows = []
    for batch in batches:
        for m in METHODS:
            probes = []
            for _ in range(repeats):
                out = subprocess.run([sys.executable, __file__, "--probe", model, m, str(batch)], capture_output=True,
                                     text=True, check=True, env={k: v for k, v in os.environ.items()})
                probes.append(json.loads(out.stdout.strip().splitlines()[-1]))
            rec = dict(probes[0], peak_mb=statistics.median(p["peak_mb"] for p in probes),
                       peaks_mb=[p["peak_mb"] for p in probes])
            rows.append(rec)
        base = next(r for r in rows if r["batch"] == batch and r["method"] == "unguided")   # rows of this model only
        for r in rows:
            if r["batch"] == batch:
                r["extra_mb"] = r["peak_mb"] - base["peak_mb"]
        print(f"{model} memory batch {batch}: " + "  ".join(
            f"{r['method']} peak {r['peak_mb']:.0f} MB ({_mb(r['extra_mb'])})" for r in rows if r["batch"] == batch),
            flush=True)
    return rows


# -- report ------------------------------------------------------------------------------------------------------

NAMES = {"unguided": "unguided (1 call of N rows)", "insitu-batched": "in-situ, 1 call of 2N rows",
         "insitu-2calls": "in-situ, 2 calls of N rows", "autoguidance-2models": "two-model autoguidance (2 calls)"}
NAMES["net-2N"] = "the net alone, 1 call of 2N rows"
CALLS_PER_STEP = {"unguided": 1, "insitu-batched": 1, "insitu-2calls": 2, "autoguidance-2models": 2, "net-2N": 1}


def time_table(rows: list[dict]) -> str:
    head = "| model | batch | " + " | ".join(NAMES[m] for m in TIMED) + " |"
    lines = [head, "|" + "---|" * (2 + len(TIMED))]
    for r in rows:
        cells = [f"{r['ms_per_sample']['unguided']:.3f} ms"] + [
            f"{r['ms_per_sample'][m]:.3f} ms (**{r['ratio'][m]:.2f}x**)" for m in TIMED[1:]]
        lines.append(f"| {r['model']} | {r['batch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mb(x: float) -> str:
    return f"{round(x):+d}"


def memory_table(rows: list[dict]) -> str:
    cases = sorted({(r.get("model", "unet"), r["batch"]) for r in rows}, key=lambda c: (list(MODELS).index(c[0]), c[1]))
    lines = ["| model | weights | batch | " + " | ".join(NAMES[m] for m in METHODS) + " |",
             "|" + "---|" * (3 + len(METHODS))]
    for model, b in cases:
        by = {r["method"]: r for r in rows if r.get("model", "unet") == model and r["batch"] == b}
        cells = [f"{by['unguided']['peak_mb']:.0f} MB"] + [
            f"{by[m]['peak_mb']:.0f} MB ({_mb(by[m]['extra_mb'])} MB)" for m in METHODS[1:]]
        lines.append(f"| {model} | {by['unguided']['weights_mb']:.0f} MB | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _goal_line(row: dict, label: str) -> str:
    r, f = row["ratio"], row.get("ratio_of_fastest", {})
    one, two, auto = r["insitu-batched"], r["insitu-2calls"], r["autoguidance-2models"]
    verdict = lambda x: "within the goal" if x <= 2.1 else "above the goal"
    text = (f"{label}: in-situ guidance costs **{one:.2f}x** the unguided wall time per sample as one batched call "
            f"({verdict(one)}) and **{two:.2f}x** as two calls of N rows ({verdict(two)}); two-model "
            f"autoguidance {auto:.2f}x.")
    if "net-2N" in r:
        text += (f" The net alone on 2N rows in one call costs {r['net-2N']:.2f}x: the one-call figure is that "
                 f"{'plus' if one >= r['net-2N'] else 'minus'} {abs(one - r['net-2N']):.2f} for the dropout masks "
                 f"and bookkeeping (differences below about 0.1 are within the noise of the medians).")
    if f:
        text += (f" On the fastest of the {row['rounds']} rounds instead of the median: one call "
                 f"{f['insitu-batched']:.2f}x, two calls {f['insitu-2calls']:.2f}x, two-model "
                 f"{f['autoguidance-2models']:.2f}x.")
    return text


def _memory_note(m: list[dict], model: str) -> str:
    rows = [r for r in m if r.get("model", "unet") == model]
    if not rows:
        return ""
    b = max(r["batch"] for r in rows)
    by = {r["method"]: r for r in rows if r["batch"] == b}
    one, two, auto = (by[k]["extra_mb"] for k in ("insitu-batched", "insitu-2calls", "autoguidance-2models"))
    share = lambda x: ("more than a second model costs" if x > 1.05 * auto else
                       "about what a second model costs" if x >= 0.95 * auto else
                       f"{100 * max(x, 0) / auto:.0f}% of what a second model costs")
    return (f"{model}, batch {b} ({by['unguided']['weights_mb']:.0f} MB of weights per net): in-situ guidance "
            f"needs {_mb(one)} MB over unguided as one call ({share(one)}) and {_mb(two)} MB as two calls "
            f"({share(two)}); two-model autoguidance needs {_mb(auto)} MB.")


def write_doc(path: Path, result: dict) -> None:
    t, m, env = result["time"], result["memory"], result["environment"]
    u, params = UNET, result.get("params", {"unet": result.get("unet_params", float("nan"))})
    goals = [_goal_line(r, f"{r['model']} ({params.get(r['model'], float('nan')) / 1e6:.2f}M parameters), batch 64")
             for r in t if r["model"] != "toy" and r["batch"] == 64]
    notes = [n for n in (_memory_note(m, k) for k in MODELS) if n]
    load = (f"Load average (1 min) {env['load_before'][0]:.2f} before the run and {env['load_after'][0]:.2f} "
            f"after, on {env['cpu_count']} cores.")
    if env["busy"]:
        load += (" The 1-minute load average exceeded half the cores at one end of the run (other jobs, or the "
                 "run's own tail): absolute times may be inflated, and ratios carry noise of several percent.")
    if env.get("threads_note"):
        load += " " + env["threads_note"]
    rounds = result["settings"]["rounds"]
    text = f"""# Benchmarks

## In-situ guidance: time and memory

Made by `{result['command']}` (this file and `benchmarks/results/insitu.json`; {result['seconds']:.0f} s).

All guided methods here need two predictions per sampling step (w = 3 on every step), so their floor is twice the
unguided network work. In-situ guidance (dropout p = 0.1 at the net's `nn.Dropout` sites, the in-situ paper's
setting) puts both passes into ONE forward call of 2N rows, which `autoguidance.insitu` does by default; with
`max_batch=N` it makes two calls of N rows instead. Two-model autoguidance always makes two calls, one per net;
its guide here has the main net's architecture (EDM2's XS guide has about 45% of the S main net's weights).

- Models: the toy denoiser MLP (width 64, 4 layers, 2-D samples); `unet`, a small EDM2 U-Net
  ({u['img_resolution']}x{u['img_resolution']}x{u['img_channels']}, model_channels {u['model_channels']},
  channel_mult {u['channel_mult']}, {u['num_blocks']} blocks per level, attention at 8x8,
  {params.get('unet', float('nan')) / 1e6:.2f}M parameters); and `unet-wide`, the same at EDM2-XS width
  (model_channels {UNET_WIDE['model_channels']}, {params.get('unet-wide', float('nan')) / 1e6:.2f}M parameters). All
  freshly initialised (speed does not depend on training).
- Time: EDM Euler sampling, {MODELS['toy']['steps']} steps on the toy and {MODELS['unet']['steps']} on the U-Nets.
  The methods run round-robin in one process, the order rotated every round, so machine noise hits all alike;
  the table gives the median over {rounds} rounds ({max(1, rounds - 2)} at batch 256) divided by the batch size,
  and the ratio to unguided at the same batch size. The last column is not a guidance method: the net alone on
  2N rows in one call (per N samples), the network work of the one-call in-situ pass without its dropout masks.
- Memory: every reading is a fresh process that builds the nets its method needs, makes one warm-up call of one
  row, resets the kernel's peak-RSS counter (`/proc/self/clear_refs`), makes one guided denoiser call, and reads
  the peak resident set size (`VmHWM`); a cell is the median of {result['settings'].get('memory_repeats', 1)}
  such processes (single readings vary by tens of MB with the allocator's reuse of freed memory). The difference
  to the unguided cell is the method's cost, weights included. (`tracemalloc` does not see torch's allocations,
  and torch keeps no CPU allocator statistics.)

**Goal check** (at most 2.1x the unguided time per sample at batch 64 on the U-Net):

{chr(10).join('- ' + g for g in goals) or '- not measured (no U-Net at batch 64 in this run, e.g. `--quick`)'}

On this shared 2-core VM the ratios move by up to about 0.2 between runs of the whole script (the history of
`benchmarks/results/insitu.json` keeps earlier runs), more than within one run, where the methods alternate: read
the columns of one run against each other, and a difference below that as a tie.

### Wall time per sample (ratio to unguided)

{time_table(t)}

On the toy, one call costs little network work, so the per-call bookkeeping of guidance (per-site keys and
dropout masks, concatenation, the combination) shows in the ratio; on the U-Nets the network work dominates, and
the wider the net, the smaller the masks' share (their cost grows with the activations, a convolution's with
activations times channels).

### Peak memory during one denoiser call (in parentheses: more than unguided)

{memory_table(m)}

{chr(10).join('- ' + n for n in notes)}

Two-model autoguidance pays for a second set of weights at every batch size. In-situ guidance holds no second set
of weights; as one call it keeps the activations of 2N rows alive at once (a U-Net keeps its encoder outputs for
the decoder), as two calls (`max_batch=N`) those of N rows at a time, plus one site's dropout multipliers and the
first call's output. On small nets a call of 2N rows can therefore cost more than a second model; the weights of
real models are far larger (EDM2-S: 280M parameters, 1.1 GB in fp32; its XS guide 125M, 0.5 GB), and `max_batch`
bounds the activations.

### Machine

torch {env['torch']} with {env['threads']} intra-op threads, Python {env['python']}, {env['machine']}. {load}
"""
    write_text(path, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small batches and one round (a smoke test)")
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds per batch size")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice); 1 gives steadier ratios on a busy machine")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "insitu.json"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"), help="Markdown report ('' = none)")
    ap.add_argument("--render", metavar="JSON", help="only rewrite --doc from the numbers of an earlier run")
    ap.add_argument("--probe", nargs=3, metavar=("MODEL", "METHOD", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        print(json.dumps(memory_probe(args.probe[0], args.probe[1], int(args.probe[2]))))
        return 0
    if args.render:
        write_doc(Path(args.doc), json.loads(Path(args.render).read_text()))
        print(f"wrote {args.doc}")
        return 0

    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)   # for the memory subprocesses
    t0 = time.time()
    load_before = os.getloadavg()
    rounds = 1 if args.quick else args.rounds
    models = ["toy", "unet"] if args.quick else list(MODELS)
    rows = [r for k in models for r in time_model(k, [1, 4] if args.quick else MODELS[k]["batches"], rounds)]
    repeats = 1 if args.quick else 3
    memory = measure_memory("unet", [1, 4] if args.quick else [1, 16, 64], repeats)
    if not args.quick:
        memory += measure_memory("unet-wide", [64], repeats)
    load_after = os.getloadavg()
    busy = max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1)
    env = dict(cpu_count=os.cpu_count(), machine=platform.machine(), torch=torch.__version__,
               threads=torch.get_num_threads(), python=platform.python_version(), load_before=load_before,
               load_after=load_after, busy=busy,
               threads_note=(f"Run with `--threads {args.threads}`: with other jobs on every core, more threads "
                             "only wait for each other." if args.threads else ""))
    given = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/bench_insitu.py" + "".join(f" {a}" for a in given)
    result = dict(command=command, time=rows, memory=memory, environment=env, seconds=time.time() - t0,
                  params={k: sum(p.numel() for p in build(k, 0).parameters()) for k in MODELS},
                  settings=dict(w=W, p=P, unet=UNET, unet_wide=UNET_WIDE, models=MODELS, rounds=rounds,
                                memory_repeats=repeats))
    write_json(args.json, result)
    if args.doc:
        write_doc(Path(args.doc), result)
    print(f"wrote {args.json}" + (f" and {args.doc}" if args.doc else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
