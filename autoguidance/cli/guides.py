"""`autoguidance guides ...`: the made-guides study on MNIST 14x14 and the sizes of reduced published models.

    autoguidance guides train --out runs/guides             # make every guide of the study (resumable)
    autoguidance guides study --out runs/guides             # make what is missing, evaluate, write md/json/png
    autoguidance guides study --quick --out /tmp/g          # CI: the same code on a few images and steps
    autoguidance guides sizes --doc docs/guides.md          # the published-size table, into the doc's marked block

The study and its protocol: `autoguidance.experiments.guides_study`; the sizes: `autoguidance.guidemaker.sizes`.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["add_parser"]

def add_parser(sub) -> None:
    p = sub.add_parser("guides", help="made guides: the MNIST study of the make-guide recipes, and the reduced sizes "
                       "of published models", description=__doc__.split("\n\n")[0])
    s = p.add_subparsers(dest="what", required=True)
    for name, help_ in (("train", "make every guide of the study (resumable)"),
                        ("study", "make what is missing, then evaluate the study's rows")):
        q = s.add_parser(name, help=help_)
        q.add_argument("--out", required=True, help="output folder (guides in OUT/guides, evaluations in "
                       "OUT/.evaluations)")
        q.add_argument("--quick", action="store_true", help="a few images, steps and guides (CI; not meaningful)")
        q.add_argument("--weights", default=None, help="the MNIST checkpoints (default: the shipped ones)")
        q.add_argument("--no-progress", action="store_true", help="no progress output")
        q.add_argument("--guides", default=None, help="comma-separated made guides to keep, e.g. "
                       "distill-fresh-free-030,weight-decay-data-030 (default: all 21)")
        if name == "study":
            q.add_argument("--n", type=int, default=None, help="images per seed set (default 1000; quick 40)")
            q.add_argument("--store", default=None, help="evaluation store (default OUT/.evaluations)")
            q.add_argument("--doc", default=None, help="also write the table into this Markdown file's study block")
        q.set_defaults(func=_run_study if name == "study" else _run_train)
    z = s.add_parser("sizes", help="parameters and FLOPs per call of published models and their reduced guides")
    z.add_argument("--models", default=None, help="comma-separated names (default: all)")
    z.add_argument("--doc", default=None, help="also write the table into this Markdown file's sizes block")
    z.set_defaults(func=_run_sizes)


def _settings(args):
    from dataclasses import replace

    from ..experiments.guides_study import FULL_STUDY, QUICK_STUDY

    st = QUICK_STUDY if args.quick else FULL_STUDY
    if args.guides:
        st = replace(st, only=tuple(n.strip() for n in args.guides.split(",") if n.strip()))
    return st


def _run_train(args) -> int:
    from ..experiments.guides_study import make_study_guides

    recs = make_study_guides(args.out, _settings(args), args.weights, progress=not args.no_progress)
    print(f"{len(recs)} guides in {Path(args.out) / 'guides'}")
    return 0


def _run_study(args) -> int:
    from ..experiments.guides_study import lab_for, run_study

    if args.n is not None and args.n < 2:
        raise ValueError(f"--n must be at least 2 images per seed set, got {args.n}")
    store = args.store if args.store is not None else Path(args.out) / ".evaluations"
    lab = lab_for(args.quick, store=store, progress=not args.no_progress, n=args.n)
    if args.weights is not None:
        lab.weights = Path(args.weights)
    record = run_study(lab, args.out, _settings(args))
    if args.doc:
        from ..experiments.guides_study import study_md
        from ..runs.files import fill_block, markdown_body

        fill_block(args.doc, "study", markdown_body(study_md(record)))   # the page has the heading
    print(f"wrote {Path(args.out) / 'guides_study.md'}, .json, .png")
    return 0


def _run_sizes(args) -> int:
    from ..guidemaker.sizes import PUBLISHED, size_rows, sizes_md

    names = [n.strip() for n in args.models.split(",")] if args.models else None
    known = [p.name for p in PUBLISHED]
    if names and any(n not in known for n in names):
        raise ValueError(f"unknown model(s) {', '.join(n for n in names if n not in known)}; known: "
                         f"{', '.join(known)}")
    md = sizes_md(size_rows(names))
    print(md, end="")
    if args.doc:
        from ..runs.files import fill_block

        fill_block(args.doc, "sizes", md)
    return 0
