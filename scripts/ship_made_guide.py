"""Ship a made guide (a folder `autoguidance make-guide` wrote) for an image set's main into the package, as
`autoguidance/weights/<set>/made-guide`: its weights at every EMA it kept, its record (guide.json, the main named by its
shipped name instead of the maker's path), the command that remakes it, the checksums and the manifest entries. The run's state, its data-free
inputs and its lock stay behind. The folder is replaced whole, never half-written.

    .venv/bin/python scripts/ship_made_guide.py /work/guides-study/guides/distill-main-free-030 --set mnist \\
        --command "autoguidance guides train --out runs/guides --guides distill-main-free-030"
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from autoguidance import checkpoint
from autoguidance.cli.image_tables import write_manifest
from autoguidance.experiments.image_sets import IMAGE_SETS
from autoguidance.guidemaker import read_record
from autoguidance.runs.files import write_json


def ship(src: Path, set_name: str, command: str) -> Path:
    if set_name not in IMAGE_SETS:
        raise SystemExit(f"error: unknown image set {set_name!r}; known: {', '.join(IMAGE_SETS)}")
    data = IMAGE_SETS[set_name]
    rec = read_record(src)
    if rec is None or rec.get("status") != "complete":
        raise SystemExit(f"error: {src} is not a finished made guide (no complete guide.json)")
    shipped = {checkpoint.digest(n): n for n, r in checkpoint.shipped().items() if r["path"].startswith(f"{set_name}/")
               and r["family"] == "edm2"}
    main = shipped.get(rec["main"]["digest"])
    if main is None:
        raise SystemExit(f"error: {src} was made for a main that is not one of the shipped {set_name} checkpoints")
    dest = data.weights / "made-guide"
    tmp = data.weights / ".tmp-made-guide"
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in rec["emas"].values():
        (tmp / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / sub / "model.safetensors", tmp / sub / "model.safetensors")
        cfg = json.loads((src / sub / "config.json").read_text())
        cfg["meta"]["command"] = command         # what `autoguidance models` shows: the command that remakes it
        write_json(tmp / sub / "config.json", cfg)
    rec = json.loads(json.dumps(rec))
    rec["main"]["ref"] = main                    # the shipped name, not the maker's path
    rec["shipped_command"] = command
    write_json(tmp / "guide.json", rec)
    old = data.weights / ".old-made-guide"
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    write_manifest(data.weights, data)
    for name, r in checkpoint.shipped().items():
        if r["path"].startswith(f"{set_name}/made-guide"):
            checkpoint.add_checksum(name)
            checkpoint.load(name)                # loads, and its checksum holds
    return dest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("guide", type=Path, help="the made guide's folder")
    p.add_argument("--set", required=True, help="the image set whose main it guides (mnist, fashion, digits)")
    p.add_argument("--command", required=True, help="the command that remakes it (recorded in the manifest)")
    a = p.parse_args(argv)
    print(f"shipped {ship(a.guide, a.set, a.command)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
