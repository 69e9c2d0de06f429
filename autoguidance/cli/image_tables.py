"""The command line of the image-table experiments on one image set (`autoguidance digits|mnist|fashion ...`:
cli/digits.py, cli/mnist.py, cli/fashion.py), and the manifest of its checkpoints."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from ..checkpoint import WEIGHTS_DIR
from ..runs.files import fill_block, link_from, markdown_body, write_json, write_text
from ..experiments.image_tables import EXPERIMENTS, FULL, QUICK, Lab, Settings, experiment_text, run_experiment
from ..experiments.image_tables_report import Row, costs_md, extra_cols, extra_md, space_prefixes, table_md, verdicts_md
from ..experiments.image_sets import DIGITS, ImageSet

__all__ = ["add_image_set_parser", "render", "write_manifest"]


def render(out, data: ImageSet = DIGITS, doc=None) -> list[str]:
    """Re-write every `<prefix>_*.md` in `out` from its JSON record (no sampling): for a change of table layout.
    With `doc` (a hand-written page such as docs/fashion.md), also fill its blocks `<!-- NAME: start -->` ...
    `<!-- NAME: end -->` named after an experiment ('table', 'floor', ...) with that experiment's table, and its block
    'verdicts' with the main table's head-to-head verdicts; blocks the page does not have are left alone."""
    out = Path(out)
    doc_text = Path(doc).read_text() if doc is not None else ""
    done = []
    for name in EXPERIMENTS:
        stem, title, note = experiment_text(name, data)
        path = out / f"{stem}.json"
        if not path.exists():
            continue
        rec = json.loads(path.read_text())
        rows = [Row(r["key"], r["label"], {k: v for k, v in r.items() if k not in ("key", "label", "paper", "group")},
                    r["paper"], r["group"]) for r in rec["rows"]]
        md = table_md(rows, title, note, Settings(**{k: tuple(v) if isinstance(v, list) else v
                                                     for k, v in rec["settings"].items()}),
                      extra_cols(name), fd_name=data.fd_name)
        md += extra_md(name, rows, data.fd_name)
        if name == "table":
            md += costs_md(rec.get("training_costs", {}))
        write_text(out / f"{stem}.md", md)
        done.append(stem)
        if doc is not None and f"<!-- {name}: start -->" in doc_text:
            fill_block(doc, name, f"From [{stem}.md]({link_from(doc, out / f'{stem}.md')}) (figures beside it).\n\n"
                       + markdown_body(md))
        if doc is not None and name == "table" and "<!-- verdicts: start -->" in doc_text and space_prefixes(rows):
            fill_block(doc, "verdicts", verdicts_md(rows, data.fd_name))
    return done


# -- the manifest --------------------------------------------------------------------------------------------------

_DESCRIPTIONS = {
    "s": "EDM2-style S U-Net (142k params), conditional, digits 8x8",
    "xs": "EDM2-style XS U-Net (63k params), conditional, digits 8x8",
    "mnist:s": "EDM2-style S U-Net (252k params), conditional, MNIST 14x14",
    "mnist:xs": "EDM2-style XS U-Net (142k params), conditional, MNIST 14x14",
    "fashion:s": "EDM2-style S U-Net (422k params), conditional, Fashion-MNIST 28x28",
    "fashion:xs": "EDM2-style XS U-Net (238k params), conditional, Fashion-MNIST 28x28",
    "xs-uncond": "EDM2-style XS U-Net, unconditional (CFG guide at T, unconditional autoguide at T/16)",
    "s-dropout": "EDM2-style S U-Net trained with dropout 0.1 (in-situ guidance on a net that saw dropout)",
    "s-uncond": "EDM2-style S U-Net, unconditional (main of the unconditional rows)",
    "xs-half": "EDM2-style XS U-Net trained on half the train split ('less data' guide)",
}


def write_manifest(folder=None, data: ImageSet = DIGITS) -> int:
    """Add every checkpoint folder of `folder` (default: the image set's weights) to weights/manifest.json as
    `<prefix>-<subfolder>` (a made guide's other EMAs as `<prefix>-<guide>-<ema subfolder>`), with a description and
    the command that made it."""
    from ..guidemaker import read_record

    folder = Path(folder) if folder is not None else data.weights
    what = {"digits": "digits 8x8", "mnist": "MNIST 14x14", "fashion": "Fashion-MNIST 28x28"}.get(data.prefix, data.noun)
    manifest_path = WEIGHTS_DIR / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"checkpoints": {}}
    count = 0
    made = [f for f in sorted(folder.glob("*/*/config.json")) if read_record(f.parent.parent) is not None]
    for cfg_file in sorted(folder.glob("*/config.json")) + made:
        cfg_json = json.loads(cfg_file.read_text())
        sub = str(cfg_file.parent.relative_to(folder)).replace("/", "-")
        meta = cfg_json.get("meta", {})
        gdir = cfg_file.parent if read_record(cfg_file.parent) is not None else cfg_file.parent.parent
        guide = read_record(gdir) if gdir != folder else None
        if guide is not None:                  # a made guide (autoguidance make-guide), at one of its EMAs
            ema = next(float(std) for std, d in guide["emas"].items()
                       if (gdir / d).resolve() == cfg_file.parent.resolve())
            b = guide["budget"]
            init = (guide.get("recipe_notes") or {}).get("init")
            desc = (f"{what} guide made by `make-guide --recipe {guide['recipe']}{' --init ' + init if init else ''}` "
                    "from the shipped main "
                    f"({'data-free' if guide['settings']['data'] is None else 'with the training images'}, "
                    f"{b['spent_fraction_of_main']:.1%} of its training FLOPs); EMA std {ema:g}")
            meta = {"command": guide.get("shipped_command", guide.get("command", ""))}
        elif cfg_json["family"] == "digits-features":
            desc = (f"{data.noun} feature network (CNN classifier; test accuracy "
                    f"{meta.get('test_accuracy', 0):.3f})")
        elif cfg_json["family"] == "contrastive-encoder":
            desc = (f"{data.noun} second feature space (self-supervised SimCLR encoder, never saw a label; kNN-20 "
                    f"test accuracy {meta.get('knn20_test_accuracy', 0):.3f})")
        else:
            stem, snap = sub.rsplit("-T", 1)[0], sub.rsplit("-T", 1)[1]
            when = "T" if snap.startswith("-") else f"T/{snap.split('-')[0]}"
            known = _DESCRIPTIONS.get(f"{data.prefix}:{stem}", _DESCRIPTIONS.get(stem, stem))
            desc = (f"{known.replace('digits 8x8', what)}; snapshot {when} (iteration {meta.get('iteration')}), "
                    f"EMA std {meta.get('ema_std')}, {meta.get('train_seconds')} s of training")
        manifest["checkpoints"][f"{data.prefix}-{sub}"] = {
            "path": str(cfg_file.parent.resolve().relative_to(WEIGHTS_DIR.resolve())),
            "family": cfg_json["family"], "description": desc, "command": meta.get("command", "")}
        count += 1
    write_json(manifest_path, manifest)
    return count


# -- command line --------------------------------------------------------------------------------------------------

def add_image_set_parser(sub, data: ImageSet, help: str) -> None:
    """The command `autoguidance <prefix> table|degradations|...|all|render|manifest` of one image set."""
    import argparse

    p = sub.add_parser(data.prefix, help=help)
    dsub = p.add_subparsers(dest=f"{data.prefix}_command", required=True)
    p.set_defaults(data=data)

    def run_args(q) -> None:
        q.add_argument("--out", default=f"{data.prefix}-results", help="output folder")
        q.add_argument("--quick", action="store_true", help="few samples and steps (CI); numbers are not meaningful")
        q.add_argument("--n", type=int, default=None, help="images per seed set (overrides the mode's)")
        q.add_argument("--steps", type=int, default=None, help="Heun steps (overrides the mode's)")
        q.add_argument("--weights", default=None, help=f"checkpoint folder (default: the shipped {data.noun} weights)")
        q.add_argument("--threads", type=int, default=1, help="torch threads (fixed, so numbers reproduce exactly)")
        q.add_argument("--quiet", action="store_true", help="no per-evaluation log lines")
        q.add_argument("--store", default=None,
                       help="folder of finished evaluations: a rerun (or another experiment) reads them back instead "
                            "of sampling again (default: OUT/.evaluations)")
        q.add_argument("--no-store", action="store_true", help="keep evaluations in memory only")

    for name, (_, title, _) in EXPERIMENTS.items():
        q = dsub.add_parser(name, help=title.replace("digits", data.noun),
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        run_args(q)
        if name == "table":
            q.add_argument("--methods", default="", help="comma-separated row keys (default: all)")
        q.set_defaults(func=_run_cli, experiment=name)
    q = dsub.add_parser("rules", help="combination rules (linear, rescale, APG, CFG-Zero*) for CFG, autoguidance "
                        "and in-situ: best FD, usable w, precision-recall against CFG",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run_args(q)
    q.add_argument("--methods", default="cfg,auto,insitu", help="comma-separated methods of the study (cfg always)")
    q.add_argument("--rules", default="linear,rescale,apg,cfg-zero", help="comma-separated rules (linear always)")
    q.add_argument("--ws", default=None, help="comma-separated w of the study (default 1.25,1.5,2,3,4,6)")
    q.add_argument("--doc", default=None, help="also fill this page's block <!-- rules-study: start --> ... end")
    q.set_defaults(func=_rules_cli)
    a = dsub.add_parser("all", help="every experiment in one process (shared evaluations), each written when done",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run_args(a)
    a.add_argument("--only", default=",".join(data.experiments or EXPERIMENTS),
                   help="comma-separated experiments, in order")
    a.set_defaults(func=_all_cli)
    f = dsub.add_parser("features", help=f"train the feature network of the {data.noun} metrics",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    f.add_argument("--out", default=str(data.weights / "features"))
    f.add_argument("--epochs", type=int, default=40)
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=_features_cli)
    if any(folder for _, folder in data.spaces[1:]):
        e = dsub.add_parser("encoder", help=f"train the self-supervised encoder of the second {data.noun} feature "
                            "space (SimCLR; never sees a label)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        e.add_argument("--out", default=str(data.weights / "encoder"))
        e.add_argument("--epochs", type=int, default=10)
        e.add_argument("--channels", type=int, default=16)
        e.add_argument("--seed", type=int, default=0)
        e.add_argument("--no-progress", action="store_true")
        e.set_defaults(func=_encoder_cli)
    r = dsub.add_parser("render", help="re-write the Markdown tables of --out from their JSON records")
    r.add_argument("--out", default=f"{data.prefix}-results")
    r.add_argument("--doc", default=None, help="also fill this page's generated blocks (table, floor, verdicts, ...)")
    r.set_defaults(func=lambda a: print(f"rendered: {', '.join(render(a.out, a.data, a.doc)) or '(nothing)'}") or 0)
    m = dsub.add_parser("manifest", help=f"add the {data.noun} checkpoints to weights/manifest.json")
    m.add_argument("--folder", default=str(data.weights))
    m.set_defaults(func=lambda a: print(f"manifest: {write_manifest(a.folder, a.data)} {a.data.noun} checkpoints")
                   or 0)


def _settings(args) -> Settings:
    s = QUICK if args.quick else replace(FULL, **dict(args.data.full))
    if args.n is not None:
        s = replace(s, n=args.n, batch=min(s.batch, args.n) if s.batch else args.n)
    if args.steps is not None:
        s = replace(s, num_steps=args.steps)
    return s


def _store(args):
    return None if args.no_store else Path(args.store) if args.store else Path(args.out) / ".evaluations"


def _run_cli(args) -> int:
    torch.set_num_threads(args.threads)
    methods = [m for m in getattr(args, "methods", "").split(",") if m.strip()] or None
    lab = Lab(_settings(args), args.weights, progress=not args.quiet, data=args.data, store=_store(args))
    rec = run_experiment(args.experiment, args.out, lab.s, methods=methods, lab=lab)
    stem = experiment_text(args.experiment, args.data)[0]
    print((Path(args.out) / f"{stem}.md").read_text())
    print(f"wrote {args.out}/{stem}.md, {stem}.json (+ figures) in {rec['seconds']:.0f} s")
    return 0


def _rules_cli(args) -> int:
    from ..experiments.rules_study import run_rules_study

    torch.set_num_threads(args.threads)
    lab = Lab(_settings(args), args.weights, progress=not args.quiet, data=args.data, store=_store(args))
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    rules = tuple(r.strip() for r in args.rules.split(",") if r.strip())
    ws = tuple(float(w) for w in args.ws.split(",")) if args.ws else (lab.s.ws if args.quick else None)
    rec = run_rules_study(lab, args.out, ws=ws, methods=methods, rules=rules)
    md = (Path(args.out) / f"{rec['experiment']}.md").read_text()
    print(md)
    if args.doc:
        link = link_from(args.doc, Path(args.out) / rec["experiment"])
        fill_block(args.doc, "rules-study", f"From [{rec['experiment']}.md]({link}.md) (figures: "
                   f"[precision-recall]({link}_pr.png), [FD over w]({link}_sweep.png)).\n\n"
                   + markdown_body(md))
    print(f"wrote {args.out}/{rec['experiment']}.md, .json, _pr.png, _sweep.png in {rec['seconds']:.0f} s")
    return 0


def _all_cli(args) -> int:
    torch.set_num_threads(args.threads)
    lab = Lab(_settings(args), args.weights, progress=not args.quiet, data=args.data, store=_store(args))
    for name in [e for e in args.only.split(",") if e.strip()]:
        rec = run_experiment(name, args.out, lab.s, lab=lab)
        stem = experiment_text(name, args.data)[0]
        print((Path(args.out) / f"{stem}.md").read_text(), flush=True)
        print(f"wrote {args.out}/{stem}.* at {rec['seconds']:.0f} s", flush=True)
    return 0


def _features_cli(args) -> int:
    from ..metrics.features import train_feature_net

    cmd = f"autoguidance {args.data.prefix} features --out {args.out} --epochs {args.epochs} --seed {args.seed}"
    net = train_feature_net(args.out, epochs=args.epochs, seed=args.seed, meta={"command": cmd},
                            data=args.data.name)
    print(f"saved {args.out}: test accuracy {net.checkpoint_meta['test_accuracy']:.4f}")
    return 0


def _encoder_cli(args) -> int:
    from ..train.contrastive import train_contrastive

    cmd = (f"autoguidance {args.data.prefix} encoder --out {args.out} --epochs {args.epochs} "
           f"--channels {args.channels} --seed {args.seed}")
    net = train_contrastive(args.data.load("train"), args.data.load("test"), args.out, epochs=args.epochs,
                            channels=args.channels, seed=args.seed, progress=not args.no_progress,
                            meta={"command": cmd})
    print(f"saved {args.out}: kNN-20 test accuracy {net.checkpoint_meta['knn20_test_accuracy']:.4f}")
    return 0
