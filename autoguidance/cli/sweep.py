"""`autoguidance sweep`: metrics over a grid of guidance weights, perturbation strengths and intervals.

    autoguidance sweep --net toy-denoiser-main --gnet toy-denoiser-guide --uncond toy-denoiser-uncond \\
        --methods autoguidance,cfg --w 1,2,3,4 --sigma-max 5 --seeds 0-1023 --space raw --ref toy:A --out runs/sw
    torchrun --nproc_per_node=4 -m autoguidance.cli sweep --config base.toml --methods insitu,perturbation \\
        --perturbation blockdrop --w 1.5,2,2.5 --p 0.05,0.1,0.2 --intervals none,0.28:2.9 --space digits \\
        --ref digits-test --seeds 0-999 --out runs/sw-digits

The grid is the product methods x rules x intervals x p x w (p only for methods that use it: insitu, perturbation;
the 'none' method has one point, with the linear rule). `--rules linear,apg,rescale` sweeps combination rules; the
rule flags (`--eta 0 --momentum -0.5 ...`) apply to the rules of the grid that take them. Every point samples the same seeds (common random numbers: differences between
points are not seed noise) and is scored against one reference (`--ref` / `--ref-stats`, as in `metrics`).

Outputs in `--out`: `results.jsonl` (one line per finished point, appended under a file lock, so an interrupted
sweep resumes by skipping the points it holds; a point's key is a digest of its spec, the nets' checkpoint
digests, the seeds, classes, feature space and reference, so a rerun with any of those changed recomputes), `results.json` (all points, sorted), `sweep.png` (each metric
against w, a line per method / p / interval) and `run.json`. Points go round-robin to torchrun ranks.
Test hook: `AUTOGUIDANCE_STOP_AFTER_POINTS=N` exits each process hard after its N-th point.
"""
from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..methods import METHODS, RULE_PARAMS, MethodSpec, build_method, label_dim, load_model, model_digest, sample_shape
from ..rules import RULES
from ..metrics.evaluate import reference, score
from ..metrics.extractors import check_weights, get_extractor
from ..metrics.running import RunningStats
from ..runs import dist
from ..runs.files import atomic_path, clean_temp, write_json
from ..runs.lock import lock_run
from ..runs.record import check_out, command_line, identity_of, run_record
from ..runs.seeds import format_seeds, labels_for, parse_classes, parse_seeds
from .metrics import add_metric_arguments
from .options import add_method_arguments, check_positive, parse_floats, spec_fields_from_args

__all__ = ["grid", "point_key", "read_results", "append_result", "run_sweep", "plot_sweep", "add_parser",
           "METRIC_NAMES"]

METRIC_NAMES = ("fd", "precision", "recall", "density", "coverage", "accuracy")
_USES_P = ("insitu", "perturbation")


def parse_intervals(text: Optional[str]) -> list[Optional[tuple[float, float]]]:
    """'none,0.28:2.9' -> [None, (0.28, 2.9)]."""
    if not text:
        return [None]
    out: list[Optional[tuple[float, float]]] = []
    for part in text.split(","):
        part = part.strip()
        if part.lower() == "none":
            out.append(None)
        else:
            out.append(parse_floats(part.replace(":", ","), 2, f"--intervals entry {part!r} (LO:HI or none)"))
    return out


def _with_rule(rule: str, params: dict) -> dict:
    """The MethodSpec fields of `rule` with those of the rule parameters `params` (MethodSpec keys) it takes."""
    import dataclasses

    if rule not in RULES:
        raise ValueError(f"--rules: unknown rule {rule!r}; expected some of {', '.join(RULES)}")
    own = {f.name for f in dataclasses.fields(RULES[rule])}
    return {"rule": rule, **{k: v if RULE_PARAMS[k] in own else None for k, v in params.items()}}


def grid(base: MethodSpec, methods: Sequence[str], ws: Sequence[float], ps: Sequence[float],
         intervals: Sequence[Optional[tuple]], rules: Optional[Sequence[str]] = None,
         rule_params: Optional[dict] = None) -> list[MethodSpec]:
    """The specs of the grid, in a fixed order (method, rule, interval, p, w); duplicates removed. `rules` default:
    the base's rule; `rule_params` (MethodSpec keys of `RULE_PARAMS`, default: the base's) go to the rules of the
    grid that take them, and one that no rule takes is refused."""
    rules = list(rules) if rules else [base.rule]
    params = rule_params if rule_params is not None else {k: getattr(base, k) for k in RULE_PARAMS}
    params = {k: v for k, v in params.items() if v is not None}
    for k in params:
        if all(_with_rule(r, params)[k] is None for r in rules):
            raise ValueError(f"--{k.replace('_', '-')} is a parameter of none of the rules {', '.join(rules)}: "
                             "drop it, or add a rule that takes it to --rules")
    specs, seen = [], set()
    for m, r, iv, p, w in itertools.product(methods, rules, intervals, ps, ws):
        if m not in METHODS:
            raise ValueError(f"--methods: unknown method {m!r}; expected some of {', '.join(METHODS)}")
        if m == "cfg-interval" and iv is None:
            continue
        s = base.replace(method=m, w=1.0 if m == "none" else float(w), p=float(p) if m in _USES_P else base.p,
                         interval=None if m in ("none", "cfg-autoguidance") else iv,
                         **_with_rule("linear" if m == "none" else r, params))
        k = point_key(s)
        if k not in seen:
            seen.add(k)
            specs.append(s)
    if not specs:
        raise ValueError("the grid is empty: cfg-interval needs --intervals with bounds")
    return specs


def point_key(spec: MethodSpec, context: Optional[str] = None) -> str:
    """A grid point's identity: its full spec as canonical JSON, and (in a run) the digest `context` of all else
    that decides its scores (nets, seeds, classes, feature space, reference): `run_context`."""
    return spec.to_json() if context is None else f"{spec.to_json()}#{context}"


def run_context(specs: Sequence[MethodSpec], seeds: Sequence[int], **settings) -> str:
    """Digest of what decides a sweep's scores besides each point's spec: the nets' checkpoint digests, the
    seeds and the given settings (space, reference, classes, ...)."""
    nets = sorted({r for s in specs for r in (s.net, s.gnet, s.uncond) if r})
    return identity_of({"nets": {r: model_digest(r) for r in nets}, "seeds": [int(s) for s in seeds],
                        **settings})


def read_results(path) -> dict[str, dict]:
    """key -> result of every complete line of a results JSONL file (a torn last line is ignored)."""
    path = Path(path)
    out: dict[str, dict] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "key" in rec:
            out[rec["key"]] = rec
    return out


def append_result(path, rec: dict) -> None:
    """Append one JSON line under an exclusive lock, after mending a torn last line; flushed to disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write((json.dumps(rec, sort_keys=True) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _series(rec: dict) -> str:
    iv = rec.get("interval")
    s = rec["method"] + (f" {rec['rule']}" if rec.get("rule", "linear()") != "linear()" else "")
    if rec["method"] in _USES_P:
        s += f" p={rec['p']:g}"
    if iv:
        s += f" ({iv[0]:g},{iv[1]:g}]"
    return s


def plot_sweep(results: Sequence[dict], path, metrics: Sequence[str] = METRIC_NAMES) -> Path:
    """One panel per metric against w, one line per method / p / interval (matplotlib Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if any(m in r for r in results)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False)
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(_series(r), []).append(r)
    for ax, m in zip(axes[0], metrics):
        for name, rs in groups.items():
            rs = sorted(rs, key=lambda r: r["w"])
            style = dict(marker="o", ms=3) if len(rs) > 1 else dict(marker="*", ms=9, ls="none")
            ax.plot([r["w"] for r in rs], [r[m] for r in rs], label=name, **style)
        ax.set_xlabel("w")
        if m == "fd" and all(r.get(m, 0) > 0 for r in results):
            ax.set_yscale("log")
        ax.set_title(m + (" (lower is better)" if m == "fd" else ""), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _sample_point(D, seeds: list[int], shape, cls, dim, spec: MethodSpec, batch: int, dev):
    """`(samples [n, *shape], labels [n] int64)` of one grid point."""
    from ..sampling import generate

    labels = labels_for(seeds, cls)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(labels), dim).float().to(dev) if cls else None
    with torch.no_grad():
        x = generate(D, torch.tensor(seeds, dtype=torch.int64), shape, labels=onehot, batch=batch, device=dev,
                     progress=False, **spec.sampling()).cpu()
    return x, labels


def run_sweep(specs: Sequence[MethodSpec], seeds: Sequence[int], out, *, space: str = "raw",
              ref: Optional[str] = None, ref_stats: Optional[str] = None, ref_n: int = 10000, ref_seed: int = 0,
              prdc: bool = True, classes: Optional[str] = "all", batch: int = 256, device: Optional[str] = None,
              inception_weights: Optional[str] = None, dinov2_weights: Optional[str] = None,
              progress: bool = True, trust_code: bool = False, trust_pickle: bool = False, args=None) -> list[dict]:
    """Score every spec on `seeds`, skipping points already in `out/results.jsonl` (same point key: same spec,
    nets, seeds, classes, space and reference); returns all results (every rank), and on rank 0 writes
    results.json, sweep.png and run.json. The folder is locked while the sweep runs."""
    check_weights(space, inception_weights, dinov2_weights, trust_pickle=trust_pickle)
    out = check_out(out)
    check_positive(batch, "--batch", "images per sampler call")
    with lock_run(out, command_line(args) if args is not None else None):
        if dist.is_main():
            clean_temp(out)
        return _sweep_locked(specs, seeds, out, space=space, ref=ref, ref_stats=ref_stats, ref_n=ref_n,
                             ref_seed=ref_seed, prdc=prdc, classes=classes, batch=batch, device=device,
                             inception_weights=inception_weights, dinov2_weights=dinov2_weights,
                             progress=progress, trust_code=trust_code, trust_pickle=trust_pickle, args=args)


def _sweep_locked(specs, seeds, out, *, space, ref, ref_stats, ref_n, ref_seed, prdc, classes, batch, device,
                  inception_weights, dinov2_weights, progress, trust_code, trust_pickle, args) -> list[dict]:
    import tqdm

    dev = dist.device(device)
    extractor = get_extractor(space, inception_weights=inception_weights, dinov2_weights=dinov2_weights,
                              trust_pickle=trust_pickle, device=dev)
    ref_st, ref_feats = reference(ref, extractor, ref_stats=ref_stats, ref_n=ref_n, ref_seed=ref_seed,
                                  keep_features=prdc)
    config = {"specs": [s.to_dict() for s in specs], "space": space, "ref": ref, "ref_stats": ref_stats,
              "prdc": prdc, "classes": classes}
    context = run_context(specs, seeds, space=space, ref=ref, ref_stats=str(ref_stats) if ref_stats else None,
                          ref_n=ref_n if ref and str(ref).startswith("toy:") else None,
                          ref_seed=ref_seed if ref and str(ref).startswith("toy:") else None,
                          ref_count=int(getattr(ref_st, "n", 0) or 0), classes=classes, prdc=prdc,
                          weights=[str(inception_weights) if inception_weights else None,
                                   str(dinov2_weights) if dinov2_weights else None])

    def key(s):
        return point_key(s, context)

    if dist.is_main():
        write_json(out / "run.json", run_record(config, seeds, args, status="running", num_points=len(specs)))
    jsonl = out / "results.jsonl"
    done = read_results(jsonl)
    todo = [s for s in specs if key(s) not in done]
    dist.barrier()
    r, world = dist.rank(), dist.world_size()
    mine = todo[r::world]
    cache: dict = {}

    def load(name):
        if name not in cache:
            cache[name] = load_model(name, dev, trust_code=trust_code)
        return cache[name]

    stop_after = int(os.environ.get("AUTOGUIDANCE_STOP_AFTER_POINTS", "0") or 0)
    for n_done, spec in enumerate(tqdm.tqdm(mine, desc=f"sweep (rank 0 of {world})", unit="point",
                                            disable=not (progress and r == 0)), start=1):
        t0 = time.perf_counter()
        D = build_method(spec, load=load, device=dev, trust_code=trust_code)
        net = load(spec.net)
        shape, dim = sample_shape(net), label_dim(net)
        x, labels = _sample_point(D, list(seeds), shape, parse_classes(classes, dim), dim, spec, batch, dev)
        feats = extractor(x)
        stats = RunningStats(feats.shape[1]).update(feats)
        res = score(stats, feats if prdc else None, ref_st, ref_feats)
        correct, labelled = extractor.correct(feats, labels)
        if labelled:
            res["accuracy"] = correct / labelled
        rec = {"key": key(spec), "label": spec.label(), "method": spec.method, "w": spec.w, "p": spec.p,
               "rule": spec.make_rule().describe(),
               "interval": list(spec.interval) if spec.interval else None, **res,
               "seconds": round(time.perf_counter() - t0, 3), "rank": r}
        append_result(jsonl, rec)
        if stop_after and n_done >= stop_after:
            os._exit(3)
    dist.barrier()
    done = read_results(jsonl)
    results = [done[key(s)] for s in specs if key(s) in done]
    if dist.is_main():
        write_json(out / "results.json", {"seeds": format_seeds(seeds), "space": space, "ref": ref or ref_stats,
                                          "results": results})
        plot_sweep(results, out / "sweep.png")
        write_json(out / "run.json", run_record(config, seeds, args, status="complete", num_points=len(specs)))
    return results


def _run(args) -> int:
    check_weights(args.space, args.inception_weights, args.dinov2_weights, trust_pickle=args.trust_pickle)
    fields = spec_fields_from_args(args)
    rule_params = {k: fields.pop(k) for k in RULE_PARAMS if k in fields}      # checked per rule of the grid
    rules = [r.strip() for r in args.rules.split(",") if r.strip()] if args.rules else [fields.get("rule", "linear")]
    base = MethodSpec.from_dict({**fields, "rule": "linear"})
    if not base.net:
        raise ValueError("no model: pass --net or set net in --config")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    specs = grid(base, methods, parse_floats(args.w_grid, None, "--w"),
                 parse_floats(args.p_grid, None, "--p"),
                 parse_intervals(args.intervals), rules, rule_params)
    seeds = parse_seeds(args.seeds)
    check_positive(args.batch, "--batch", "images per sampler call")
    check_out(args.out)
    dist.init()
    try:
        results = run_sweep(specs, seeds, args.out, space=args.space, ref=args.ref, ref_stats=args.ref_stats,
                            ref_n=args.ref_n, ref_seed=args.ref_seed, prdc=not args.no_prdc, classes=args.classes,
                            batch=args.batch, device=args.device, inception_weights=args.inception_weights,
                            dinov2_weights=args.dinov2_weights, progress=not args.no_progress,
                            trust_code=args.trust_code, trust_pickle=args.trust_pickle, args=args)
        if dist.is_main():
            for rec in results:
                extra = "".join(f"  {m} {rec[m]:.4f}" for m in METRIC_NAMES[1:] if m in rec)
                print(f"{rec['label']:48s} FD {rec['fd']:.5g}{extra}")
            print(f"{len(results)} points; results in {Path(args.out) / 'results.json'}, plot sweep.png")
    finally:
        dist.shutdown()
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="metrics over a grid of w, p and intervals for several methods "
                              "(resumable; torchrun-ready)", description=__doc__.split("\n\n")[0],
                              epilog="See docs/evaluation.md.", formatter_class=argparse.RawDescriptionHelpFormatter)
    add_method_arguments(p, with_grid=True)
    gr = p.add_argument_group("grid")
    gr.add_argument("--methods", default="autoguidance", help="comma-separated methods (see `sample --method`)")
    gr.add_argument("--w", dest="w_grid", default="1,2,3", help="guidance weights, comma-separated")
    gr.add_argument("--p", dest="p_grid", default="0.1",
                    help="perturbation strengths (insitu, perturbation), comma-separated")
    gr.add_argument("--intervals", default="none", help="sigma intervals LO:HI or none, comma-separated")
    gr.add_argument("--rules", default=None, help="combination rules, comma-separated (default: the config's rule, "
                    "else linear; see `autoguidance rules`)")
    add_metric_arguments(p)
    o = p.add_argument_group("run")
    o.add_argument("--out", required=True, help="output folder (rerun on it to resume)")
    o.add_argument("--seeds", default="0-255", help="seeds of every grid point, e.g. 0-999")
    o.add_argument("--classes", default="all", help="'all' or class indices: seed s gets classes[s %% len]")
    o.add_argument("--batch", type=int, default=256, help="images per sampler call")
    o.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run, _parser=p)
