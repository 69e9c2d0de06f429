"""The record of a run (`run.json`): the command that reruns it, the resolved config, versions, seeds; and the
check that a rerun on the same folder continues the same run."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .._version import __version__
from . import dist
from .seeds import format_seeds, parse_seeds

__all__ = ["command_line", "run_record", "check_resume", "check_out", "identity_of"]


def identity_of(obj) -> str:
    """sha256 of `obj` as canonical JSON: the identity of what a run computes (runs reuse only what matches)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_out(out, flag: str = "--out") -> Path:
    """An output folder path that can be used: not empty, not a file, not under a file, writable if it exists."""
    if out is None or str(out).strip() == "":
        raise ValueError(f"{flag} is empty: give an output folder path (e.g. {flag} runs/x)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{flag} {out} is a file, not a folder: give a folder path")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{flag} {out}: {parent} is a file, not a folder")
            break
    probe = out if out.exists() else next((q for q in out.parents if q.exists()), Path("."))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {out}: {probe} is not writable; give a folder you can write to")
    for sub in ("shards", "png", "run.json", "results.jsonl"):
        q = out / sub
        if q.exists() and (q.is_dir() != (sub in ("shards", "png"))):
            raise ValueError(f"{flag} {out}: {q} is a {'folder' if q.is_dir() else 'file'} where a "
                             f"{'folder' if sub in ('shards', 'png') else 'file'} belongs; move it away")
    return out


def command_line(args: argparse.Namespace) -> str:
    """The `autoguidance CMD ...` command that reruns a parsed command: every option that is set, with its value
    (from the parser that made `args`, which the subcommands store as `args._parser`)."""
    parser = getattr(args, "_parser", None)
    if parser is None:
        return "autoguidance " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    words = [parser.prog.split()[-1]]
    for a in parser._actions:
        v = getattr(args, a.dest, None)
        if a.dest in ("help", "func", "_parser") or v is None or v is False:
            continue
        if not a.option_strings:
            words.extend(map(str, v) if isinstance(v, list) else [str(v)])
        elif v is True:
            words.append(a.option_strings[-1])
        else:
            words.extend([a.option_strings[-1], str(v)])
    return "autoguidance " + " ".join(shlex.quote(w) for w in words)


def run_record(config: dict, seeds: Optional[Sequence[int]] = None, args: Optional[argparse.Namespace] = None,
               **extra) -> dict:
    """What made an output folder: the command (rebuilt from the parsed flags, so it reruns the same run), the
    process's argv, the resolved config, versions, seeds, world size."""
    rec = {"command": command_line(args) if args is not None else None, "argv": list(sys.argv),
           "config": config, "autoguidance_version": __version__, "torch_version": torch.__version__,
           "numpy_version": np.__version__, "python": sys.version.split()[0], "world_size": dist.world_size(),
           "launcher": "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ else None,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if seeds is not None:
        rec["seeds"] = format_seeds(seeds)
        rec["num_seeds"] = len(seeds)
    rec.update(extra)
    return rec


def check_resume(out: Path, config: dict, seeds: Sequence[int]) -> None:
    """Refuse to add to a folder whose run.json records another config (its shards would mix two runs), or seeds
    that the new seeds do not extend (shard i would be overwritten with other seeds)."""
    rec_file = Path(out) / "run.json"
    if not rec_file.exists():
        return
    try:
        rec = json.loads(rec_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # a damaged record is rewritten; each shard carries its run's identity and verifies itself
    if not isinstance(rec, dict):
        return
    old = rec.get("config")
    if old is not None and old != config:
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        raise ValueError(f"{out} holds a run with another config (differs in: {', '.join(diff)}): use a new --out, "
                         "or delete the folder to start over")
    if rec.get("seeds") and isinstance(rec["seeds"], str):
        try:
            before = parse_seeds(rec["seeds"])
        except ValueError:
            return  # damaged: the shards' identities decide what is reused
        if list(seeds[:len(before)]) != before:
            raise ValueError(f"{out} holds seeds {rec['seeds']}; --seeds {format_seeds(seeds)} does not extend them, "
                             "so its shards would be overwritten with other seeds: use a new --out, or seeds that "
                             f"start with {rec['seeds']}")
