"""`snapshot`: an earlier checkpoint of the main's own run with its own EMA (the papers' recipe where the run exists;
what `--gnet` takes today). Nothing is trained: the checkpoint is checked (same architecture and task; for library
checkpoints, the same run's settings and an earlier iteration), recorded, and copied into the guide folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .base import Recipe

#: training settings that may differ between two checkpoints of one run (the snapshot list, the EMA being written)
_RUN_FREE = ("snapshots",)


class Snapshot(Recipe):
    name = "snapshot"
    summary = "an earlier checkpoint of the main's own run (its own EMA), checked and copied"
    trains = False

    def check(self, opts) -> None:
        if not opts.snapshot:
            raise ValueError("recipe snapshot needs --from CHECKPOINT: an earlier checkpoint of the main's own run "
                             "(e.g. mnist-s-T16-ema050 for the main mnist-s-T-ema050)")
        if opts.budget is not None:
            raise ValueError("recipe snapshot trains nothing: drop --budget / --steps (its cost is part of the "
                             "main's run)")
        if opts.data is not None or opts.prompts is not None:
            raise ValueError("recipe snapshot trains nothing: drop --data / --prompts")

    def validate(self, main, ref) -> dict:
        """Check `ref` against `main`; returns the record of what was checked (raises ValueError, one line)."""
        from ..compat import guide_mismatch

        if main.kind == "edm2":
            from ...checkpoint import digest, load

            net = load(ref)
            reason = guide_mismatch(main.net, net)
            if reason:
                raise ValueError(f"--from {ref}: {reason}")
            if getattr(net, "config", None) != main.net.config:
                raise ValueError(f"--from {ref} has another architecture than the main: a snapshot of the main's own "
                                 "run has the main's (for a smaller guide use recipe distill, or --gnet directly)")
            mine = dict(main.record.get("train") or {})
            theirs = dict(getattr(net, "checkpoint_meta", {}).get("train") or {})
            if not mine or not theirs:
                raise ValueError(f"--from {ref}: the main and the snapshot must both record their training run "
                                 "(`autoguidance train`) for make-guide to check they are one run; use --gnet directly")
            diff = sorted(k for k in set(mine) | set(theirs) if k not in _RUN_FREE and mine.get(k) != theirs.get(k))
            if diff:
                raise ValueError(f"--from {ref} is not from the main's run: its training settings differ in "
                                 f"{', '.join(diff)}")
            it, main_it = int(net.checkpoint_meta.get("iteration", -1)), int(main.record.get("iteration", -1))
            if not 0 < it < main_it:
                raise ValueError(f"--from {ref} is at iteration {it}, not before the main's {main_it}: a snapshot "
                                 "guide is an earlier checkpoint of the run")
            return {"from": str(ref), "digest": digest(ref), "iteration": it, "main_iteration": main_it,
                    "fraction_of_main_run": it / main_it, "ema_std": net.checkpoint_meta.get("ema_std"),
                    "run_checked": True, "net": net}
        from ...checkpoint import digest, is_diffusers_folder

        p = Path(str(ref))
        model_dir = p / main.subfolder if (p / "model_index.json").is_file() else p
        if not is_diffusers_folder(model_dir):
            raise ValueError(f"--from {ref} is not a diffusers model folder (nor a pipeline folder with "
                             f"{main.subfolder}/)")
        cfg = json.loads((model_dir / "config.json").read_text())
        theirs = {k: v for k, v in cfg.items() if not k.startswith("_")}
        mine = json.loads(json.dumps(main.config()))
        if cfg.get("_class_name") != main.cls or {k: theirs.get(k) for k in mine} != mine:
            raise ValueError(f"--from {ref}: a snapshot of the main's run has the main's class and config "
                             f"({main.cls}); this one differs")
        d = digest(model_dir)
        if d == main.digest:
            raise ValueError(f"--from {ref} holds the main's own weights: a snapshot guide is an earlier checkpoint")
        return {"from": str(ref), "digest": d, "run_checked": False,
                "note": "diffusers folders record no training run: same class and config checked, the run not",
                "model_dir": str(model_dir)}

    def copy(self, main, checked: dict, out: Path, meta: dict) -> None:
        """Write the snapshot as the guide in `out`."""
        if main.kind == "edm2":
            from ...checkpoint import save_into

            save_into(checked["net"], out, meta={"guide": meta, "snapshot_meta": checked["net"].checkpoint_meta})
            return
        src = Path(checked["model_dir"])
        files = sorted((f for f in src.iterdir()
                        if f.is_file() and (f.suffix == ".safetensors" or f.name == "config.json")),
                       key=lambda f: f.name == "config.json")
        for f in files:
            shutil.copy2(f, out / f.name)
