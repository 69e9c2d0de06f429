"""The pipeline-by-method table of docs/pipelines.md, measured on the tiny random-weight pipelines of
`autoguidance.adapters.tiny` (one per kind; 2 images, 2 steps, CPU, one thread).

    python scripts/pipelines_table.py --out docs/pipelines.md --json docs/results/pipelines_table.json

Rewrites the section of `--out` between `<!-- pipelines-table:begin -->` and `<!-- pipelines-table:end -->` and
writes every number to `--json`. For each kind:

- equality with the pipeline's own images (max abs difference of the decoded images in [0, 1]): no guide (w = 1)
  against the pipeline without CFG; the library's CFG (`guided_pipeline(pipe, "none")` with the pipeline's CFG
  on) against the pipeline's own CFG; the same with `guidance_rescale=0.7` where the pipeline takes it; two
  prompts with one seed (equal initial latents); the second and third call of a block after
  `pipe.enable_model_cpu_offload(device="cpu")`, CFG + in-situ, against the same block without offload;
- model calls per step and rows per call: the pipeline's own CFG, and the library's CFG + in-situ dropout;
- every perturbation of `autoguidance.methods.PERTURBATIONS` (and skip layers, block 0) with its default
  sites, at CFG: the max image change it makes, 'none' (change < 1e-6), 'refused: FLAG' where it has no default
  sites on the model and says which flag to pass (`where=`, `blocks=`, `layers=`), or 'fails' (any other error);
  and token shuffle (TPG, which has no default sites) on the first block of the model's block list;
- an image alone against the same image in a batch of two (CFG + in-situ, the same seed): float rounding only;
- CPU time of the library's CFG and of CFG + in-situ, as ratios to the pipeline's own CFG, timed interleaved in
  one run (median of `--repeats`): the overhead of the adapter on models too small for compute to dominate, not
  a speed claim for real models.
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

BEGIN, END = "<!-- pipelines-table:begin -->", "<!-- pipelines-table:end -->"
#: strengths for the perturbation column: the CLI's --p default 0.1, identity attention and SEG at full strength,
#: block drop at 1 (every default block dropped in the guide pass: the tiny models have two to eight blocks, so at
#: a lower rate two images of two steps may drop none, and the column would not show whether the sites act)
STRENGTH = {"identityattention": 1.0, "seg": 10.0, "blockdrop": 1.0}
#: the flags a deliberate refusal names (a perturbation without default sites on a model)
FLAGS = ("where=", "blocks=", "layers=")








def count_calls(pipe, fn):
    """`(result, [rows of every call of the pipeline's models])` of `fn()` (the pipeline alone: every call runs)."""
    from autoguidance.adapters.pipeline import pipeline_experts

    rows = []
    handles = [m.register_forward_pre_hook(
        lambda mod, a, k: rows.append((a[0] if a else next(v for v in k.values() if torch.is_tensor(v))).shape[0]),
        with_kwargs=True) for _, m in pipeline_experts(pipe)]
    try:
        return fn(), rows
    finally:
        for h in handles:
            h.remove()


def per_step(rows: list, steps: int) -> str:
    """'calls/step x rows' of a run of `steps` steps."""
    if not rows:
        return "-"
    sizes = sorted(set(rows))
    return f"{len(rows) / steps:g} x {'/'.join(str(s) for s in sizes)}"


def first_block(model) -> str:
    """The path of the first block of the block list `SkipLayers` picks by default; a U-Net (several lists, no
    default): its mid block."""
    from autoguidance.perturb import SiteError, SkipLayers

    try:
        return SkipLayers(layers=[0]).sites(model)[0][0]
    except SiteError:
        return "mid_block"


def perturbations(model):
    from autoguidance.adapters.pipeline import make_pipeline_perturbation
    from autoguidance.methods import PERTURBATIONS

    out = {name: (lambda n=name: make_pipeline_perturbation(n, STRENGTH.get(n, 0.1))) for name in PERTURBATIONS}
    out["skiplayers"] = lambda: make_pipeline_perturbation("skiplayers", 0.0, layers=[0])
    out["tokenshuffle@block0"] = lambda: make_pipeline_perturbation("tokenshuffle", 0.0, where=first_block(model))
    return out


def outcome(error: Exception) -> dict:
    """A perturbation's failure: 'refused' (a SiteError or ValueError naming the flag to pass), else 'fails'."""
    from autoguidance.perturb import SiteError

    msg = f"{type(error).__name__}: {error}"
    flags = [f for f in FLAGS if f in str(error)]
    refused = isinstance(error, (SiteError, ValueError)) and bool(flags) and "\n" not in str(error)
    return {"runs": False, "refused": flags[0] if refused else None, "error": msg[:200]}


def measure_kind(kind: str, steps: int, repeats: int) -> dict:
    from autoguidance.adapters import guided_pipeline, tiny

    pipe = tiny.build(kind)
    run = lambda **kw: tiny.images(pipe(**tiny.inputs(kind, steps=steps, **kw)))  # noqa: E731
    row: dict = {"kind": kind, "pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
                 "what": tiny.KINDS[kind][1]}
    insitu = dict(method="insitu", w=2.0, p=0.1, seeds=[0, 1])
    with torch.no_grad():
        plain = run(**tiny.no_cfg_options(kind))
        pipe._num_timesteps = None
        own_cfg, own_rows = count_calls(pipe, lambda: run(**tiny.cfg_options(kind)))
        ran = getattr(pipe, "_num_timesteps", None) or steps      # img2img / inpaint: strength x steps
        row["steps_run"] = ran
        with guided_pipeline(pipe, "none") as gp:
            none = run(**tiny.no_cfg_options(kind))
            lib_cfg = run(**tiny.cfg_options(kind))
        lib_rows = [r for _, r in gp.calls]               # the model calls the library made
        row["cfg_changes_images"] = float(abs(own_cfg - plain).max())
        row["w1_vs_own"] = float(abs(none - plain).max())
        row["cfg_vs_own"] = float(abs(lib_cfg - own_cfg).max())
        row["own_cfg_calls"] = per_step(own_rows, ran)
        row["lib_cfg_calls"] = per_step(lib_rows, ran)
        if "guidance_rescale" in inspect.signature(type(pipe).__call__).parameters:
            own_r = run(guidance_rescale=0.7, **tiny.cfg_options(kind))
            with guided_pipeline(pipe, "none"):
                lib_r = run(guidance_rescale=0.7, **tiny.cfg_options(kind))
            row["rescale_vs_own"] = float(abs(lib_r - own_r).max())
            row["rescale_changes_images"] = float(abs(own_r - own_cfg).max())
        else:
            row["rescale_vs_own"] = None
        same = lambda: tiny.inputs(kind, steps=steps, prompts=["a cat", "a red fox"],  # noqa: E731
                                   generator=[torch.Generator().manual_seed(3) for _ in range(2)],
                                   **tiny.no_cfg_options(kind))
        own_same = tiny.images(pipe(**same()))
        with guided_pipeline(pipe, "none"):
            lib_same = tiny.images(pipe(**same()))
        row["same_seed_vs_own"] = float(abs(lib_same - own_same).max())
        with guided_pipeline(pipe, **insitu) as gp:
            cfg_insitu = run(**tiny.cfg_options(kind))
            ins_rows = [r for _, r in gp.calls]
            ref_2nd = [run(seed=s, **tiny.cfg_options(kind)) for s in (20, 30)]
        row["cfg_insitu_calls"] = per_step(ins_rows, ran)
        row["cfg_insitu_changes_images"] = float(abs(cfg_insitu - own_cfg).max())
        one = {k: v[:1] if k == "negative_prompt" else v for k, v in tiny.cfg_options(kind).items()}
        with guided_pipeline(pipe, **dict(insitu, seeds=[0])):            # image 0 alone: its seed, its generator
            alone = tiny.images(pipe(**tiny.inputs(kind, n=1, steps=steps, **one)))
        row["alone_vs_batch"] = float(abs(alone[0] - cfg_insitu[0]).max())
        row["perturbations"] = {}
        for name, make in perturbations(tiny.model_of(pipe)).items():
            try:
                with guided_pipeline(pipe, "perturbation", w=2.0, perturbation=make(), seeds=[0, 1]):
                    out = run(**tiny.cfg_options(kind))
                d = float(abs(out - own_cfg).max())
                row["perturbations"][name] = {"runs": True, "changes_images": d}
            except Exception as e:  # noqa: BLE001 - the table records what fails, and how
                row["perturbations"][name] = outcome(e)
        # CPU time, interleaved: the pipeline's own CFG, the library's CFG, the library's CFG + in-situ
        times = {"own": [], "lib": [], "insitu": []}
        for _ in range(repeats):
            for key in times:
                t0 = time.perf_counter()
                if key == "own":
                    run(**tiny.cfg_options(kind))
                else:
                    with guided_pipeline(pipe, **(insitu if key == "insitu" else {"method": "none"})):
                        run(**tiny.cfg_options(kind))
                times[key].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        row["seconds_own_cfg"] = med["own"]
        row["ratio_lib_cfg"] = med["lib"] / med["own"]
        row["ratio_cfg_insitu"] = med["insitu"] / med["own"]
        # offload: the 2nd and 3rd call of a block (accelerate re-installs its hooks after each call)
        if getattr(pipe, "model_cpu_offload_seq", None):
            pipe.enable_model_cpu_offload(device="cpu")
            with guided_pipeline(pipe, **insitu):
                run(seed=10, **tiny.cfg_options(kind))
                off_2nd = [run(seed=s, **tiny.cfg_options(kind)) for s in (20, 30)]
            row["offload_vs_without"] = float(max(abs(a - b).max() for a, b in zip(off_2nd, ref_2nd)))
        else:
            row["offload_vs_without"] = None
    return row


def _num(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.0e}" if v > 0 else "0"


def markdown(rows: list, meta: dict) -> str:
    names = list(rows[0]["perturbations"])
    lines = [BEGIN, "",
             f"Generated by `{meta['command']}` ({meta['date']}; diffusers {meta['diffusers']}, torch {meta['torch']}, "
             f"{meta['steps']} steps, 2 images, CPU, one thread). Numbers are max abs differences of the decoded "
             "images in [0, 1]; tiny random-weight models (`autoguidance.adapters.tiny`), so the images are noise and "
             "the table checks plumbing, not quality.", "",
             "**Equal to the pipeline's own images.** w = 1: no guide, no CFG, against the pipeline alone. CFG: "
             "`guided_pipeline(pipe, \"none\")` with the pipeline's CFG on (scale 4; Flux: `true_cfg_scale` 4 and "
             "a negative prompt), the library doing the combination, against the pipeline's own CFG. Rescale: the "
             "same with `guidance_rescale=0.7` (n/a: the pipeline takes none). Same seed: two prompts with one seed, "
             "method none. Offload: the 2nd and 3rd call of a CFG + in-situ block after "
             "`enable_model_cpu_offload(device=\"cpu\")`, against the same calls without offload.", "",
             "| kind | pipeline | scheduler | own CFG: calls/step x rows | w = 1 | CFG | rescale | same seed | offload |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['pipeline']} | {r['scheduler']} | {r['own_cfg_calls']} | "
                     f"{_num(r['w1_vs_own'])} | {_num(r['cfg_vs_own'])} | {_num(r['rescale_vs_own'])} | "
                     f"{_num(r['same_seed_vs_own'])} | {_num(r['offload_vs_without'])} |")
    lines += ["", "**Calls, cost and perturbations.** Library calls/step x rows: its CFG, and CFG + in-situ "
              "dropout (w = 2, p = 0.1 at the model's `nn.Dropout` modules). Alone: image 0 of CFG + in-situ made "
              "alone against the same image in the batch of two (the same seed and generator): the float rounding of "
              "the model's kernels at another batch size. Time: CPU seconds of the pipeline's own "
              f"CFG call, and the library's CFG and CFG + in-situ as ratios to it (median of {meta['repeats']}, "
              "interleaved, one run): adapter overhead on tiny models, not a speed claim. Perturbations: each of "
              "`autoguidance.methods.PERTURBATIONS` with its default sites (strength 0.1; identity attention 1, SEG "
              "10, block drop 1; skiplayers: block 0 of the default block list), and token shuffle on the first "
              "block of the model's block list (a U-Net: its mid block), w = 2 at CFG: the max image change it makes, "
              "'none' when it runs and changes nothing (< 1e-6), 'refused: FLAG' where the perturbation has no "
              "default sites on the model and its one-line error names the flag to pass, 'fails' for any other "
              "error (the messages are listed below the table).", "",
              "| kind | library CFG | CFG + in-situ | alone | own CFG s | CFG ratio | CFG + in-situ ratio | "
              + " | ".join(names) + " |",
              "|---|---|---|---|---|---|---|" + "---|" * len(names)]
    errors: dict = {}
    refusals: dict = {}
    for r in rows:
        cells = []
        for n in names:
            p = r["perturbations"][n]
            if not p["runs"]:
                if p.get("refused"):
                    cells.append(f"refused: `{p['refused']}`")
                    refusals.setdefault(p["error"], []).append(f"{r['kind']}/{n}")
                else:
                    cells.append("fails")
                    errors.setdefault(p["error"], []).append(f"{r['kind']}/{n}")
            else:
                cells.append("none" if p["changes_images"] < 1e-6 else f"{p['changes_images']:.0e}")
        lines.append(f"| {r['kind']} | {r['lib_cfg_calls']} | {r['cfg_insitu_calls']} | {_num(r['alone_vs_batch'])} | "
                     f"{r['seconds_own_cfg']:.3f} | {r['ratio_lib_cfg']:.2f} | {r['ratio_cfg_insitu']:.2f} | "
                     + " | ".join(cells) + " |")
    for title, found in (("Refusals (no default sites: the flag to pass), by message", refusals),
                         ("Failures, by error", errors)):
        if found:
            lines += ["", f"{title}:", ""]
            for err, where in sorted(found.items(), key=lambda kv: -len(kv[1])):
                lines.append(f"- {', '.join(where)}: `{err}`")
    lines += ["", END]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "pipelines.md"), help="the Markdown file to update")
    ap.add_argument("--json", default=str(ROOT / "docs" / "results" / "pipelines_table.json"))
    ap.add_argument("--kinds", default=None, help="comma-separated kinds (default: every kind)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import diffusers
    from diffusers.utils import logging as dlog

    from autoguidance.adapters import tiny

    dlog.set_verbosity_error()
    kinds = args.kinds.split(",") if args.kinds else list(tiny.KINDS)
    rows = []
    for k in kinds:
        t0 = time.perf_counter()
        rows.append(measure_kind(k, args.steps, args.repeats))
        print(f"{k}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    meta = {"command": "python scripts/pipelines_table.py" + (f" --kinds {args.kinds}" if args.kinds else ""),
            "date": time.strftime("%Y-%m-%d"), "diffusers": diffusers.__version__,
            "torch": torch.__version__, "steps": args.steps, "repeats": args.repeats}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    out = Path(args.out)
    text = out.read_text() if out.exists() else ""
    table = markdown(rows, meta)
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + table + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Pipeline by method\n\n" + table + "\n"
    out.write_text(text)
    print(f"wrote {out} and {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
